"""Ring context parallelism: every rank in one ring (K/V passed rank to rank).

Each rank keeps all heads of its tokens and its sequence share of the KV cache; attention
folds the chunks of every rank by log-sum-exp (``ring_attention.py``). This file is the config
target of ``parallel=ring``.
"""

from __future__ import annotations

from flashdreams.parallel.context import ContextParallel


class RingParallel(ContextParallel):
    """All ranks in one ring (``ulysses_degree`` 1).

    Args:
        ulysses_degree: ranks per all-to-all group; 1 for a pure ring (>1 makes it ``usp``).
        ring_degree: ranks per ring; null = the world size from torchrun.
        timeout_s: seconds a collective may wait for a peer before the job fails.
    """

    name = "ring"

    def __init__(self, ulysses_degree: int | None = 1, ring_degree: int | None = None,
                 timeout_s: float = 600.0) -> None:  # fmt: skip
        super().__init__(ulysses_degree=ulysses_degree, ring_degree=ring_degree,
                         timeout_s=timeout_s)  # fmt: skip
