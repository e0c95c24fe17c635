"""Protocol of a parallel layout: which rank does what."""

from __future__ import annotations

from flashdreams.attention.base import AttentionBackend


class ParallelPolicy:
    """Rank bookkeeping and the attention wrapper of a context-parallel layout.

    Attributes:
        rank: this process's rank.
        world_size: number of processes.
    """

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Only the main rank writes video, stats and logs."""
        return self.rank == 0

    def setup(self) -> None:
        """Initialise the process group (no-op for a single process)."""

    def wrap_attention(self, attention: AttentionBackend) -> AttentionBackend:
        """Return the attention backend the model should call."""
        return attention

    def teardown(self) -> None:
        """Destroy the process group."""
