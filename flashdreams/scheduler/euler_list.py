"""Euler steps on a fixed timestep list, ending at 0 (HY-WorldPlay's distilled sampler)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flashdreams import ConfigError
from flashdreams.scheduler.base import NoiseFn, Scheduler
from flashdreams.scheduler.flow import warp_timesteps


class EulerListScheduler(Scheduler):
    """``x <- x + (s' - s) * flow`` from each listed level ``s = t / 1000`` to the next, the
    last step to 0; no noise is drawn.

    Args:
        timesteps: model timesteps, decreasing, in (0, 1000].
        shift: flow shift applied to the list when ``warp`` (``[1000, 750, 500, 250]`` warped
            by 8 is HY-WorldPlay's ``[1000, 960, 888.89, 727.27]``).
        warp: whether to apply the shift.
    """

    def __init__(self, timesteps: Sequence[float], shift: float = 1.0, warp: bool = False) -> None:
        ts = [float(t) for t in timesteps]
        if (
            not ts
            or any(t <= 0 or t > 1000 for t in ts)
            or any(a <= b for a, b in zip(ts, ts[1:], strict=False))
        ):
            raise ConfigError(f"scheduler.timesteps={ts} must be decreasing values in (0, 1000]")
        if shift <= 0:
            raise ConfigError(f"scheduler.shift={shift} must be > 0")
        self.timesteps = warp_timesteps(ts, shift) if warp else ts
        self.sigmas = [t / 1000.0 for t in self.timesteps] + [0.0]
        self.num_steps = len(self.timesteps)

    def begin_block(self, device: torch.device) -> torch.Tensor:
        return self.on_device(self.timesteps, device)

    def host_timesteps(self) -> list[float]:
        return list(self.timesteps)

    def step(self, flow, x, index, noise_fn: NoiseFn):
        return x.float() + (self.sigmas[index + 1] - self.sigmas[index]) * flow.float()
