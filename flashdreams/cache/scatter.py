"""Row scatter of a block's K/V into the cache buffers: one Triton pass on CUDA.

``buffer.index_copy_(1, index, x)`` goes through PyTorch's generic indexing kernel, which moves
one element per thread: ~0.55 TB/s on an H200 for a 1.3B block (4680 tokens x 1536). Each token
row is 1536 contiguous values, so a kernel that loads whole rows and stores them at the slot
the index names runs at copy speed; it also reads the V of a fused QKV projection in place.
The index stays a device tensor (captured graphs replay it with new slots).
"""

from __future__ import annotations

import torch

from flashdreams.kernels import as_rows, cuda_kernels, triton_kernels

_BLOCK_R, _BLOCK_C = 16, 512


@triton_kernels
def _kernel(triton, tl):
    @triton.jit
    def scatter_rows(src_ptr, dst_ptr, index_ptr, rows, n, cap, cols, src_stride,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):  # fmt: skip
        r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        live = r < rows
        slot = tl.load(index_ptr + r % n, mask=live, other=0)
        dst_row = (r // n) * cap + slot  # batch b's rows follow b * cap
        m = live[:, None] & (c < cols)[None, :]
        x = tl.load(src_ptr + r[:, None] * src_stride + c[None, :], mask=m)
        tl.store(dst_ptr + dst_row[:, None] * cols + c[None, :], x, mask=m)

    return scatter_rows


def write_rows(buffer: torch.Tensor, index: torch.Tensor, x: torch.Tensor) -> None:
    """``buffer[:, index] = x`` for a contiguous (B, cap, H, D) buffer and (B, n, H, D) ``x`` of
    the buffer's dtype (``index``: (n,) int64 slots on the buffer's device)."""
    kernel = cuda_kernels(_kernel, buffer, index, x)
    if kernel is None or not buffer.is_contiguous() or x.dtype != buffer.dtype:
        buffer.index_copy_(1, index, x.to(buffer.dtype))
        return
    b, cap = buffer.shape[:2]
    src = as_rows(x)  # (B * n, H * D) with unit column stride
    rows, cols = src.shape
    grid = (-(-rows // _BLOCK_R), -(-cols // _BLOCK_C))
    kernel[grid](src, buffer, index, rows, index.numel(), cap, cols, src.stride(0),
                 BLOCK_R=_BLOCK_R, BLOCK_C=_BLOCK_C)  # fmt: skip
