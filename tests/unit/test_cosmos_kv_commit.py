"""The Cosmos commit writes K/V only (``DiT.forward_kv``, ``kv_only_commit``): the last block
stops at its K/V and the final layer is skipped, and the KV cache after it is bit-identical to
the one a full forward leaves (an empty cache and one holding earlier blocks), so rollouts are
unchanged; commits run under a graph key of their own (never a denoising forward's graph).
"""

from __future__ import annotations

import pytest
import torch

from flashdreams.cache.rolling import RollingKVCache
from flashdreams.model.cosmos import CosmosDiT
from flashdreams.model.cosmos.dit import CosmosFinalLayer

TINY = dict(dim=64, num_heads=2, num_layers=3, in_dim=4, out_dim=4, text_dim=48,
            context_dim=32, adaln_lora_dim=16, text_len=8)  # fmt: skip
HW = (4, 6)  # latent size: 6 tokens per frame after the 2x2 patch


def _model() -> CosmosDiT:
    model = CosmosDiT(**TINY).eval()
    model.init_weights(torch.Generator().manual_seed(0))
    return model


def _cache() -> RollingKVCache:
    return RollingKVCache(window_frames=4, num_layers=3, num_heads=2, head_dim=32,
                          tokens_per_frame=6, frames_per_block=2, total_frames=8)  # fmt: skip


@torch.no_grad()
def test_the_kv_after_a_kv_only_commit_is_bit_identical():
    model, gen = _model(), torch.Generator().manual_seed(1)
    ctx = model.prepare_context(torch.randn(1, 8, 48, generator=gen))
    full, kv_only = _cache(), _cache()
    for block in range(3):  # the window fills, then rolls
        start = 2 * block
        x = torch.randn(1, 4, 2, *HW, generator=gen)
        t = torch.full((1, 2), 128.0)
        positions = torch.arange(start, start + 2)
        for cache in (full, kv_only):
            cache.begin_block(start, 2)
        model(x, t, ctx, positions, full)
        assert model.forward_kv(x, t, ctx, positions, kv_only) is None
        for layer in range(3):
            assert torch.equal(full.k[layer], kv_only.k[layer])
            assert torch.equal(full.v[layer], kv_only.v[layer])
        assert full.valid_tokens == kv_only.valid_tokens


@torch.no_grad()
def test_the_kv_only_commit_skips_the_last_blocks_tail_and_the_head(monkeypatch):
    model, gen = _model(), torch.Generator().manual_seed(2)
    ctx = model.prepare_context(torch.randn(1, 8, 48, generator=gen))
    ran = []
    for i, blk in enumerate(model.blocks):
        monkeypatch.setattr(blk, "cross_out_mlp", lambda *a, i=i, f=blk.cross_out_mlp:
                            ran.append(i) or f(*a))  # fmt: skip
    head = CosmosFinalLayer.forward
    monkeypatch.setattr(CosmosFinalLayer, "forward",
                        lambda *a: ran.append("head") or head(*a))  # fmt: skip
    cache = _cache()
    cache.begin_block(0, 2)
    x, t = torch.randn(1, 4, 2, *HW, generator=gen), torch.full((1, 2), 128.0)
    model.forward_kv(x, t, ctx, torch.arange(2), cache)
    assert ran == [0, 1]
    with pytest.raises(ValueError, match="needs a cache"):
        model.forward_kv(x, t, ctx)


@torch.no_grad()
def test_commits_have_a_graph_key_of_their_own(monkeypatch):
    from flashdreams.conditioner.base import Conditioner
    from flashdreams.control.base import ControlEncoder
    from flashdreams.graph.eager import EagerPolicy
    from flashdreams.guidance.base import Guidance
    from flashdreams.rollout.forward import Forwards

    model, gen = _model(), torch.Generator().manual_seed(3)
    ctx = model.prepare_context(torch.randn(1, 8, 48, generator=gen))
    fw = Forwards(model, EagerPolicy(), Guidance(), Conditioner(), ControlEncoder(),
                  batch_size=1, dtype=torch.float32, device=torch.device("cpu"))  # fmt: skip
    fw.cache = _cache()
    assert fw.separate_commit and not fw.exact_commit
    keys = []
    run = EagerPolicy.run
    monkeypatch.setattr(EagerPolicy, "run", lambda self, fn, *a, shape_key: keys.append(
        (fn.__name__, shape_key)) or run(self, fn, *a, shape_key=shape_key))  # fmt: skip
    x, positions = torch.randn(1, 4, 2, *HW, generator=gen), torch.arange(2)
    fw.cache.begin_block(0, 2)
    fw.run(x, fw.block_timestep(900.0, 2), ctx, positions, {})
    fw.commit(x, ctx, positions, 0, 128.0, lambda shape: torch.randn(shape, generator=gen))
    assert keys == [("_call", 12), ("_call_kv", (12, "kv"))]
