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
        exact_timesteps: the model sees ``sigma * num_train_timesteps`` unrounded (Cosmos'
            pipelines pass sigma itself) instead of diffusers' int64 timesteps; the solver
            steps the same sigmas either way.
        karras_sigmas: UniPC only: ``[sigma_min, sigma_max]`` of an EDM Karras schedule mapped
            to flow sigmas ``s / (1 + s)`` (diffusers' Cosmos-Predict2.5 scheduler: [0.01, 200]),
            instead of the shifted linear one (``shift`` is then unused); None: shifted.
    """

    def __init__(
        self, solver: str = "unipc", num_steps: int = 50, shift: float = 5.0,
        num_train_timesteps: int = 1000, exact_timesteps: bool = False,
        karras_sigmas: list[float] | None = None,
    ) -> None:  # fmt: skip
        if num_steps < 1:
            raise ConfigError(f"scheduler.num_steps={num_steps} must be >= 1")
        from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

        if solver == "euler":
            self.solver = FlowMatchEulerDiscreteScheduler(
                num_train_timesteps=num_train_timesteps, shift=shift
            )
        elif solver == "unipc":
            karras = {}
            if karras_sigmas is not None:
                if len(karras_sigmas) != 2 or not 0 < karras_sigmas[0] < karras_sigmas[1]:
                    raise ConfigError(f"scheduler.karras_sigmas={list(karras_sigmas)} must be "
                                      "[sigma_min, sigma_max] with 0 < sigma_min < sigma_max")  # fmt: skip
                karras = dict(use_karras_sigmas=True, sigma_min=float(karras_sigmas[0]),
                              sigma_max=float(karras_sigmas[1]))  # fmt: skip
            self.solver = UniPCMultistepScheduler(
                num_train_timesteps=num_train_timesteps, prediction_type="flow_prediction",
                use_flow_sigmas=True, flow_shift=shift, **karras,
            )  # fmt: skip
        else:
            raise ConfigError(f"scheduler.solver={solver!r} is not one of ['euler', 'unipc']")
        if karras_sigmas is not None and solver != "unipc":
            raise ConfigError("scheduler.karras_sigmas needs scheduler.solver=unipc")
        self.num_steps = num_steps
        self.exact_timesteps = exact_timesteps
        self.num_train_timesteps = num_train_timesteps
        self._timesteps: torch.Tensor | None = None

    def begin_block(self, device: torch.device) -> torch.Tensor:
        self.solver.set_timesteps(self.num_steps, device=device)
        self._timesteps = self.solver.timesteps
        if self.exact_timesteps:
            sigmas = self.solver.sigmas[: len(self._timesteps)].to(device)
            return sigmas.float() * self.num_train_timesteps
        return self._timesteps.float()

    def step(self, flow, x, index, noise_fn: NoiseFn):
        t = self._timesteps[index]
        return self.solver.step(flow.float(), t, x.float(), return_dict=False)[0]
