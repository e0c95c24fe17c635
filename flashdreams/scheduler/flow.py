"""Few-step flow matching (Self-Forcing / CausVid / DMD distilled models)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
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


#: ``scheduler.grid`` values: the vendor's 1000-entry schedule the steps live on.
GRIDS = ("wan_unipc", "self_forcing")
#: ``scheduler.latent_dtype`` values: the dtype latents are rounded to after every step.
_LATENT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


class SigmaGrid:
    """A vendor's discrete 1000-entry noise schedule and its timestep -> noise-level lookups.

    Few-step samplers built on a training scheduler do not use the exact warped sigma of a
    step: they pick a grid entry by its timestep. Two grids are reproduced, each computed with
    the vendor's own dtypes (they decide which entries tie and where integers truncate):

    * ``wan_unipc`` (LingBot-World-Fast, ``FlowUniPCMultistepScheduler.set_timesteps(1000,
      shift)``): unshifted sigmas ``linspace(float32(0.999), 0, 1001)[:-1]`` in float64, warped
      by ``shift``, stored as float32; timesteps ``int64(1000 * sigma)``, so neighbouring
      entries share an integer timestep. The x0 conversion takes the level of the *first* entry
      with the step's timestep (``argmin |t_i - t|``), the re-noising ``add_noise`` the level of
      the *second* one (``index_for_timestep`` picks index 1 of the matches when there are
      several).
    * ``self_forcing`` (FastVideo's ``SelfForcingFlowMatchScheduler`` as the checkpoints ship
      it: 1000 steps, sigma 1 -> 0, ``extra_one_step``): float32 sigmas
      ``linspace(1, 0, 1001)[:-1]`` warped by ``shift``, timesteps ``1000 * sigma`` (float32).
      Every lookup takes the nearest entry (``argmin |t_i - t|``), the boundary's too.

    Args:
        kind: one of ``GRIDS``.
        shift: the flow shift the grid was built with.
        size: grid entries (the training timesteps, 1000).
    """

    def __init__(self, kind: str, shift: float, size: int = 1000) -> None:
        if kind not in GRIDS:
            raise ConfigError(f"scheduler.grid={kind!r} is not one of {[None, *GRIDS]}")
        self.kind = kind
        if kind == "wan_unipc":
            sigma_max = float(torch.tensor(1.0 - 1.0 / size, dtype=torch.float32))
            raw = np.linspace(sigma_max, 0.0, size + 1)[:-1]  # float64, as numpy computes it
            warped = shift * raw / (1.0 + (shift - 1.0) * raw)
            self.unwarped = torch.from_numpy(raw * size)
            self.timesteps = torch.from_numpy(warped * size).to(torch.int64).double()
            self.sigmas = torch.from_numpy(warped.astype(np.float32))
        else:
            raw = torch.linspace(1.0, 0.0, size + 1, dtype=torch.float32)[:-1]
            warped = shift * raw / (1 + (shift - 1) * raw)
            self.unwarped = raw.double() * size
            self.timesteps = (warped * size).double()
            self.sigmas = warped

    def index_of(self, timestep: float) -> int:
        """Grid entry of a configured (unwarped) timestep; ConfigError when it is not one."""
        i = int(torch.argmin((self.unwarped - timestep).abs()))
        if abs(float(self.unwarped[i]) - timestep) > 1e-3:
            raise ConfigError(
                f"scheduler.timesteps holds {timestep:g}, which is no entry of the "
                f"{self.kind} grid (nearest: {float(self.unwarped[i]):.6g}, index {i})"
            )
        return i

    def nearest(self, timestep: float) -> int:
        """First entry whose timestep is nearest ``timestep`` (the x0 conversions' lookup)."""
        return int(torch.argmin((self.timesteps - timestep).abs()))

    def renoise_index(self, timestep: float) -> int:
        """Entry whose level re-noises to ``timestep`` (``add_noise``'s lookup)."""
        if self.kind == "self_forcing":
            return self.nearest(timestep)
        matches = (self.timesteps == timestep).nonzero().flatten()
        return int(matches[1] if len(matches) > 1 else matches[0])


class FewStepFlowScheduler(Scheduler):
    """Explicit timestep list; x0 recovered from the flow, re-noised with fresh noise.

    With x_t = (1 - s) x0 + s * eps and flow v = eps - x0 (s = t / 1000):
    ``x0 = x_t - s * v``; the next latent is ``(1 - s') x0 + s' * eps'`` with fresh ``eps'``.

    Args:
        timesteps: model timesteps before warping, in [0, 1000], decreasing.
        shift: flow shift applied to the list (1 = no warp).
        warp: whether to apply the shift (Self-Forcing warps its denoising list).
        integer_timesteps: feed the model the (warped) timesteps truncated to integers while
            the update keeps the exact sigmas (without ``grid``).
        boundary: two-expert models distilled by FastVideo (CausalWan2.2 A14B): sigma of the
            expert boundary. A step at ``s >= boundary`` (high-noise expert) moves to the
            boundary, ``x_b = x_t - (s - boundary) v``, and re-noises with the Gaussian bridge
            from the boundary, ``a x_b + sqrt(s'^2 - (a b)^2) eps'`` with
            ``a = (1 - s') / (1 - b)``; the last high-noise step hands ``x_b`` to the low-noise
            expert without noise. None: every step re-noises from x0.
        renoise: the noise each step re-noises x0 with: ``"fresh"`` (a new draw per step,
            Self-Forcing) or ``"initial"`` (the block's starting noise, the latent of the
            first step, every time: Cosmos-Predict2.5's distilled DMD2/TrigFlow students).
        grid: None uses the exact warped sigmas. A name from ``GRIDS`` reproduces a vendor's
            sampler on its discrete schedule (see ``SigmaGrid``): each timestep must be an
            entry of the unwarped grid; the model sees the grid's timestep, x0 and re-noising
            take the levels the vendor looks up (``wan_unipc``: first / second entry of an
            integer timestep, LingBot-World-Fast; ``self_forcing``: nearest entry, and the
            boundary's level from its nearest entry, FastVideo), x0 is computed in float64.
        latent_dtype: None keeps float32 latents. ``bfloat16`` rounds x0, every re-noised
            latent and the fresh noise to bf16 after each step, as a sampler does whose DiT
            returns bf16 and whose arithmetic keeps the prediction's dtype (FastVideo's causal
            DMD stage under bf16 autocast).
    """

    def __init__(self, timesteps: Sequence[float], shift: float = 5.0, warp: bool = True,
                 integer_timesteps: bool = False, boundary: float | None = None,
                 renoise: str = "fresh", grid: str | None = None,
                 latent_dtype: str | None = None) -> None:  # fmt: skip
        ts = [float(t) for t in timesteps]
        if not ts:
            raise ConfigError("scheduler.timesteps must list at least one timestep")
        if any(t <= 0 or t > 1000 for t in ts) or any(
            a <= b for a, b in zip(ts, ts[1:], strict=False)
        ):
            raise ConfigError(f"scheduler.timesteps={ts} must be decreasing values in (0, 1000]")
        if boundary is not None and not 0.0 < boundary < 1.0:
            raise ConfigError(f"scheduler.boundary={boundary} must be in (0, 1) (or null)")
        if latent_dtype is not None and latent_dtype not in _LATENT_DTYPES:
            raise ConfigError(f"scheduler.latent_dtype={latent_dtype!r} is not one of "
                              f"{[None, *_LATENT_DTYPES]}")  # fmt: skip
        self.boundary = boundary
        if renoise not in ("fresh", "initial"):
            raise ConfigError(f"scheduler.renoise={renoise!r} is not one of ['fresh', 'initial']")
        if renoise == "initial" and boundary is not None:
            raise ConfigError("scheduler.renoise=initial does not combine with scheduler.boundary")
        if renoise == "initial" and grid is not None:
            raise ConfigError("scheduler.renoise=initial does not combine with scheduler.grid")
        self.renoise = renoise
        self._initial: torch.Tensor | None = None  # the block's starting noise (renoise=initial)
        self.latent_dtype = None if latent_dtype is None else _LATENT_DTYPES[latent_dtype]
        self.grid = None if grid is None else SigmaGrid(grid, shift)
        if self.grid is None:
            exact = warp_timesteps(ts, shift) if warp else ts
            self.sigmas = [t / 1000.0 for t in exact]  # noise level of each step
            self.renoise_sigmas = self.sigmas
            self.timesteps = [float(math.floor(t)) for t in exact] if integer_timesteps else exact
            self.boundary_sigma = boundary
        else:
            if not warp:
                raise ConfigError(f"scheduler.grid={grid} needs scheduler.warp=true: the "
                                  "grid holds the warped levels")  # fmt: skip
            g = self.grid
            self.timesteps = [float(g.timesteps[g.index_of(t)]) for t in ts]
            self.sigmas = [float(g.sigmas[g.nearest(t)]) for t in self.timesteps]  # for x0
            self.renoise_sigmas = [float(g.sigmas[g.renoise_index(t)]) for t in self.timesteps]
            self.boundary_sigma = (
                None if boundary is None else float(g.sigmas[g.nearest(boundary * 1000.0)])
            )
        self.num_steps = len(self.timesteps)

    def begin_block(self, device: torch.device) -> torch.Tensor:
        return self.on_device(self.timesteps, device)

    def host_timesteps(self) -> list[float]:
        return list(self.timesteps)

    def _high_noise(self, index: int) -> bool:
        """Whether step ``index`` runs the high-noise expert (timestep >= boundary x 1000)."""
        if self.grid is None:
            return self.sigmas[index] >= self.boundary
        return self.timesteps[index] >= self.boundary * 1000.0

    def _round(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as float32, rounded once (from its own dtype) to ``latent_dtype`` if set."""
        return x.float() if self.latent_dtype is None else x.to(self.latent_dtype).float()

    def _noise(self, noise_fn: NoiseFn, shape: tuple[int, ...]) -> torch.Tensor:
        return self._round(noise_fn(shape))

    def step(self, flow, x, index, noise_fn: NoiseFn):
        if self.grid is not None:
            return self._grid_step(flow, x, index, noise_fn)
        sigma = self.sigmas[index]
        last = index + 1 == self.num_steps
        b = self.boundary
        if b is not None and sigma >= b and not last:  # high-noise expert: bridge
            x_b = self._round(x.float() - (sigma - b) * flow.float())
            nxt = self.sigmas[index + 1]
            if nxt < b:
                return x_b
            a = (1.0 - nxt) / (1.0 - b)
            bridge = a * x_b + max(nxt**2 - (a * b) ** 2, 0.0) ** 0.5 * self._noise(
                noise_fn, tuple(x.shape)
            )
            return self._round(bridge)
        if index == 0 and self.renoise == "initial":
            self._initial = x.float()
        x0 = self._round(x.float() - sigma * flow.float())
        if last:
            return x0
        nxt = self.sigmas[index + 1]
        eps = self._initial if self.renoise == "initial" else self._noise(noise_fn, tuple(x.shape))
        return self._round((1.0 - nxt) * x0 + nxt * eps)

    def _device_levels(self, device: torch.device) -> torch.Tensor:
        """float32 re-noising levels of every step, then the boundary's, on ``device`` (made
        once per device: no host-to-device copy per step)."""
        return self.on_device([*self.renoise_sigmas, self.boundary_sigma or 0.0], device)

    def _grid_step(self, flow, x, index, noise_fn: NoiseFn):
        """One step with the vendor's grid levels: x0 (or x at the boundary) in float64, the
        re-noising in float32 with float32 levels, as the vendors' tensors compute them."""
        last = index + 1 == self.num_steps
        bridge = self.boundary is not None and self._high_noise(index) and not last
        drop = self.sigmas[index] - (self.boundary_sigma if bridge else 0.0)
        pred = self._round(x.double() - drop * flow.double())
        if last or (bridge and not self._high_noise(index + 1)):
            return pred  # x0, or x at the boundary handed to the low-noise expert
        levels = self._device_levels(x.device)
        s = levels[index + 1]
        noise = self._noise(noise_fn, tuple(x.shape))
        if bridge:  # FastVideo's add_noise_high: Gaussian bridge from the boundary
            b = levels[-1]
            a = (1 - s) / (1 - b)
            return self._round(a * pred + torch.sqrt(s**2 - (a * b) ** 2) * noise)
        return self._round((1 - s) * pred + s * noise)
