"""Protocol of a denoising schedule, as the rollout loop sees it."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

NoiseFn = Callable[[tuple[int, ...]], torch.Tensor]


class Scheduler:
    """Turns flow predictions into the next latent of one AR block.

    Per block the loop calls ``begin_block(device)`` (resets solver state, returns the model
    timesteps), then for each index ``i``: ``x = step(flow, x, i, noise_fn)``. After the last
    index ``x`` is the clean latent x0. ``noise_fn(shape)`` draws fresh noise in the run's
    documented order; schedules that re-noise call it, others never do.

    Attributes:
        num_steps: model forwards per block.
    """

    num_steps: int

    def begin_block(self, device: torch.device) -> torch.Tensor:
        """Reset per-block state; return the (num_steps,) model timesteps in [0, 1000] (read
        only: a fixed list is one tensor per device, returned to every block)."""
        raise NotImplementedError

    def on_device(self, values: Sequence[float], device: torch.device | str) -> torch.Tensor:
        """``values`` as a float32 tensor on ``device``, made on the first call and returned
        by every later one: a host list copied to the GPU per block would be a blocking copy,
        which waits for the work already queued (read only)."""
        made = self.__dict__.setdefault("_on_device", {})
        key = (tuple(float(v) for v in values), torch.device(device))
        if key not in made:
            made[key] = torch.tensor(key[0], dtype=torch.float32, device=device)
        return made[key]

    def host_timesteps(self) -> list[float] | None:
        """The block's model timesteps as host floats when the schedule knows them without a
        device read (a fixed few-step list), else None."""
        return None

    def step(
        self, flow: torch.Tensor, x: torch.Tensor, index: int, noise_fn: NoiseFn
    ) -> torch.Tensor:
        """Advance ``x`` (the latent at timestep ``index``) using the model's ``flow``."""
        raise NotImplementedError
