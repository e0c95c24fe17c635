"""The block schedule: how many latent frames each AR block of a run covers.

A run's blocks are uniform (``rollout.frames_per_block`` each) unless ``rollout.first_block_frames``
gives block 0 another size: FastVideo's causal Wan 2.2 T2V denoises 1 latent frame, then blocks
of 3; FlashVSR's first DiT call covers 6 latent frames, later calls 2. Block ``i`` starts at
``start(i)`` latent frames after any conditioner prefix and covers ``frames(i)`` frames; every
later block has the steady size, so shapes stop changing once the KV cache is full.

Plain integers on the host: the loop reads them per step without allocations or device syncs.
"""

from __future__ import annotations

from typing import Any

from flashdreams import ConfigError


def _positive(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name}={value!r} must be an integer >= 1")
    return value


class BlockSchedule:
    """Latent frames per AR block: ``first_block_frames`` for block 0, ``frames_per_block`` after.

    Args:
        frames_per_block: latent frames of every block after the first (the steady size).
        first_block_frames: latent frames of block 0 (None: ``frames_per_block``).
    """

    def __init__(self, frames_per_block: int, first_block_frames: int | None = None) -> None:
        self.steady = _positive(frames_per_block, "rollout.frames_per_block")
        first = frames_per_block if first_block_frames is None else first_block_frames
        self.first = _positive(first, "rollout.first_block_frames")

    @property
    def uniform(self) -> bool:
        """True when every block has the same size."""
        return self.first == self.steady

    @property
    def max_frames(self) -> int:
        """Latent frames of the largest block (what a rolling KV window must hold)."""
        return max(self.first, self.steady)

    def frames(self, block: int) -> int:
        """Latent frames of AR block ``block``."""
        return self.first if block == 0 else self.steady

    def start(self, block: int) -> int:
        """Latent frame where block ``block`` starts, counted after any prefix frames."""
        return 0 if block == 0 else self.first + (block - 1) * self.steady

    def total(self, blocks: int) -> int:
        """Latent frames of the first ``blocks`` blocks."""
        return self.start(blocks)

    def block_sizes(self, blocks: int) -> list[int]:
        """The frames of blocks ``0 .. blocks - 1`` (reports and tests)."""
        return [self.frames(i) for i in range(blocks)]

    def as_dict(self) -> dict[str, int]:
        """The schedule as ``stats.json`` and the server's ``hello`` report it."""
        return {"first_block_frames": self.first, "frames_per_block": self.steady}

    def __repr__(self) -> str:
        return f"BlockSchedule(first={self.first}, steady={self.steady})"
