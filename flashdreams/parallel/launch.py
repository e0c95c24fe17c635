"""What torchrun's environment means for a run, read before Hydra starts (no torch import).

Under ``torchrun --nproc_per_node=N -m flashdreams.cli ...`` every rank runs the CLI. Rank 0
owns the run's output dir (Hydra's timestamped dir; the job broadcasts it to the other ranks);
the other ranks must not create a dir of their own, whose timestamp could differ by a second,
nor Hydra's ``.hydra/`` files or a log file.
"""

from __future__ import annotations

import os

# Hydra overrides for ranks > 0: no run/sweep dir of their own, no saved config, no log file.
_QUIET_RANK = (
    "hydra.run.dir=${paths.root}",
    "hydra.sweep.dir=${paths.root}",
    "hydra.sweep.subdir=.",
    "hydra.output_subdir=null",
    "hydra/job_logging=stdout",
)


def launched_rank() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment; (0, 1) outside torchrun."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def rank_prefix() -> str:
    """``"rank R/N: "`` under a multi-process launch, else empty (prefixes error lines)."""
    rank, world = launched_rank()
    return f"rank {rank}/{world}: " if world > 1 else ""


def rank_overrides() -> list[str]:
    """Hydra overrides appended to this rank's command line (none on rank 0 or alone)."""
    rank, _ = launched_rank()
    return list(_QUIET_RANK) if rank > 0 else []


def failure_line(err: BaseException) -> str:
    """One line naming this rank and the error (the first line of its message)."""
    first = next(iter(str(err).strip().splitlines()), "")
    return f"{rank_prefix()}{type(err).__name__}: {first}"
