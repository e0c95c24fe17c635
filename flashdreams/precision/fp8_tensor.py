"""Per-tensor e4m3 quantization (one fp32 scale for a whole tensor), on the device, no host sync.

What FP8 attention kernels with per-tensor scales take (cuDNN's FP8 SDPA). On CUDA the passes
are Triton kernels: an amax reduction (``running_amax``, an atomic max into a device scalar, so
it can also keep a running bound over many writes) and a scale + cast that reads the amax from
the device. ``quantize_tensor`` is the same math in torch ops (CPU, reference).
"""

from __future__ import annotations

import torch

from flashdreams.kernels import batched_rows, cuda_kernels, triton_kernels
from flashdreams.precision.fp8 import _EPS, FP8, FP8_MAX, dequantize

_FLAT_BLOCK = 8192  # elements per program of the flat (contiguous) kernels
# tile of the strided kernels: an H200 sweep at the K/V shapes of HY-WorldPlay, OmniDreams and
# Self-Forcing put 4 x 1024 at 0-11 % faster than 16 x 256 (benchmarks/2026-12-03_h200_s17)
_ROWS, _COLS = 4, 1024


def quantize_tensor(
    x: torch.Tensor, amax: torch.Tensor | None = None, offset: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, descale)``: q e4m3 contiguous with ``q * descale ~= x``, descale fp32 (1, 1, 1, 1).

    ``amax``: a bound on ``|x|`` to scale by (values past it saturate); default the exact amax.
    ``offset``: a per-channel vector (broadcast over x's last dims, e.g. (1, 1, H, D)) taken
    off before quantizing: ``q * descale ~= x - offset`` (the amax is then of ``x - offset``).
    """
    if offset is not None:
        x = x.float() - offset.float()
    if amax is None:
        amax = x.detach().abs().amax()
    descale = amax.float().reshape(()).clamp(min=_EPS) / FP8_MAX
    q = (x.float() / descale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.contiguous(), descale.reshape(1, 1, 1, 1)


@triton_kernels
def kernels(triton, tl) -> dict:
    """The Triton kernels (None without Triton)."""

    @triton.jit
    def amax_flat(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + i, mask=i < n, other=0.0).to(tl.float32)
        tl.atomic_max(out_ptr, tl.max(tl.abs(x), 0))

    @triton.jit
    def amax_rows(x_ptr, out_ptr, rows, cols, row_stride, seq, batch_stride, off_ptr,
                  HAS_OFF: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):  # fmt: skip
        r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
        base = (r // seq) * batch_stride + (r % seq) * row_stride  # row r of batch r // seq
        acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
        for c0 in range(0, cols, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)[None, :]
            m = (r < rows) & (c < cols)
            x = tl.load(x_ptr + base + c, mask=m, other=0.0).to(tl.float32)
            if HAS_OFF:  # x - offset[c] (masked rows stay 0)
                x = tl.where(m, x - tl.load(off_ptr + c, mask=c < cols, other=0.0), 0.0)
            acc = tl.maximum(acc, tl.abs(x))
        tl.atomic_max(out_ptr, tl.max(tl.max(acc, 1), 0))

    @triton.jit
    def quant_flat(x_ptr, amax_ptr, y_ptr, descale_ptr, n, BLOCK: tl.constexpr):
        amax = tl.maximum(tl.load(amax_ptr), 1e-12)
        if tl.program_id(0) == 0:
            tl.store(descale_ptr, amax / 448.0)
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + i, mask=i < n, other=0.0).to(tl.float32)
        y = tl.minimum(tl.maximum(x * (448.0 / amax), -448.0), 448.0)
        tl.store(y_ptr + i, y.to(tl.float8e4nv), mask=i < n)

    @triton.jit
    def quant_rows(x_ptr, amax_ptr, y_ptr, descale_ptr, rows, cols, row_stride, seq,
                   batch_stride, off_ptr, HAS_OFF: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_C: tl.constexpr):  # fmt: skip
        amax = tl.maximum(tl.load(amax_ptr), 1e-12)
        if tl.program_id(0) == 0:
            tl.store(descale_ptr, amax / 448.0)
        r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
        base = (r // seq) * batch_stride + (r % seq) * row_stride  # row r of batch r // seq
        for c0 in range(0, cols, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)[None, :]
            m = (r < rows) & (c < cols)
            x = tl.load(x_ptr + base + c, mask=m, other=0.0).to(tl.float32)
            if HAS_OFF:
                x = x - tl.load(off_ptr + c, mask=c < cols, other=0.0)
            y = tl.minimum(tl.maximum(x * (448.0 / amax), -448.0), 448.0)
            tl.store(y_ptr + r * cols + c, y.to(tl.float8e4nv), mask=m)

    @triton.jit
    def dequant_flat(y_ptr, descale_ptr, out_ptr, n, off_ptr, cols,
                     HAS_OFF: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        y = tl.load(y_ptr + i, mask=i < n, other=0.0).to(tl.float32)
        out = y * tl.load(descale_ptr)
        if HAS_OFF:  # + offset[channel]: rows of ``cols`` channels
            out += tl.load(off_ptr + i % cols, mask=i < n, other=0.0)
        tl.store(out_ptr + i, out.to(out_ptr.dtype.element_ty), mask=i < n)

    return {"amax_flat": amax_flat, "amax_rows": amax_rows, "quant_flat": quant_flat,
            "quant_rows": quant_rows, "dequant_flat": dequant_flat}  # fmt: skip


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _offset_row(offset: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """An offset broadcast over x's (H, D) (or (C,)) as one contiguous fp32 row of H*D."""
    if offset is None:
        return None
    width = x.shape[-2] * x.shape[-1] if x.dim() == 4 else x.shape[-1]
    row = offset.detach().float().reshape(-1)
    if row.numel() != width:
        raise ValueError(f"offset of {row.numel()} values for rows of {width}")
    return row.contiguous()


def running_amax(amax: torch.Tensor, x: torch.Tensor, offset: torch.Tensor | None = None) -> None:
    """``amax = max(amax, max |x - offset|)`` in place on the device (amax: (1,) fp32;
    ``offset`` per channel, as ``quantize_tensor``'s, or None)."""
    k = cuda_kernels(kernels, x)
    if k is None:
        y = x.detach().float() - offset.float() if offset is not None else x.detach()
        amax.copy_(torch.maximum(amax, y.abs().amax().float().reshape(1)))
        return
    off = _offset_row(offset, x)
    if off is None and x.is_contiguous():
        n = x.numel()
        k["amax_flat"][(_cdiv(n, _FLAT_BLOCK),)](x, amax, n, BLOCK=_FLAT_BLOCK)
        return
    t, rows, cols, row_stride, seq, batch_stride = batched_rows(x)
    k["amax_rows"][(_cdiv(rows, _ROWS),)](t, amax, rows, cols, row_stride, seq, batch_stride,
                                          amax if off is None else off, HAS_OFF=off is not None,
                                          BLOCK_R=_ROWS, BLOCK_C=_COLS)  # fmt: skip


def quantize_tensor_device(
    x: torch.Tensor, amax: torch.Tensor | None = None, offset: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_tensor`` as Triton passes on CUDA (amax, unless given, then scale + cast);
    an ``offset`` is taken off inside both passes (``x - offset`` is never written out)."""
    k = cuda_kernels(kernels, x)
    if k is None:
        return quantize_tensor(x, amax, offset)
    if amax is None:
        amax = torch.zeros(1, device=x.device, dtype=torch.float32)
        running_amax(amax, x, offset)
    out = torch.empty(x.shape, device=x.device, dtype=FP8)
    descale = torch.empty(1, 1, 1, 1, device=x.device, dtype=torch.float32)
    off = _offset_row(offset, x)
    if off is None and x.is_contiguous():
        n = x.numel()
        k["quant_flat"][(_cdiv(n, _FLAT_BLOCK),)](x, amax, out, descale, n, BLOCK=_FLAT_BLOCK)
        return out, descale
    t, rows, cols, row_stride, seq, batch_stride = batched_rows(x)
    k["quant_rows"][(_cdiv(rows, _ROWS),)](t, amax, out, descale, rows, cols, row_stride, seq,
                                           batch_stride, amax if off is None else off,
                                           HAS_OFF=off is not None, BLOCK_R=_ROWS,
                                           BLOCK_C=_COLS)  # fmt: skip
    return out, descale


def dequantize_tensor(y: torch.Tensor, descale: torch.Tensor, dtype: torch.dtype,
                      offset: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """``y * descale`` in ``dtype`` (y e4m3 contiguous, descale a one-element fp32 tensor).

    ``offset``: a per-channel vector as ``quantize_tensor``'s, added back in fp32 before the
    cast, in the same pass (the FP8 attention's V mean, added to O)."""
    k = cuda_kernels(kernels, y)
    if k is None:
        if offset is None:
            return dequantize(y, descale.reshape(()), dtype)
        return (y.float() * descale.reshape(()) + offset.float()).to(dtype)
    out = torch.empty(y.shape, device=y.device, dtype=dtype)
    n, off = y.numel(), _offset_row(offset, y)
    k["dequant_flat"][(_cdiv(n, _FLAT_BLOCK),)](y, descale, out, n,
                                                descale if off is None else off,
                                                1 if off is None else off.numel(),
                                                HAS_OFF=off is not None, BLOCK=_FLAT_BLOCK)  # fmt: skip
    return out
