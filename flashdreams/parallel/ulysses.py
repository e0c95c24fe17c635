"""Ulysses context parallelism: every rank in one all-to-all group (heads sharded).

The collectives live in ``all_to_all.py``; this file is the config target of
``parallel=ulysses``.
"""

from __future__ import annotations

from flashdreams.parallel.context import ContextParallel


class UlyssesParallel(ContextParallel):
    """All ranks in one all-to-all group (``ring_degree`` 1).

    Args:
        ulysses_degree: ranks per all-to-all group; null = the world size from torchrun.
        ring_degree: ranks per ring; 1 for pure Ulysses (>1 makes it ``usp``).
        timeout_s: seconds a collective may wait for a peer before the job fails.
        fp8_all_to_all: exchange Q/K/V/O as float8 e4m3 with per-head scales.
        async_qkv: the Ulysses exchanges issued asynchronously, overlapped with compute.
    """

    name = "ulysses"

    def __init__(self, ulysses_degree: int | None = None, ring_degree: int | None = 1,
                 timeout_s: float = 600.0, fp8_all_to_all: bool = False,
                 async_qkv: bool = False) -> None:  # fmt: skip
        super().__init__(ulysses_degree=ulysses_degree, ring_degree=ring_degree,
                         timeout_s=timeout_s, fp8_all_to_all=fp8_all_to_all,
                         async_qkv=async_qkv)  # fmt: skip
