"""The rollout: the loop (``loop``), every model forward (``forward``) and the block's decode
and commit (``decode``). See docs/DESIGN.md."""

from flashdreams.rollout.loop import NoiseFn, Rollout, StepOutput
from flashdreams.rollout.run import run_rollout

__all__ = ["NoiseFn", "Rollout", "StepOutput", "run_rollout"]
