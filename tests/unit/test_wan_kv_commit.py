"""Wan-family commits and history re-runs write K/V only (``WanDiT.forward_kv``,
``kv_only_commit``): every block but the last runs whole, the last stops at its cache writes
(``WanBlock.write_kv``; a Matrix-Game action block runs whole: its action caches need the
residual after both attentions) and the head is skipped. The cache a ``forward_kv`` leaves
gives a following denoising forward bit-identical output to the cache a full forward leaves,
for plain Wan, HY-WorldPlay (both PRoPE branches, its context cache), Matrix-Game (action
caches) and the Wan 2.2 MoE; PyTorch's FLOP counter agrees with ``forward_kv_flops``."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from flashdreams.cache.context import ContextKVCache
from flashdreams.cache.full import FullKVCache
from flashdreams.model.wan import WanHead
from tests.unit.test_model_flops import TINY_WAN, counted

FRAMES, HW = 2, (8, 8)  # latent frames per block, latent size: 16 tokens per frame


def _seeded(model):
    model.init_weights(torch.Generator().manual_seed(0))
    return model.eval().requires_grad_(False)


def _wan():
    from flashdreams.model.wan import WanDiT

    model = _seeded(WanDiT(**TINY_WAN, in_dim=16, out_dim=16))
    return model, model.prepare_context(torch.randn(1, 16, 32)), {}, partial(FullKVCache)


def _hy():
    from flashdreams.model.hy_worldplay import HYWorldPlayDiT

    model = _seeded(HYWorldPlayDiT(**TINY_WAN, in_dim=16, out_dim=16, memory_points=100,
                                   context_frames=2 * FRAMES, recent_frames=2 * FRAMES))  # fmt: skip
    eye = torch.eye(4).expand(1, FRAMES, 4, 4).clone()
    eye[..., :3, 3] = torch.randn(1, FRAMES, 3)
    inputs = {"action": torch.randint(0, 81, (1, FRAMES)), "viewmats": eye,
              "intrinsics": torch.eye(3).expand(1, FRAMES, 3, 3) * 0.5}  # fmt: skip
    cache = partial(ContextKVCache, context_frames=2 * FRAMES)
    return model, model.prepare_context(torch.randn(1, 16, 32)), inputs, cache


def _matrix_game(last_has_action: bool):
    from flashdreams.model.matrix_game import MatrixGameDiT
    from tests.unit.test_matrix_game import SMALL

    layers = SMALL.get("num_layers", 2)
    blocks = [0, layers - 1] if last_has_action else [0]
    model = _seeded(MatrixGameDiT(**{**SMALL, "action_blocks": blocks}, keyboard_dim=4,
                                  mouse_dim=2))  # fmt: skip
    inputs = {"image_latents": torch.randn(1, 20, FRAMES, *HW),
              "keyboard": torch.rand(1, FRAMES, 12, 4), "mouse": torch.randn(1, FRAMES, 12, 2)}  # fmt: skip
    return model, model.prepare_context(None, torch.randn(1, 257, 16)), inputs, partial(FullKVCache)


def _moe():
    from flashdreams.model.moe import WanMoE

    model = WanMoE(**TINY_WAN, in_dim=16, out_dim=16)
    for i, expert in enumerate(model.experts):
        expert.init_weights(torch.Generator().manual_seed(i))
    model.eval().requires_grad_(False)
    return model, model.prepare_context(torch.randn(1, 16, 32)), {}, partial(FullKVCache)


MODELS = {"wan": _wan, "hy_worldplay": _hy, "matrix_game": partial(_matrix_game, False),
          "matrix_game_action_last": partial(_matrix_game, True), "moe": _moe}  # fmt: skip


def _cache(model, factory):
    return model.build_cache(factory, tokens_per_frame=model.tokens_per_frame(HW),
                             frames_per_block=FRAMES, total_frames=3 * FRAMES, batch_size=1,
                             device="cpu", dtype=torch.float32)  # fmt: skip


def _begin(cache, block: int, history: bool) -> None:
    if history:  # a re-run of the history frames, then the block after them
        cache.begin_context(FRAMES)
    else:
        cache.begin_block(block * FRAMES, FRAMES)


@pytest.mark.parametrize("name", list(MODELS))
@torch.no_grad()
def test_a_forward_after_forward_kv_equals_one_after_a_full_forward(name):
    model, ctx, inputs, factory = MODELS[name]()
    gen = torch.Generator().manual_seed(1)
    history = isinstance(factory.func, type) and issubclass(factory.func, ContextKVCache)
    channels = 16
    x0, x1 = (torch.randn(1, channels, FRAMES, *HW, generator=gen) for _ in range(2))
    t_clean, t_noisy = torch.zeros(1, FRAMES), torch.full((1, FRAMES), 700.0)
    outs = []
    for kv_only in (False, True):
        cache = _cache(model, factory)
        _begin(cache, 0, history)  # block 0's clean K/V (a commit; HY: its history re-run)
        write = model.forward_kv if kv_only else model
        out = write(x0, t_clean, ctx, torch.arange(FRAMES), cache, None, inputs)
        assert (out is None) == kv_only
        cache.begin_block(FRAMES, FRAMES)  # the next block attends to block 0 (HY: history)
        positions = torch.arange(FRAMES, 2 * FRAMES)
        outs.append(model(x1, t_noisy, ctx, positions, cache, None, inputs))
    assert outs[0].abs().max() > 0
    assert torch.equal(outs[0], outs[1])


@torch.no_grad()
def test_forward_kv_skips_the_last_blocks_tail_and_the_head(monkeypatch):
    model, ctx, inputs, factory = _wan()
    ran = []
    for i, blk in enumerate(model.blocks):
        monkeypatch.setattr(blk, "cross_out_ffn", lambda *a, i=i, f=blk.cross_out_ffn:
                            ran.append(i) or f(*a))  # fmt: skip
    head = WanHead.forward
    monkeypatch.setattr(WanHead, "forward", lambda *a: ran.append("head") or head(*a))
    cache = _cache(model, factory)
    cache.begin_block(0, FRAMES)
    x, t = torch.randn(1, 16, FRAMES, *HW), torch.zeros(1, FRAMES)
    model.forward_kv(x, t, ctx, torch.arange(FRAMES), cache)
    assert ran == list(range(model.num_layers - 1))
    assert not model._kv_only  # reset for the next denoising forward
    ran.clear()
    model(x, t, ctx, torch.arange(FRAMES), cache)
    assert ran == [*range(model.num_layers), "head"]
    with pytest.raises(ValueError, match="needs a cache"):
        model.forward_kv(x, t, ctx)


@pytest.mark.parametrize("name", ["wan", "hy_worldplay", "matrix_game_action_last"])
@torch.no_grad()
def test_forward_kv_flops_counts_what_it_runs(name):
    model, ctx, inputs, factory = MODELS[name]()
    history = name == "hy_worldplay"
    tpf = model.tokens_per_frame(HW)
    cache = _cache(model, factory)
    _begin(cache, 0, history)
    x, t = torch.randn(1, 16, FRAMES, *HW), torch.zeros(1, FRAMES)
    got = counted(lambda: model.forward_kv(x, t, ctx, torch.arange(FRAMES), cache, None, inputs))
    want = model.forward_kv_flops(FRAMES * tpf, FRAMES * tpf, tpf)
    whole = model.forward_flops(FRAMES * tpf, FRAMES * tpf, tpf)
    assert got == pytest.approx(sum(want.values()), rel=1e-3)
    if name == "matrix_game_action_last":  # an action block last: nothing skipped but the head
        assert want["attention"] == whole["attention"]
    else:
        assert sum(want.values()) < sum(whole.values()) * (1 - 0.5 / model.num_layers)
