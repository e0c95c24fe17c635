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
        boundary: two-expert models distilled by FastVideo (CausalWan2.2 A14B): sigma of the
            expert boundary. A step at ``s >= boundary`` (high-noise expert) moves to the
            boundary, ``x_b = x_t - (s - b) v``, and re-noises with the Gaussian bridge from
            the boundary, ``a x_b + sqrt(s'^2 - (a b)^2) eps'`` with ``a = (1 - s') / (1 - b)``;
            the last high-noise step hands ``x_b`` to the low-noise expert without noise.
            None: every step re-noises from x0.
        renoise: the noise each step re-noises x0 with: ``"fresh"`` (a new draw per step,
            Self-Forcing) or ``"initial"`` (the block's starting noise, the latent of the
            first step, every time: Cosmos-Predict2.5's distilled DMD2/TrigFlow students).
    """

    def __init__(self, timesteps: Sequence[float], shift: float = 5.0, warp: bool = True,
                 integer_timesteps: bool = False, boundary: float | None = None,
                 renoise: str = "fresh") -> None:  # fmt: skip
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
        if boundary is not None and not 0.0 < boundary < 1.0:
            raise ConfigError(f"scheduler.boundary={boundary} must be in (0, 1) (or null)")
        self.boundary = boundary
        if renoise not in ("fresh", "initial"):
            raise ConfigError(f"scheduler.renoise={renoise!r} is not one of ['fresh', 'initial']")
        if renoise == "initial" and boundary is not None:
            raise ConfigError("scheduler.renoise=initial does not combine with scheduler.boundary")
        self.renoise = renoise
        self._initial: torch.Tensor | None = None  # the block's starting noise (renoise=initial)

    def begin_block(self, device: torch.device) -> torch.Tensor:
        return torch.tensor(self.timesteps, dtype=torch.float32, device=device)

    def host_timesteps(self) -> list[float]:
        return list(self.timesteps)

    def step(self, flow, x, index, noise_fn: NoiseFn):
        sigma = self.sigmas[index]
        last = index + 1 == self.num_steps
        b = self.boundary
        if b is not None and sigma >= b and not last:  # high-noise expert: bridge
            x_b = x.float() - (sigma - b) * flow.float()
            nxt = self.sigmas[index + 1]
            if nxt < b:
                return x_b
            a = (1.0 - nxt) / (1.0 - b)
            return a * x_b + max(nxt**2 - (a * b) ** 2, 0.0) ** 0.5 * noise_fn(tuple(x.shape))
        if index == 0 and self.renoise == "initial":
            self._initial = x.float()
        x0 = x.float() - sigma * flow.float()
        if last:
            return x0
        nxt = self.sigmas[index + 1]
        eps = self._initial if self.renoise == "initial" else noise_fn(tuple(x.shape))
        return (1.0 - nxt) * x0 + nxt * eps
