"""One process, one device."""

from __future__ import annotations

from flashdreams.parallel.base import ParallelPolicy


class SingleProcess(ParallelPolicy):
    """No parallelism: rank 0 of 1."""
