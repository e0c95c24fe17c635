"""Unified sequence parallelism (USP): ulysses all-to-all inside groups x a ring across them.

Ranks form a ``ring_degree x ulysses_degree`` mesh; consecutive ranks share an all-to-all group
(keep it inside a node), groups exchange K/V over rings. The KV cache is sharded by heads
within a group and by sequence across groups. This file is the config target of
``parallel=usp``.
"""

from __future__ import annotations

from flashdreams.parallel.context import ContextParallel


class UspParallel(ContextParallel):
    """Ulysses x ring on a 2-D mesh.

    Args:
        ulysses_degree: ranks per all-to-all group (heads sharded; must divide the world size).
        ring_degree: ranks per ring; null = world size / ulysses_degree.
        timeout_s: seconds a collective may wait for a peer before the job fails.
        fp8_all_to_all: the Ulysses exchanges as float8 e4m3 with per-head scales.
        async_qkv: the Ulysses exchanges issued asynchronously, overlapped with compute.
    """

    name = "usp"

    def __init__(self, ulysses_degree: int | None = 2, ring_degree: int | None = None,
                 timeout_s: float = 600.0, fp8_all_to_all: bool = False,
                 async_qkv: bool = False) -> None:  # fmt: skip
        super().__init__(ulysses_degree=ulysses_degree, ring_degree=ring_degree,
                         timeout_s=timeout_s, fp8_all_to_all=fp8_all_to_all,
                         async_qkv=async_qkv)  # fmt: skip
