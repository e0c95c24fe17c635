"""Many-step flow-matching solvers from diffusers (Euler, UniPC) for bidirectional recipes."""

from __future__ import annotations

import torch

from flashdreams import ConfigError
from flashdreams.scheduler.base import NoiseFn, Scheduler


class DiffusersFlowScheduler(Scheduler):
    """Wraps diffusers' flow-matching solvers behind the loop's scheduler protocol.

    Args:
        solver: ``euler`` (FlowMatchEulerDiscreteScheduler) or ``unipc``
            (UniPCMultistepScheduler with flow sigmas, as Wan's reference pipeline uses).
        num_steps: solver steps (model forwards per block).
        shift: flow shift of the sigma schedule.
        num_train_timesteps: training timesteps of the model (1000 for Wan).
    """

    def __init__(
        self, solver: str = "unipc", num_steps: int = 50, shift: float = 5.0,
        num_train_timesteps: int = 1000,
    ) -> None:  # fmt: skip
        if num_steps < 1:
            raise ConfigError(f"scheduler.num_steps={num_steps} must be >= 1")
        from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

        if solver == "euler":
            self.solver = FlowMatchEulerDiscreteScheduler(
                num_train_timesteps=num_train_timesteps, shift=shift
            )
        elif solver == "unipc":
            self.solver = UniPCMultistepScheduler(
                num_train_timesteps=num_train_timesteps, prediction_type="flow_prediction",
                use_flow_sigmas=True, flow_shift=shift,
            )  # fmt: skip
        else:
            raise ConfigError(f"scheduler.solver={solver!r} is not one of ['euler', 'unipc']")
        self.num_steps = num_steps
        self._timesteps: torch.Tensor | None = None

    def begin_block(self, device: torch.device) -> torch.Tensor:
        self.solver.set_timesteps(self.num_steps, device=device)
        self._timesteps = self.solver.timesteps
        return self._timesteps.float()

    def step(self, flow, x, index, noise_fn: NoiseFn):
        t = self._timesteps[index]
        return self.solver.step(flow.float(), t, x.float(), return_dict=False)[0]
