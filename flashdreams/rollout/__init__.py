"""The rollout: the loop (``loop``), every model forward (``forward``), the block's decode
and commit (``decode``) and the frames of each block (``schedule``). See docs/DESIGN.md."""

from flashdreams.rollout.loop import NoiseFn, Rollout, StepOutput
from flashdreams.rollout.run import run_rollout
from flashdreams.rollout.schedule import BlockSchedule

__all__ = ["BlockSchedule", "NoiseFn", "Rollout", "StepOutput", "run_rollout"]
