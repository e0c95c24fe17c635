"""What the Triton kernels share: building them once on first use, and viewing token rows.

Triton is optional (CPU installs lack it): each module's kernels are built by a function
decorated with ``triton_kernels``, which imports Triton on the first call, builds the kernels
once and returns them (None without Triton, and callers then run their torch path).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def triton_kernels(build: Callable[[Any, Any], T]) -> Callable[[], T | None]:
    """``build(triton, triton.language)`` run once, on the first call; None without Triton."""

    @functools.cache
    def kernels() -> T | None:
        try:
            import triton
            import triton.language as tl
        except ImportError:
            return None
        return build(triton, tl)

    return functools.wraps(build)(kernels)


def cuda_kernels(kernels: Callable[[], T | None], *tensors: torch.Tensor | None) -> T | None:
    """A module's Triton ``kernels`` (its ``triton_kernels`` builder's result) for a call on
    ``tensors``: None unless all of them (None skipped) are on CUDA and Triton is importable."""
    if all(t.is_cuda for t in tensors if t is not None):
        return kernels()
    return None


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (Triton block sizes)."""
    return 1 << max(0, n - 1).bit_length()


def _packed(x: torch.Tensor) -> tuple[int, int, int] | None:
    """(B, L, H*D) of a (B, L, H, D) or (B, L, C) tensor whose channels of a token sit next to
    each other (unit column stride, heads packed), else None."""
    if x.dim() in (3, 4) and x.stride(-1) == 1:
        b, seq = x.shape[:2]
        h, d = x.shape[2:] if x.dim() == 4 else (1, x.shape[2])
        if h == 1 or x.stride(2) == d:
            return b, seq, h * d
    return None


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """(B, L, H, D) or (B, L, C) as a (B*L, H*D) view with unit column stride (a copy only if it
    must be).

    The V of a fused QKV projection is such a view with rows 3x as far apart as its width.
    """
    packed = _packed(x)
    if packed is not None:
        b, seq, width = packed
        if b == 1 or x.stride(0) == seq * x.stride(1):
            return x.as_strided((b * seq, width), (x.stride(1), 1))
    return x.contiguous().view(-1, x.shape[-1] if x.dim() < 4 else x.shape[-2] * x.shape[-1])


def batched_rows(x: torch.Tensor) -> tuple[torch.Tensor, int, int, int, int, int]:
    """``as_rows`` for kernels that take a batch stride: (tensor, rows, cols, row_stride, seq,
    batch_stride), row r at ``(r // seq) * batch_stride + (r % seq) * row_stride``.

    No copy wherever the channels of a token are packed, whatever the batch stride: the valid
    range ``buffer[:, :n]`` of a cache holding several batch rows (HY-WorldPlay's two attention
    branches) is read in place, where ``as_rows`` copies it."""
    packed = _packed(x)
    if packed is not None:
        b, seq, width = packed
        return x, b * seq, width, x.stride(1), seq, x.stride(0)
    rows = as_rows(x)
    return rows, rows.shape[0], rows.shape[1], rows.stride(0), rows.shape[0], 0
