"""Few-step flow matching (Self-Forcing / CausVid / DMD distilled models)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from flashdreams import ConfigError
from flashdreams.scheduler.base import NoiseFn, Scheduler


def warp_timesteps(timesteps: Sequence[float], shift: float) -> list[float]:
    """Apply the flow shift to timesteps in [0, 1000]: s -> shift*s / (1 + (shift-1)*s).

    ``[1000, 750, 500, 250]`` with shift 5 gives ``[1000, 937.5, 833.33, 625]``.
    """
    out = []
    for t in timesteps:
        s = t / 1000.0
        out.append(1000.0 * shift * s / (1.0 + (shift - 1.0) * s))
    return out


class FewStepFlowScheduler(Scheduler):
    """Explicit timestep list; x0 recovered from the flow, re-noised with fresh noise.

    With x_t = (1 - s) x0 + s * eps and flow v = eps - x0 (s = t / 1000):
    ``x0 = x_t - s * v``; the next latent is ``(1 - s') x0 + s' * eps'`` with fresh ``eps'``.

    Args:
        timesteps: model timesteps before warping, in [0, 1000], decreasing.
        shift: flow shift applied to the list (1 = no warp).
        warp: whether to apply the shift (Self-Forcing warps its denoising list).
        integer_timesteps: feed the model the (warped) timesteps truncated to integers while
            the update keeps the exact sigmas, as samplers built on Wan's UniPC grid do (its
            timesteps are int64; LingBot-World-Fast).
    """

    def __init__(self, timesteps: Sequence[float], shift: float = 5.0, warp: bool = True,
                 integer_timesteps: bool = False):  # fmt: skip
        ts = [float(t) for t in timesteps]
        if not ts:
            raise ConfigError("scheduler.timesteps must list at least one timestep")
        if any(t <= 0 or t > 1000 for t in ts) or any(
            a <= b for a, b in zip(ts, ts[1:], strict=False)
        ):
            raise ConfigError(f"scheduler.timesteps={ts} must be decreasing values in (0, 1000]")
        exact = warp_timesteps(ts, shift) if warp else ts
        self.sigmas = [t / 1000.0 for t in exact]  # noise level of each step
        self.timesteps = [float(math.floor(t)) for t in exact] if integer_timesteps else exact
        self.num_steps = len(self.timesteps)

    def begin_block(self, device: torch.device) -> torch.Tensor:
        return torch.tensor(self.timesteps, dtype=torch.float32, device=device)

    def step(self, flow, x, index, noise_fn: NoiseFn):
        sigma = self.sigmas[index]
        x0 = x.float() - sigma * flow.float()
        if index + 1 == self.num_steps:
            return x0
        nxt = self.sigmas[index + 1]
        return (1.0 - nxt) * x0 + nxt * noise_fn(tuple(x.shape))
