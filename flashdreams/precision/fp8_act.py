"""A linear's input quantized to e4m3 per row in one pass, with the activation before it folded in.

``Fp8Linear`` quantizes its input per token (``quantize_rowwise``: abs, amax, divide, clamp,
cast). Under ``torch.compile`` Inductor fuses that into the op producing the input, but as a
looped reduction that reads each row twice, and where the producer is a GELU it evaluates the
GELU twice: the H200 profiles show the GELU + quantize of an FFN's 8192- to 14336-wide rows at
4-7x their bytes' time. ``quant_act_rows`` holds each row in registers (one read, one write of
e4m3 and one fp32 scale per row) and applies the activation first (``gelu`` or ``gelu_tanh``),
so the FFN's hidden state is read once after its first GEMM.

The math is the unfused modules' step by step: the activation in fp32 of the stored input,
rounded to the input's dtype (the GELU module's output), then ``quantize_rowwise``. Without CUDA
or Triton the op runs exactly those torch ops (the reference of the GPU and interpreter tests).
It is a custom op, so compiled regions call the kernel whole.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flashdreams.kernels import cuda_kernels, next_pow2, triton_kernels
from flashdreams.precision.fp8 import _EPS, FP8, FP8_MAX, quantize_rowwise

ACTS = {"none": 0, "gelu": 1, "gelu_tanh": 2}  # the activation before the linear


@triton_kernels
def kernels(triton, tl):
    @triton.jit
    def _act(x, ACT: tl.constexpr):
        """The activation in fp32, rounded to the input dtype (the module's output), as fp32."""
        if ACT != 0:
            f = x.to(tl.float32)
            if ACT == 1:  # exact GELU
                f = 0.5 * f * (1.0 + tl.erf(f * 0.7071067811865476))
            else:  # tanh GELU; tanh(u) = 2 sigmoid(2 u) - 1
                u = 0.7978845608028654 * (f + 0.044715 * f * f * f)
                f = f * tl.sigmoid(2.0 * u)  # 0.5 f (1 + tanh(u))
            x = f.to(x.dtype)
        return x.to(tl.float32)

    @triton.jit
    def act_quant_rows(x_ptr, q_ptr, s_ptr, rows, cols, x_row, eps, qmax, ACT: tl.constexpr,
                       BLOCK_R: tl.constexpr, C0: tl.constexpr, C1: tl.constexpr,
                       C2: tl.constexpr):  # fmt: skip
        # a row is held as up to three power-of-two pieces [0, C0), [C0, C0 + C1), [C0 + C1, ...)
        # (C1, C2 = 0: absent), so a width such as 8960 or 14336 fills its lanes
        r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        live = r < rows
        c0 = tl.arange(0, C0)
        m0 = live[:, None] & (c0 < cols)[None, :]
        x0 = _act(tl.load(x_ptr + r[:, None] * x_row + c0[None, :], mask=m0, other=0.0), ACT)
        amax = tl.max(tl.abs(x0), 1)
        if C1 > 0:
            c1 = C0 + tl.arange(0, C1)
            m1 = live[:, None] & (c1 < cols)[None, :]
            x1 = _act(tl.load(x_ptr + r[:, None] * x_row + c1[None, :], mask=m1, other=0.0), ACT)
            amax = tl.maximum(amax, tl.max(tl.abs(x1), 1))
        if C2 > 0:
            c2 = C0 + C1 + tl.arange(0, C2)
            m2 = live[:, None] & (c2 < cols)[None, :]
            x2 = _act(tl.load(x_ptr + r[:, None] * x_row + c2[None, :], mask=m2, other=0.0), ACT)
            amax = tl.maximum(amax, tl.max(tl.abs(x2), 1))
        # divided by the scale as quantize_rowwise does: the same bits but for the division's
        # ties (a reciprocal multiply changed 0.12-0.16 % of them and saved 2-3 % on the H200)
        scale = (tl.maximum(amax, eps) / qmax)[:, None]
        out = q_ptr.dtype.element_ty
        tl.store(q_ptr + r[:, None] * cols + c0[None, :],
                 tl.clamp(x0 / scale, -qmax, qmax).to(out), mask=m0)  # fmt: skip
        if C1 > 0:
            tl.store(q_ptr + r[:, None] * cols + c1[None, :],
                     tl.clamp(x1 / scale, -qmax, qmax).to(out), mask=m1)  # fmt: skip
        if C2 > 0:
            tl.store(q_ptr + r[:, None] * cols + c2[None, :],
                     tl.clamp(x2 / scale, -qmax, qmax).to(out), mask=m2)  # fmt: skip
        tl.store(s_ptr + r[:, None], scale, mask=live[:, None])

    return act_quant_rows


# row width -> (rows per program, warps), where a sweep (scripts/bench_act_quant.py --sweep)
# found better than the built-in choice
TUNE: dict[int, tuple[int, int]] = {}
SPLIT_ROWS = True  # rows padded past 1.5x as up to three pieces (False: one tile; benchmarks)


def pieces(cols: int) -> tuple[int, int, int]:
    """A row's widths as up to three powers of two (0: absent). A row whose power-of-two tile
    would be over 1.5x its width is split so its lanes are filled: 8960 -> (8192, 512, 256)
    (H200: 51.9 -> 36.6 us at Matrix-Game's FFN-down input); others stay one tile, the split
    being no faster there (14336: 69.4 us as one tile, 84.7 in three pieces)."""
    if not SPLIT_ROWS or next_pow2(cols) * 2 <= cols * 3:
        return next_pow2(cols), 0, 0
    c0 = 1 << (cols.bit_length() - 1)
    rest = cols - c0
    if rest == 0:
        return c0, 0, 0
    c1 = 1 << (rest.bit_length() - 1)
    rest -= c1
    return c0, c1, next_pow2(rest) if rest else 0


def config(cols: int) -> tuple[int, tuple[int, int, int], int]:
    """(rows per program, row pieces, warps): about 32 fp32 values per thread."""
    split = pieces(cols)
    lanes = sum(split)
    if cols in TUNE:
        return TUNE[cols][0], split, TUNE[cols][1]
    block_r = max(1, 2048 // split[0])
    return block_r, split, min(16, max(4, next_pow2(block_r * lanes // 1024)))


def _reference(x: torch.Tensor, act: str) -> tuple[torch.Tensor, torch.Tensor]:
    if act != "none":
        x = F.gelu(x, approximate="tanh" if act == "gelu_tanh" else "none")
    return quantize_rowwise(x)


@torch.library.custom_op("flashdreams::quant_act_rows", mutates_args=())
def quant_act_rows(x: torch.Tensor, act: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_rowwise(act(x))`` of (M, K) rows: e4m3 (M, K) and fp32 scales (M, 1).

    ``act``: ``none``, ``gelu`` or ``gelu_tanh`` (computed in fp32, rounded to x's dtype)."""
    if act not in ACTS:
        raise ValueError(f"activation {act!r} is not one of {sorted(ACTS)}")
    k = cuda_kernels(kernels, x)
    if k is None or x.dim() != 2:
        return _reference(x, act)
    x = x if x.stride(-1) == 1 else x.contiguous()
    rows, cols = x.shape
    q = torch.empty(rows, cols, device=x.device, dtype=FP8)
    scale = torch.empty(rows, 1, device=x.device, dtype=torch.float32)
    block_r, (c0, c1, c2), warps = config(cols)
    k[(-(-rows // block_r),)](x, q, scale, rows, cols, x.stride(0), _EPS, FP8_MAX, ACT=ACTS[act],
                              BLOCK_R=block_r, C0=c0, C1=c1, C2=c2, num_warps=warps)  # fmt: skip
    return q, scale


@quant_act_rows.register_fake
def _(x, act):
    return x.new_empty(x.shape, dtype=FP8), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)
