"""FP8 GEMMs and block offloading on a GPU (skipped without CUDA; FP8 needs sm89+).

Tolerances: a DiT forward with e4m3 block GEMMs keeps cosine >= 0.99 with the bf16 forward
at a mid-size shape (the 1.3B model's width, 4 layers, one 3-frame 480x832 block); streamed
blocks give the resident model's latents to 1e-6 relative error (same kernels, same weights).
"""

import pytest
import torch

from flashdreams.build import build_model, build_rollout
from flashdreams.precision.fp8 import Fp8Linear, fp8_supported, quantize_blocks
from flashdreams.quality import cosine
from tests.gpu.test_graph_policies import BASE
from tests.unit.test_config import compose_run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
needs_fp8 = pytest.mark.skipif(
    not torch.cuda.is_available() or not fp8_supported("cuda"),
    reason="needs CUDA compute capability >= 8.9 (FP8 GEMMs)",
)
CUDA = torch.device("cuda")
MID = ["model.dim=1536", "model.num_heads=12", "model.num_layers=4", "model.ffn_dim=8960",
       "model.text_dim=4096", "model.text_len=512"]  # fmt: skip


@needs_fp8
def test_scaled_mm_matches_dequantized_reference():
    g = torch.Generator(device="cuda").manual_seed(0)
    weight = torch.randn(8960, 1536, device=CUDA, generator=g, dtype=torch.bfloat16) / 40
    bias = torch.randn(8960, device=CUDA, generator=g, dtype=torch.bfloat16)
    x = torch.randn(2, 4680, 1536, device=CUDA, generator=g, dtype=torch.bfloat16)
    kernel = Fp8Linear(weight, bias, "scaled_mm")(x)
    ref = Fp8Linear(weight, bias, "reference")(x)
    assert kernel.dtype == torch.bfloat16 and kernel.shape == (2, 4680, 8960)
    assert cosine(kernel, ref) > 0.9999
    assert cosine(kernel, torch.nn.functional.linear(x, weight, bias)) > 0.999


@needs_fp8
@pytest.mark.parametrize("timestep", [1000.0, 625.0, 0.0])
def test_fp8_dit_forward_cosine(timestep):
    cfg = compose_run(MID)
    bf16 = build_model(cfg.model, CUDA, torch.bfloat16, seed=0)
    g = torch.Generator(device="cuda").manual_seed(1)
    text = torch.randn(1, 512, 4096, device=CUDA, generator=g, dtype=torch.bfloat16)
    x = torch.randn(1, 16, 3, 60, 104, device=CUDA, generator=g)  # one 480x832 block
    t = torch.full((1,), timestep, device=CUDA)
    with torch.no_grad():
        ref = bf16(x, t, bf16.prepare_context(text))
        model = build_model(cfg.model, CUDA, torch.bfloat16, seed=0)
        # per block: self q/k/v (one fused QKV) + o, cross q/k/v/o, FFN up/down
        assert quantize_blocks(model, "scaled_mm") == 10 * 4
        got = model(x, t, model.prepare_context(text))
    assert cosine(got, ref) >= 0.99


def _latents(overrides, steps=3):
    rollout = build_rollout(compose_run(BASE + ["rollout.total_blocks=3", *overrides]))
    rollout.start(["a prompt"])
    rollout.precapture()
    return [rollout.step().latents.float() for _ in range(steps)], rollout


@needs_fp8
@pytest.mark.parametrize("graph", ["eager", "compile", "cuda_graph", "compile_cuda_graph"])
def test_fp8_rollout_close_to_bf16(graph):
    ref, _ = _latents(["graph=eager"])
    got, rollout = _latents([f"graph={graph}", "precision=fp8", "precision.min_out_features=0"])
    assert any(isinstance(m, Fp8Linear) for m in rollout.model.modules())
    for block, (a, b) in enumerate(zip(got, ref, strict=True)):
        assert cosine(a, b) >= 0.99, f"block {block} graph={graph}"


def test_fp8_kv_cache_close_to_bf16():
    ref, _ = _latents([])
    got, rollout = _latents(["precision.kv_cache=fp8"])
    assert rollout.cache.k[0].dtype == torch.float8_e4m3fn
    for a, b in zip(got, ref, strict=True):
        assert cosine(a, b) >= 0.99


def test_offload_equals_resident_and_frees_the_device():
    ref, resident = _latents([])
    resident_bytes = sum(p.numel() * p.element_size() for p in resident.model.blocks.parameters())
    del resident
    torch.cuda.empty_cache()
    got, rollout = _latents(["offload=blocks"])
    off = rollout.offloader
    assert off.host_bytes == resident_bytes and off.slot_bytes < resident_bytes
    assert all(t.is_pinned() for ts in off.host for t in ts)
    for a, b in zip(got, ref, strict=True):
        assert ((a - b).norm() / b.norm()).item() <= 1e-6
