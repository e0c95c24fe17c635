"""Protocol of a step cache: how a forward's transformer blocks run across denoising steps.

The base class is also the ``none`` option: every forward runs every block. A model runs its
blocks through ``DiT.run_blocks``, which hands this object a ``segment(tokens, start, stop)``
callable (blocks ``start .. stop - 1`` on the residual stream); a cache may then skip a
segment and reuse what it added at an earlier step (``flashdreams.step_cache.dbcache``).

Which step and which guidance branch a forward belongs to reaches the cache through a per-step
state (``step(index, branch, expert)``), entered by the rollout's denoising loop around each
forward; forwards outside it (commits, graph pre-capture, replays) always run every block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

#: runs blocks [start, stop) on the (B, L, dim) residual stream and returns the new stream
Segment = Callable[[torch.Tensor, int, int], torch.Tensor]
#: sums a (B, L_local, ...) tensor over the whole sequence of every rank (a device scalar)
Total = Callable[[torch.Tensor], torch.Tensor]


class StepCache:
    """Runs every block of every forward (``step_cache=none``)."""

    name = "none"
    #: whether forwards may skip blocks (the build checks the recipe only then)
    enabled: bool = False

    def check(self, *, num_layers: int, num_steps: int, kv_cache: bool, graph_captures: bool,
              world_size: int) -> None:  # fmt: skip
        """One-line ``ConfigError`` when the recipe cannot use this cache (nothing here)."""

    def begin_block(self, num_steps: int) -> None:
        """A block's denoising starts: forget the previous block's cached state."""

    @contextlib.contextmanager
    def step(self, index: int, branch: int = 0, expert: int = 0) -> Iterator[None]:
        """The forwards inside belong to denoising step ``index`` of guidance branch ``branch``
        (0: conditional, 1: unconditional with two CFG forwards) of expert ``expert``."""
        yield

    def run(self, tokens: torch.Tensor, segment: Segment, num_layers: int,
            total: Total | None = None) -> torch.Tensor:  # fmt: skip
        """The blocks' output for ``tokens``: here all of them, always.

        ``total``: sums a per-token tensor over every rank's tokens (context parallelism), so
        each rank takes the same decision; None: ``tokens`` is the whole sequence."""
        return segment(tokens, 0, num_layers)

    def records(self) -> list[dict]:
        """Per forward of the last block: step, branch, expert, computed, residual diff."""
        return []


def hit_rate(records: list[dict]) -> float | None:
    """Fraction of the recorded forwards that reused the middle blocks (None: no record)."""
    if not records:
        return None
    return sum(not r["computed"] for r in records) / len(records)
