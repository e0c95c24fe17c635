"""``DiT.forward_flops`` counts what a forward really runs: PyTorch's FLOP counter (matmuls,
convolutions and SDPA) over a tiny model's forward agrees with it for every model family, and
Wan's count is the one the benchmark floor always used."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from flashdreams.cache.full import FullKVCache
from flashdreams.model.base import FLOP_PARTS

TINY_WAN = dict(dim=64, num_heads=4, num_layers=2, ffn_dim=128, text_dim=32, text_len=16)
TINY_COSMOS = dict(dim=64, num_heads=2, num_layers=2, ffn_dim=256, text_dim=48, context_dim=32,
                   adaln_lora_dim=16, text_len=16)  # fmt: skip
FRAMES, HW = 2, (8, 8)  # latent frames per block, latent size: 16 tokens per frame


def _cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def counted(fn) -> int:
    """FLOPs PyTorch counts in ``fn()`` (the CPU SDPA kernel counted as the CUDA ones are)."""
    cpu_sdpa = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping={cpu_sdpa: _cpu_sdpa}) as fc:  # fmt: skip
        fn()
    return fc.get_total_flops()


def _seeded(model):
    model.init_weights(torch.Generator().manual_seed(0))
    return model.eval()


def _ar_flops(model, ctx, inputs, channels):
    """(counted, formula) FLOPs of the second block of an AR rollout: FRAMES query frames
    attending to 2 * FRAMES cached frames."""
    tpf = model.tokens_per_frame(HW)
    cache = model.build_cache(partial(FullKVCache), tokens_per_frame=tpf,
                              frames_per_block=FRAMES, total_frames=2 * FRAMES, batch_size=1,
                              device="cpu", dtype=torch.float32)  # fmt: skip
    x = torch.randn(1, channels, FRAMES, *HW)
    t = torch.full((1, FRAMES), 500.0)
    with torch.no_grad():
        cache.begin_block(0, FRAMES)
        model(x, t, ctx, torch.arange(FRAMES), cache, inputs=inputs)
        cache.begin_block(FRAMES, FRAMES)
        got = counted(lambda: model(x, t, ctx, torch.arange(FRAMES, 2 * FRAMES), cache,
                                    inputs=inputs))  # fmt: skip
    want = model.forward_flops(FRAMES * tpf, 2 * FRAMES * tpf, tpf)
    return got, want


def _bidirectional_flops(model, ctx, inputs, channels):
    tpf = model.tokens_per_frame(HW)
    x = torch.randn(1, channels, FRAMES, *HW)
    got = counted(lambda: model(x, torch.full((1,), 500.0), ctx, inputs=inputs))
    return got, model.forward_flops(FRAMES * tpf, FRAMES * tpf, tpf)


def _agree(got, want, rel=0.02):
    assert set(want) == set(FLOP_PARTS)
    assert sum(want.values()) == pytest.approx(got, rel=rel)


def test_wan_count_is_the_floor_formula_and_what_runs():
    from flashdreams.model.wan import WanDiT

    model = _seeded(WanDiT(**TINY_WAN))
    ctx = model.prepare_context(torch.randn(1, 16, 32))
    got, want = _ar_flops(model, ctx, {}, 16)
    _agree(got, want)
    # the blocks' part is the Wan formula the floor used before models counted themselves
    d, ffn, layers, text, q, kv = 64, 128, 2, 16, FRAMES * 16, 2 * FRAMES * 16
    assert want["linear"] == 2 * q * (4 * d * d + 2 * d * d + 2 * d * ffn) * layers
    assert want["attention"] == 4 * q * kv * d * layers + 4 * q * text * d * layers


def test_wan_i2v_counts_the_image_cross_attention():
    from flashdreams.model.wan import WanDiT

    model = _seeded(WanDiT(**TINY_WAN, in_dim=36, image_dim=24))
    ctx = model.prepare_context(torch.randn(1, 16, 32), torch.randn(1, 257, 24))
    inputs = {"image_latents": torch.randn(1, 20, FRAMES, *HW)}
    _agree(*_bidirectional_flops(model, ctx, inputs, 16))


@pytest.mark.parametrize("mouse", [True, False])
def test_matrix_game_counts_its_action_modules(mouse):
    from flashdreams.model.matrix_game import MatrixGameDiT
    from tests.unit.test_matrix_game import SMALL

    model = _seeded(MatrixGameDiT(**SMALL, keyboard_dim=4, mouse_dim=2 if mouse else 0))
    ctx = model.prepare_context(None, torch.randn(1, 257, 16))
    inputs = {"image_latents": torch.randn(1, 20, FRAMES, *HW),
              "keyboard": torch.rand(1, FRAMES, 12, 4)}  # fmt: skip
    if mouse:
        inputs["mouse"] = torch.randn(1, FRAMES, 12, 2)
    got, want = _ar_flops(model, ctx, inputs, 16)
    _agree(got, want)
    # the action modules are in the count: a plain Wan of the same shape counts less
    tpf = model.tokens_per_frame(HW)
    action = model.blocks[0].action_model.flops(FRAMES * tpf, 2 * FRAMES * tpf, tpf)
    assert action["linear"] > 0 and action["attention"] > 0


def test_hy_worldplay_counts_both_branches():
    from flashdreams.model.hy_worldplay import HYWorldPlayDiT

    model = _seeded(HYWorldPlayDiT(**TINY_WAN, in_dim=16, out_dim=16, memory_points=100))
    ctx = model.prepare_context(torch.randn(1, 16, 32))
    eye = torch.eye(4).expand(1, FRAMES, 4, 4).clone()
    eye[..., :3, 3] = torch.randn(1, FRAMES, 3)
    inputs = {"action": torch.randint(0, 81, (1, FRAMES)), "viewmats": eye,
              "intrinsics": torch.eye(3).expand(1, FRAMES, 3, 3) * 0.5}  # fmt: skip
    _agree(*_bidirectional_flops(model, ctx, inputs, 16))


def test_cosmos_counts_its_adaln_lora():
    from flashdreams.model.cosmos import CosmosDiT

    model = _seeded(CosmosDiT(**TINY_COSMOS))
    ctx = model.prepare_context(torch.randn(1, 16, 48))
    _agree(*_ar_flops(model, ctx, {}, 16))


def test_omnidreams_counts_the_hdmap_embedding():
    from flashdreams.model.omnidreams import OmniDreamsDiT

    model = _seeded(OmniDreamsDiT(**TINY_COSMOS))
    ctx = model.prepare_context(torch.randn(1, 16, 48))
    _agree(*_ar_flops(model, ctx, {"hdmap": torch.randn(1, 16, FRAMES, *HW)}, 16))


def test_flashvsr_dense_and_sparse():
    from flashdreams.model.flashvsr import FlashVSRDiT
    from flashdreams.model.flashvsr.sparse import kept_fraction

    model = _seeded(FlashVSRDiT(**TINY_WAN))
    ctx = model.prepare_context(torch.randn(1, 16, 32))
    tpf = model.tokens_per_frame(HW)
    inputs = {"lr_features": torch.randn(1, 1, FRAMES * tpf, 64)}
    _agree(*_ar_flops(model, ctx, inputs, 16))
    # the release's sparse attention: at 768 x 1280 (48 x 80 tokens), 2 frames attending to
    # 8, ratio 2: the top-k of each query pair's (60 x 240) window scores is 7199 of 14400
    dense = FlashVSRDiT(**TINY_WAN).forward_flops(2 * 3840, 8 * 3840, 3840)
    sparse = FlashVSRDiT(**TINY_WAN, sparse_ratio=2.0).forward_flops(2 * 3840, 8 * 3840, 3840)
    assert kept_fraction(3840, 8 * 3840, 2.0) == pytest.approx(7199 / 14400)
    assert sparse["linear"] == dense["linear"]
    assert sparse["attention"] < 0.6 * dense["attention"]


def test_moe_counts_one_expert():
    from flashdreams.model.moe import WanMoE
    from flashdreams.model.wan import WanDiT

    moe = WanMoE(**TINY_WAN)
    assert moe.forward_flops(32, 64, 16) == WanDiT(**TINY_WAN).forward_flops(32, 64, 16)
