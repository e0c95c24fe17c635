"""A finite rollout from start to its last block (the job, benchmarks, parity tests)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from flashdreams.rollout.loop import Rollout, StepOutput


def run_rollout(rollout: Rollout, prompts: list[str], on_step: Callable[[StepOutput], None],
                profile: bool = False, images: list | None = None) -> float:  # fmt: skip
    """Run all blocks of a finite rollout, handing each step to ``on_step``.

    Returns:
        Seconds spent in steps 0 and 1 (warm-up).
    """
    warm_start, warmup_s = time.perf_counter(), 0.0
    rollout.start(prompts, images=images)
    rollout.precapture()
    for i in range(rollout.total_blocks):
        on_step(rollout.step(sync=profile))
        if i == min(1, rollout.total_blocks - 1):
            if rollout.device.type == "cuda":
                torch.cuda.synchronize(rollout.device)
            warmup_s = time.perf_counter() - warm_start
    return warmup_s
