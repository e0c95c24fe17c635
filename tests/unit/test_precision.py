"""precision=fp8 on CPU: e4m3 quantization math, the emulated FP8 linear, the one-line fallback,
and the FP8 KV cache. The GPU kernel path (``torch._scaled_mm``) is in tests/gpu."""

import logging

import pytest
import torch
from torch import nn

from flashdreams import ConfigError
from flashdreams.build import build_rollout
from flashdreams.cache.rolling import RollingKVCache
from flashdreams.precision.base import Precision
from flashdreams.precision.fp8 import FP8, Fp8Linear, Fp8Precision, Fp8RowSlice, quantize_rowwise
from tests.unit.test_config import compose_run

E4M3_REL = 2.0**-4  # half-ulp of a 3-bit mantissa
E4M3_SUBNORMAL_STEP = 2.0**-9  # spacing of e4m3 subnormals (in units of the scale)


def _rows(m=33, k=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g) * torch.logspace(-3, 3, m)[:, None]  # rows of all sizes


def test_quantize_rowwise_scale_and_error_bound():
    x = _rows()
    q, scale = quantize_rowwise(x)
    assert q.dtype == FP8 and scale.shape == (33, 1) and scale.dtype == torch.float32
    torch.testing.assert_close(scale, x.abs().amax(-1, keepdim=True) / 448.0)
    assert torch.equal(q.float().abs().amax(-1), torch.full((33,), 448.0))  # full range used
    err = (q.float() * scale - x).abs()
    assert (err <= E4M3_REL * x.abs() + E4M3_SUBNORMAL_STEP * scale).all()
    zq, zs = quantize_rowwise(torch.zeros(2, 16))
    assert torch.equal(zq.float(), torch.zeros(2, 16)) and (zs > 0).all()  # no 0/0


def _independent_fp8_linear(x, weight, bias):
    """Per-row scaling written out from scratch: quantize both sides, dequantize, matmul."""
    sx = x.abs().amax(dim=1, keepdim=True) / 448.0  # (M, 1) per token
    sw = weight.abs().amax(dim=1, keepdim=True) / 448.0  # (N, 1) per output channel
    xq = (x / sx).to(torch.float8_e4m3fn).float() * sx
    wq = (weight / sw).to(torch.float8_e4m3fn).float() * sw
    return xq @ wq.T + bias


def test_emulated_fp8_linear_matches_dequantized_reference():
    g = torch.Generator().manual_seed(1)
    weight, bias = torch.randn(48, 64, generator=g), torch.randn(48, generator=g)
    x = torch.randn(2, 7, 64, generator=g)
    layer = Fp8Linear(weight, bias, backend="reference")
    assert layer.qweight.dtype == FP8 and layer.weight_scale.shape == (1, 48)
    assert layer.weight.dtype == torch.float32 and layer.weight.numel() == 0  # compute dtype
    out = layer(x)
    assert out.shape == (2, 7, 48)
    ref = _independent_fp8_linear(x.reshape(14, 64), weight, bias).reshape(2, 7, 48)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    exact = x @ weight.T + bias
    assert ((out - exact).norm() / exact.norm()).item() < 0.05  # e4m3 on both sides


def test_scaled_mm_backend_matches_reference_where_it_runs():
    g = torch.Generator().manual_seed(2)
    weight = torch.randn(32, 64, generator=g).bfloat16()
    bias = torch.randn(32, generator=g).bfloat16()
    x = torch.randn(5, 64, generator=g).bfloat16()
    kernel = Fp8Linear(weight, bias, backend="scaled_mm")
    try:
        out = kernel(x)
    except (RuntimeError, NotImplementedError) as err:  # builds without a CPU _scaled_mm
        pytest.skip(f"torch._scaled_mm does not run on CPU here: {err}")
    ref = Fp8Linear(weight, bias, backend="reference")(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)


def _latents(overrides, steps=2):
    rollout = build_rollout(compose_run(["rollout.total_blocks=2", *overrides]))
    rollout.start(["a prompt"])
    return [rollout.step().latents for _ in range(steps)], rollout


@pytest.fixture(scope="module")
def ref():
    return _latents([])[0]


def test_fp8_falls_back_on_cpu_with_one_line(caplog, ref):
    with caplog.at_level(logging.INFO, logger="flashdreams.precision"):
        got, rollout = _latents(["precision=fp8"])
    lines = [r for r in caplog.records if r.name.startswith("flashdreams.precision")]
    assert len(lines) == 1 and "no FP8 GEMMs" in lines[0].getMessage()
    assert "\n" not in lines[0].getMessage()
    assert not any(isinstance(m, Fp8Linear) for m in rollout.model.modules())
    assert rollout.precision.effective == "float32 (fp8 unavailable)"  # the stats.json header
    assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))


def test_emulated_fp8_swaps_only_block_linears(ref):
    got, rollout = _latents(["precision=fp8", "precision.emulate=true",
                             "precision.min_out_features=0"])  # fmt: skip
    model = rollout.model
    fp8 = [n for n, m in model.named_modules() if isinstance(m, Fp8Linear)]
    assert len(fp8) == 8 * model.num_layers  # fused qkv, o, cross q/k/v/o, ffn x2
    assert all(n.startswith("blocks.") for n in fp8)
    for block in model.blocks:
        assert (
            isinstance(block.self_attn.qkv, Fp8Linear)
            and block.self_attn.qkv.out_features == 3 * model.dim
        )
        assert isinstance(block.self_attn.q, Fp8RowSlice)
    plain = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    assert sorted(plain) == ["head.head", "text_embedding.0", "text_embedding.2",
                             "time_embedding.0", "time_embedding.2", "time_projection.1"]  # fmt: skip
    for a, b in zip(got, ref, strict=True):
        cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()
        assert 0.99 < cos < 1.0


def test_fused_slice_equals_its_rows():
    weight, bias = torch.randn(96, 32), torch.randn(96)
    fused = Fp8Linear(weight, bias, backend="reference")
    x = torch.randn(4, 32)
    torch.testing.assert_close(Fp8RowSlice(fused, 32, 64)(x), fused(x)[:, 32:64])


def _cache(kv_dtype):
    return RollingKVCache(window_frames=2, sink_frames=1, num_layers=1, num_heads=2,
                          head_dim=16, tokens_per_frame=4, frames_per_block=1, total_frames=6,
                          dtype=torch.float32, kv_dtype=kv_dtype)  # fmt: skip


def test_fp8_kv_cache_round_trip_error_bound():
    exact, fp8 = _cache(None), _cache(torch.float8_e4m3fn)
    assert fp8.k[0].dtype == FP8 and fp8.k_scale[0].shape == (1, 12, 2, 1)
    g = torch.Generator().manual_seed(3)
    for frame in range(5):  # fills, then wraps the window (overwrites evicted frames)
        k = torch.randn(1, 4, 2, 16, generator=g) * 10.0 ** (frame - 2)
        v = torch.randn(1, 4, 2, 16, generator=g)
        for cache in (exact, fp8):
            cache.begin_block(frame, 1)
        k_ref, v_ref = exact.update(0, k, v)
        k_got, v_got = fp8.update(0, k, v)
        assert k_got.dtype == torch.float32 and k_got.shape == k_ref.shape
        for got, ref in ((k_got, k_ref), (v_got, v_ref)):
            step = ref.abs().amax(-1, keepdim=True) / 448.0 * E4M3_SUBNORMAL_STEP
            assert ((got - ref).abs() <= E4M3_REL * ref.abs() + step).all(), frame


def test_bad_kv_cache_setting_is_one_line():
    with pytest.raises(ConfigError, match=r"^precision.kv_cache='int4' is not one of: null, fp8$"):
        Precision(kv_cache="int4")


def test_fp8_kv_cache_rollout_close_to_bf16_cache(ref):
    got, rollout = _latents(["precision.kv_cache=fp8"])
    assert rollout.cache.k[0].dtype == FP8
    for a, b in zip(got, ref, strict=True):
        assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.999


def test_fp8_cache_write_read_by_slot_index():  # the path a prompt switch's recache takes
    cache = _cache(torch.float8_e4m3fn)
    k, v = torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2, 16)
    index = torch.tensor([9, 1, 4, 0, 11, 2, 7, 5])
    cache.write(0, index, k, v)
    k_got, v_got = cache.read(0, index[[2, 0]])
    torch.testing.assert_close(k_got, k[:, [2, 0]], rtol=E4M3_REL, atol=1e-2)
    torch.testing.assert_close(v_got, v[:, [2, 0]], rtol=E4M3_REL, atol=1e-2)


def test_served_sessions_keep_the_fp8_kv_cache():
    """The server's per-session rollouts are assembled like the job's (fp8 cache included)."""
    from flashdreams.build import assemble_rollout, build_shared
    from flashdreams.serve.engine import spawn_rollout

    cfg = compose_run(["precision.kv_cache=fp8"])
    shared = build_shared(cfg)
    template = assemble_rollout(cfg, shared)
    session = spawn_rollout(shared, cfg, total_blocks=2)
    assert session.model is template.model and session.cache is not template.cache
    session.start(["a fox"])
    session.step()
    assert session.cache.k[0].dtype == FP8


def test_min_out_features_keeps_narrow_linears_in_bf16():
    """The recipe default: only GEMMs at least 3 x dim wide (fused QKV, FFN-up) go e4m3."""
    _, rollout = _latents(["precision=fp8", "precision.emulate=true"])
    model = rollout.model
    threshold = rollout.precision.min_out_features
    assert threshold == 3072  # the fp8.yaml default
    _, rollout = _latents(["precision=fp8", "precision.emulate=true",
                           f"precision.min_out_features={3 * model.dim}"])  # fmt: skip
    fp8 = {n.split(".", 2)[2] for n, m in rollout.model.named_modules()
           if isinstance(m, Fp8Linear)}  # fmt: skip
    wide_ffn = {"ffn.0"} if rollout.model.blocks[0].ffn[0].out_features >= 3 * model.dim else set()
    assert fp8 == {"self_attn.qkv", *wide_ffn}
    assert isinstance(rollout.model.blocks[0].cross_attn.o, torch.nn.Linear)


@pytest.mark.parametrize("overrides, expected", [
    (["graph=compile"], None),  # compiling leaves the process's fp32 matmul precision alone
    (["graph=compile_cuda_graph", "precision=fp8"], None),
    (["precision.tf32=true"], "high"),  # asked for: fp32 matmuls on TF32
    (["precision=fp8", "precision.tf32=true"], "high"),
])  # fmt: skip
def test_fp32_matmul_precision_changes_only_when_asked(overrides, expected):
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        build_rollout(compose_run(overrides))
        assert torch.get_float32_matmul_precision() == (expected or "highest")
    finally:
        torch.set_float32_matmul_precision(before)


def test_kernel_act_quant_folds_the_ffn_gelu_and_keeps_the_output():
    """``precision.act_quant=kernel``: every block FP8 linear quantizes its input in one pass and
    the FFN's GELU(tanh) moves into ffn.2's pass; off CUDA that pass is the same torch ops, so
    the latents equal the ``inductor`` setting's exactly."""
    base = ["precision=fp8", "precision.emulate=true", "precision.min_out_features=0"]
    want, _ = _latents(base)
    got, rollout = _latents([*base, "precision.act_quant=kernel"])
    for block in rollout.model.blocks:
        assert isinstance(block.ffn[1], nn.Identity) and block.ffn[2].act == "gelu_tanh"
        assert block.ffn[0].act == "none" and block.ffn[0].act_kernel
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    got, rollout = _latents([*base, "precision.act_quant=ffn"])  # only the FFN's GELU pass
    block = rollout.model.blocks[0]
    assert (
        block.ffn[2].act_kernel
        and not block.ffn[0].act_kernel
        and not block.self_attn.qkv.act_kernel
    )
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    with pytest.raises(
        ConfigError, match=r"^precision.act_quant='fused' must be inductor, ffn or kernel$"
    ):
        Fp8Precision(act_quant="fused")


def test_cosmos_mlp_gelu_folds_through_its_act_chain():
    """The Cosmos block's MLP declares (layer1, act, layer2): its exact GELU folds into layer2."""
    from flashdreams.model.cosmos.dit import CosmosBlock
    from flashdreams.precision.fp8 import fold_activations, quantize_blocks

    owner = nn.Module()
    owner.blocks = nn.ModuleList([CosmosBlock(64, 32, 4, 256, 16, 1e-6, 1e-6)])
    mlp = owner.blocks[0].mlp
    h = torch.randn(2, 5, 64)
    quantize_blocks(owner, "reference")
    want = mlp.layer2(mlp.act(mlp.layer1(h)))
    assert fold_activations(owner) == 1
    assert isinstance(mlp.act, nn.Identity) and mlp.layer2.act == "gelu"
    torch.testing.assert_close(mlp.layer2(mlp.act(mlp.layer1(h))), want, rtol=0, atol=0)
