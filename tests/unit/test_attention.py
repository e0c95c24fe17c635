"""Attention backends: FlexAttention (block-sparse masked) and optional FlashAttention packages.

Tolerance: fp32, max abs error <= 1e-5 against masked SDPA (the math is the same softmax).
"""

from __future__ import annotations

import logging

import pytest
import torch

from flashdreams import ConfigError
from flashdreams.attention.flash_attn import FlashAttnAttention, find_flash_attn
from flashdreams.attention.flex import FlexAttention
from flashdreams.attention.sdpa import SdpaAttention


def _qkv(lq=300, lk=300, heads=4, dim=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(2, n, heads, dim, generator=gen) for n in (lq, lk, lk))


def _block_causal(frames_per_block: list[int], tokens_per_frame: int) -> torch.Tensor:
    ids = torch.cat(
        [torch.full((f * tokens_per_frame,), i) for i, f in enumerate(frames_per_block)]
    )
    return ids[None, :] <= ids[:, None]


def test_flex_masked_equals_sdpa_and_skips_masked_tiles():
    mask = _block_causal([1, 3, 3, 3], 30)  # 300 tokens, blocks not aligned to the 128 tile
    q, k, v = _qkv()
    flex = FlexAttention(block_size=128)
    out = flex(q, k, v, mask)
    ref = SdpaAttention()(q, k, v, mask)
    assert (out - ref).abs().max() <= 1e-5
    block_mask = flex.block_mask(mask)
    assert flex.block_mask(mask) is block_mask  # built once per mask
    tiles = block_mask.kv_num_blocks.sum() + (
        block_mask.full_kv_num_blocks.sum() if block_mask.full_kv_num_blocks is not None else 0
    )
    assert tiles < 3 * 3  # the upper-right tile of the 3 x 3 grid is never visited


def test_flex_rectangular_mask_and_unmasked_path():
    q, k, v = _qkv(lq=90, lk=270, seed=1)
    mask = torch.ones(90, 270, dtype=torch.bool)
    mask[:, 200:] = False
    flex = FlexAttention()
    ref = SdpaAttention()(q, k, v, mask)
    assert (flex(q, k, v, mask) - ref).abs().max() <= 1e-5
    assert torch.equal(flex(q, k, v), SdpaAttention("cudnn")(q, k, v))  # unmasked: pinned SDPA


def test_flex_in_the_model_masked_forward():
    from flashdreams.model.wan import WanDiT

    model = WanDiT(dim=64, num_heads=4, num_layers=2, ffn_dim=128, text_dim=32, text_len=8).eval()
    model.init_weights(torch.Generator().manual_seed(0))
    x = torch.randn(1, 16, 3, 4, 4)
    t = torch.tensor([[0.0, 500.0, 500.0]])
    ctx = model.prepare_context(torch.randn(1, 8, 32))
    mask = _block_causal([1, 2], 4)
    with torch.no_grad():
        ref = model(x, t, ctx, torch.arange(3), mask=mask)
        model.attention = FlexAttention(block_size=16)
        out = model(x, t, ctx, torch.arange(3), mask=mask)
    assert (out - ref).abs().max() <= 1e-5


def test_flash_attn_missing_package_falls_back_with_one_line(caplog):
    q, k, v = _qkv(lq=64, lk=64)
    with caplog.at_level(logging.INFO, logger="flashdreams.attention.flash_attn"):
        attn = FlashAttnAttention(version="auto")
        if attn.package is not None:
            pytest.skip(f"{attn.package} is installed here")
        out = attn(q, k, v)
        attn(q, k, v)
    assert torch.equal(out, SdpaAttention("cudnn")(q, k, v))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "no flash-attn package" in lines[0]
    assert find_flash_attn("2") == (None, None) or find_flash_attn("2")[0] == "flash-attn 2"


def test_flash_attn_bad_version_is_one_line():
    with pytest.raises(ConfigError, match="attention.version='5'"):
        FlashAttnAttention(version="5")


# --- split-KV attention (attention.kv_splits): the keys in equal chunks, one batched launch ---


@pytest.mark.parametrize("splits", [2, 3, 5])
def test_split_kv_equals_one_call(splits):
    from flashdreams.attention.split_kv import split_kv_attention

    q, k, v = _qkv(lq=200, lk=600)
    out = split_kv_attention(q, k, v, splits)
    assert out.shape == q.shape
    assert (out - SdpaAttention()(q, k, v)).abs().max() <= 1e-5


def test_split_kv_rejects_uneven_chunks():
    from flashdreams.attention.split_kv import split_kv_attention

    q, k, v = _qkv(lq=10, lk=301)
    with pytest.raises(ValueError, match="301 keys do not split into 2"):
        split_kv_attention(q, k, v, 2)


def test_choose_splits_fills_the_last_wave():
    from flashdreams.attention.split_kv import choose_splits

    # Self-Forcing 1.3B: 12 heads x 37 query tiles = 444 tiles on 132 SMs (3.36 waves, 84 % full)
    assert choose_splits(1, 12, 4680, 32760, 132) == 2  # 888 tiles: 6.7 waves, 96 % full
    assert choose_splits(1, 12, 4680, 4680, 132) == 2
    assert choose_splits(1, 12, 4680, 3120, 132) == 1  # chunks would be < 2048 keys
    assert choose_splits(1, 12, 32760, 32760, 132) == 1  # 3072 tiles: 23.3 waves, nothing to gain
    assert choose_splits(1, 11, 1536, 8192, 132) == 1  # 132 tiles: exactly one full wave
    assert choose_splits(1, 40, 4680, 32760, 132) == 1  # 14B: 0.93 full; 3 chunks measured slower


def test_kv_splits_setting_is_checked_and_routed():
    attn = SdpaAttention("cudnn", kv_splits=2)
    assert attn.name == "sdpa_cudnn_split2"
    q, k, v = _qkv(lq=40, lk=100)
    assert attn.splits_for(q, k) == 1  # CPU: one plain call
    assert torch.equal(attn(q, k, v), SdpaAttention("cudnn")(q, k, v))
    with pytest.raises(ConfigError, match="attention.kv_splits=0"):
        SdpaAttention("cudnn", kv_splits=0)
    with pytest.raises(ConfigError, match="attention.kv_splits='some'"):
        SdpaAttention("cudnn", kv_splits="some")
    with pytest.raises(ConfigError, match="needs attention.backend=cudnn"):
        SdpaAttention("math", kv_splits=2)
    with pytest.raises(ConfigError, match="attention.kv_splits=9"):
        FlashAttnAttention("auto", kv_splits=9)


def test_flash_attn_package_error_falls_back_per_shape_with_one_line(caplog):
    attn = FlashAttnAttention("2")
    calls = []

    def declines(q, k, v, **kw):
        calls.append(q.shape)
        raise AssertionError("head_dim 48 is not supported on this GPU\nsecond line")

    attn.package, attn._func = "flash-attn 4", declines
    attn._declines = lambda q, mask: None  # as on a GPU: the package is asked first
    q, k, v = _qkv(lq=50, lk=80)
    with caplog.at_level(logging.INFO, logger="flashdreams.attention.flash_attn"):
        out = attn(q, k, v)
        again = attn(q, k, v)
    assert torch.equal(out, SdpaAttention("cudnn")(q, k, v)) and torch.equal(again, out)
    assert len(calls) == 1  # the shape is remembered: the package is not asked again
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "cannot run q [2, 50, 4, 32] over 80 keys" in lines[0]
    assert "AssertionError: head_dim 48 is not supported on this GPU" in lines[0]
    assert "second line" not in lines[0]


def test_flash_attn_min_keys_sends_short_calls_to_sdpa():
    attn = FlashAttnAttention("2", min_keys=64)
    calls = []
    attn.package, attn._func = "flash-attn 4", lambda q, k, v, **kw: calls.append(k.shape[1]) or q
    attn._declines = lambda q, mask: None  # as on a GPU: the package is asked first
    q, k, v = _qkv(lq=50, lk=40)
    assert torch.equal(attn(q, k, v), SdpaAttention("cudnn")(q, k, v)) and calls == []
    q, k, v = _qkv(lq=50, lk=80)
    assert attn(q, k, v) is q and calls == [80]  # 80 keys >= 64: the package's kernel
    with pytest.raises(ConfigError, match="attention.min_keys=-1"):
        FlashAttnAttention("2", min_keys=-1)


def test_fast_attention_composes_in_the_streaming_recipes():
    from hydra.utils import instantiate

    from tests.unit.test_config import compose_run

    for recipe in ("self_forcing_wan21_t2v_1_3b_taehv", "causal_forcing_wan21_t2v_1_3b_framewise",
                   "lingbot_world_fast", "causal_wan22_a14b_480p"):  # fmt: skip
        cfg = compose_run([f"recipe={recipe}"])
        assert cfg.attention.kv_splits == "auto" and str(cfg.attention.version) == "4"
        attn = instantiate(cfg.attention)
        assert isinstance(attn, FlashAttnAttention) and attn.sdpa.backend == "cudnn"
        q, k, v = _qkv(lq=30, lk=60)  # CPU: SDPA, unsplit
        assert torch.equal(attn(q, k, v), SdpaAttention()(q, k, v))


def _cosmos_128(dtype=torch.bfloat16):
    """A small Cosmos DiT at the 2B's head size (128) in the run's dtype, and its inputs."""
    from flashdreams.io.checkpoint import materialize
    from flashdreams.model.cosmos import CosmosDiT

    with torch.device("meta"):
        model = CosmosDiT(dim=256, num_heads=2, num_layers=2, ffn_dim=512, text_dim=48,
                          context_dim=64, adaln_lora_dim=16, text_len=16)  # fmt: skip
    model = materialize(model, None, "cpu", dtype, seed=0).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 2, 8, 8, generator=gen)  # 2 x 4 x 4 = 32 tokens
    return model, x, torch.randn(1, 16, 48, generator=gen, dtype=dtype)


@pytest.mark.parametrize("min_keys, cross_to_package", [(0, True), (32, False)])
def test_cosmos_self_attention_takes_flash_attn_4_and_short_calls_fall_back(
    min_keys, cross_to_package
):
    """attention=fast on the Cosmos DiT (issue 24): every self-attention call reaches the
    flash-attn 4 kernel unmasked, bf16, (B, L, H, 128) with the last dim packed; the text
    cross-attention (16 keys) reaches it only from ``min_keys`` keys on (32 here: the self-attention
    has 32), else SDPA runs it."""
    from hydra.utils import instantiate

    from tests.unit.test_config import compose_run

    cfg = compose_run(["recipe=cosmos_predict2_5_2b_t2v", "attention=fast",
                       f"attention.min_keys={min_keys}"])  # fmt: skip
    attn = instantiate(cfg.attention)
    calls = []

    def kernel(q, k, v, **kw):  # stands in for flash_attn.cute.flash_attn_func
        calls.append((tuple(q.shape), tuple(k.shape), q.dtype, k.dtype, v.dtype,
                      q.stride(-1), k.stride(-1), v.stride(-1)))  # fmt: skip
        return SdpaAttention("math")(q, k, v), None

    attn.package, attn._func, attn.kv_splits = "flash-attn 4", kernel, 1
    attn._declines = lambda q, mask: None if mask is None else "masked"  # as on a CUDA device
    model, x, text = _cosmos_128()
    t = torch.tensor([500.0])
    with torch.no_grad():
        ctx = model.prepare_context(text)
        ref = model(x, t, ctx)  # the model's default SDPA
        model.attention = attn
        out = model(x, t, ctx)
    bf16 = torch.bfloat16
    self_call = ((1, 32, 2, 128), (1, 32, 2, 128), bf16, bf16, bf16, 1, 1, 1)
    cross_call = ((1, 32, 2, 128), (1, 16, 2, 128), bf16, bf16, bf16, 1, 1, 1)
    assert calls == ([self_call, cross_call] * 2 if cross_to_package else [self_call] * 2)
    assert (out.float() - ref.float()).abs().max() <= 2e-2 * ref.float().abs().max()


def test_cosmos_without_flash_attn_4_runs_sdpa_logged_once(caplog):
    """FA4 absent (this CPU image): attention=fast on the Cosmos DiT logs one line and equals
    SDPA exactly."""
    attn = FlashAttnAttention("4", kv_splits="auto")
    if attn.package is not None:
        pytest.skip(f"{attn.package} is installed here")
    model, x, text = _cosmos_128(torch.float32)
    t = torch.tensor([500.0])
    with torch.no_grad(), caplog.at_level(logging.INFO, "flashdreams.attention.flash_attn"):
        ctx = model.prepare_context(text.float())
        model.attention = SdpaAttention("cudnn")
        ref = model(x, t, ctx)
        model.attention = FlashAttnAttention("4", kv_splits="auto")
        out = model(x, t, ctx)
        model(x, t, ctx)
    assert torch.equal(out, ref)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "no flash-attn package (version 4)" in lines[0]
