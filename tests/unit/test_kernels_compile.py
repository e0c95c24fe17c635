"""Every Triton kernel compiles to machine code for the GPUs users run, on a machine without one.

The ops are called as a GPU run calls them (the fused norms at the 1.3B and 14B block widths in
each variant the blocks use, q/k RoPE at 12 and 40 heads, the split-KV merge, the K/V row
scatter, the FP8 passes) with Triton's launch replaced by its ahead-of-time compile for a target
architecture: sm80 (A100), sm89 (L40S, RTX 4090), sm90 (H100, H200), sm100 (B200). A kernel
that would not compile there fails here, in CI, before any GPU run. The FP8 passes are compiled
from sm89 on (e4m3 casts; their only caller, ``attention=cudnn_fp8``, needs sm90). What the
kernels compute is checked by ``test_kernels_interpreted.py``; how fast, on a GPU.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton", minversion="3.8")
BF16 = torch.bfloat16


ARCHS = [80, 89, 90, 100]  # CUDA compute capabilities, as Triton's targets name them


class _Target:
    """Triton's view of the active device, minus the device: a target for compiles."""

    def __init__(self, arch: int) -> None:
        self.arch = arch

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", self.arch, 32)


class _Compiled(list):
    """The kernels compiled so far, for ``arch``."""

    arch: int


@pytest.fixture(params=ARCHS, ids=[f"sm{a}" for a in ARCHS])
def compiled(request, monkeypatch) -> _Compiled:
    """Kernel launches compile for the architecture and do not run; returns the kernels."""
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    from flashdreams.attention import split_kv
    from flashdreams.cache import scatter
    from flashdreams.model import fused_norms, fused_rope
    from flashdreams.model.matrix_game import fused as action_fused
    from flashdreams.precision import fp8_act, fp8_tensor

    done = _Compiled()
    done.arch = request.param

    def compile_only(self, grid):
        def launch(*args, **kwargs):
            done.append(self.run(*args, grid=grid, warmup=True, **kwargs))

        return launch

    monkeypatch.setattr(JITFunction, "__getitem__", compile_only)
    monkeypatch.setattr(driver, "_active", _Target(request.param))
    for module in (fused_norms, fused_rope, split_kv, scatter, fp8_tensor, fp8_act, action_fused):
        monkeypatch.setattr(module, "cuda_kernels", lambda kernels, *tensors: kernels())
    return done


@pytest.mark.parametrize("width", [1536, 5120])  # whole rows; 14B: add_norm in 1024-col chunks
def test_norm_kernels_compile(compiled, width):
    from flashdreams.model import fused_norms as fused

    x, y = torch.randn(1, 24, width), torch.randn(1, 24, 2 * width, dtype=BF16)[..., width:]
    e0, table, nxt = torch.randn(1, 3, 6, width), torch.randn(1, 6, width), torch.randn(1, 6, width)
    w, b = torch.randn(width), torch.randn(width)
    fused.norm_modulate(x, None, None, e0, table, 0, 1, 1e-6, BF16)  # norm1
    fused.add_norm(x, y, e0, table, -1, None, None, 3, 4, 1e-6, BF16)  # norm2
    fused.add_norm(x, y, e0, table, 2, w, b, -1, -1, 1e-6, BF16)  # norm3
    fused.add_norm(x, y, e0, table, 5, None, None, 0, 1, 1e-6, BF16, nxt)  # FFN + next norm1
    fused.gated_add(x, y, e0, table, 5)
    assert len(compiled) == 5 and all(k.asm.get("cubin") for k in compiled)
    chunked = [k.name.endswith("chunked") for k in compiled]
    assert chunked == ([False] * 5 if width == 1536 else [False, True, True, True, True])


@pytest.mark.parametrize("heads", [12, 40])
def test_rope_and_cache_kernels_compile(compiled, heads):
    from flashdreams.attention import split_kv
    from flashdreams.cache import scatter
    from flashdreams.model import fused_rope
    from flashdreams.model.layers import Rope3D
    from flashdreams.precision import fp8_tensor

    width = 128 * heads
    qkv = torch.randn(1, 24, 3 * width, dtype=BF16)
    q, k, v = qkv.split(width, dim=-1)
    cos, sin = Rope3D(128).cos_sin(torch.arange(3), 2, 4)
    fused_rope.qk_norm_rope(q, k, torch.ones(width), torch.ones(width), cos, sin, heads, 1e-6)
    cache = torch.zeros(1, 40, heads, 128, dtype=BF16)
    scatter.write_rows(cache, torch.arange(24), v.unflatten(-1, (heads, 128)))
    split_kv.merge(torch.randn(2, heads, 24, 128, dtype=BF16), torch.randn(2, heads, 24), 2, BF16)
    fp8_tensor.running_amax(torch.zeros(1), v)  # the KV cache's running bound (strided rows)
    fp8_tensor.running_amax(torch.zeros(1), cache)  # contiguous
    num = 5
    if compiled.arch >= 89:  # e4m3
        fp8_tensor.quantize_tensor_device(v.unflatten(-1, (heads, 128)))  # amax + quant rows
        fp8_tensor.quantize_tensor_device(cache)  # amax + quant flat
        fp8_tensor.dequantize_tensor(cache.to(torch.float8_e4m3fn), torch.ones(1), BF16)
        mean = torch.zeros(1, 1, heads, 128)  # FP8 attention's smoothing: K/V means taken off
        fp8_tensor.quantize_tensor_device(cache, offset=mean)  # amax + quant rows, with offset
        num += 7
    assert len(compiled) == num and all(k.asm.get("cubin") for k in compiled)


@pytest.mark.parametrize("width", [2048, 8960, 14336])  # QKV in; Matrix-Game, HY FFN-down in
def test_fp8_input_quantization_compiles(compiled, width):
    from flashdreams.precision.fp8_act import quant_act_rows

    if compiled.arch < 89:
        pytest.skip("e4m3 casts need sm89+")
    x = torch.randn(24, width, dtype=BF16)
    for act in ("none", "gelu", "gelu_tanh"):
        quant_act_rows(x, act)
    assert len(compiled) == 3 and all(k.asm.get("cubin") for k in compiled)


def test_action_kernels_compile(compiled):
    """Matrix-Game's action kernels at the released shape (16 heads of 64 dims, 880 tokens per
    frame): q/k norm + RoPE from the fused projection, q alone, the mouse attention over a
    cache window, the keyboard attention under a frame mask."""
    from flashdreams.model.matrix_game import fused
    from flashdreams.model.matrix_game.action import FrameRope

    heads, d, tpf = 16, 64, 880
    q, k, v = torch.randn(1, 3 * tpf, 3, heads, d, dtype=BF16).unbind(2)
    cos, sin = FrameRope(d).cos_sin(torch.arange(3))
    fused.head_norm_rope(q, k, cos, sin, 1e-6)
    fused.head_norm_rope(q, None, cos, sin, 1e-6)
    cache = torch.zeros(1, 6 * tpf, heads, d, dtype=BF16)
    qf, kc = q.unflatten(1, (3, tpf)), cache.unflatten(1, (6, tpf))
    fused.frame_attention(qf, kc, kc)
    keys = torch.zeros(1, 6, 1, heads, d, dtype=BF16)
    fused.frame_attention(qf, keys, keys, torch.ones(3, 6, dtype=torch.bool))
    assert len(compiled) == 4 and all(kernel.asm.get("cubin") for kernel in compiled)
