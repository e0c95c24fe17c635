"""Classifier-free guidance: ``uncond + scale * (cond - uncond)``, as Wan and diffusers do, or
``cond + scale * (cond - uncond)`` (``anchor="cond"``, Cosmos-Predict2.5's form)."""

from __future__ import annotations

import torch

from flashdreams import ConfigError
from flashdreams.guidance.base import ForwardFn, Guidance


def _batch_context(cond: list, uncond: list) -> list:
    """Stack two per-layer K/V lists along the batch: [cond | uncond]."""
    return [
        tuple(torch.cat([c, u], dim=0) for c, u in zip(layer_c, layer_u, strict=True))
        for layer_c, layer_u in zip(cond, uncond, strict=True)
    ]


class ClassifierFreeGuidance(Guidance):
    """Two predictions per step, conditional and unconditional (negative prompt).

    ``batched=False`` runs two forwards of batch B (least memory); ``batched=True`` runs one
    forward of batch 2B, the inputs stacked as [cond | uncond] (fewer, larger kernels). Both give
    the same flow up to floating-point rounding.

    Args:
        scale: guidance scale w (Wan 2.1 uses 5.0); 1.0 equals the conditional prediction.
        batched: one batch-2B forward instead of two batch-B forwards.
        low_noise_scale: two-expert models (Wan 2.2 A14B): the scale while the low-noise expert
            runs (diffusers' ``guidance_scale_2``); ``scale`` is then the high-noise one.
            None: ``scale`` throughout.
        anchor: the prediction the guided difference is added to: ``"uncond"`` (Wan,
            diffusers' Wan pipelines: 1.0 = the conditional prediction) or ``"cond"``
            (Cosmos-Predict2.5: ``cond + scale * (cond - uncond)``, 0.0 = conditional; the same
            as ``"uncond"`` with scale + 1).
    """

    needs_negative = True
    forwards_per_step = 2

    def __init__(self, scale: float = 5.0, batched: bool = False,
                 low_noise_scale: float | None = None, anchor: str = "uncond") -> None:  # fmt: skip
        if scale < 0:
            raise ConfigError(f"guidance.scale={scale} must be >= 0")
        if low_noise_scale is not None and low_noise_scale < 0:
            raise ConfigError(f"guidance.low_noise_scale={low_noise_scale} must be >= 0")
        if anchor not in ("uncond", "cond"):
            raise ConfigError(f"guidance.anchor={anchor!r} is not one of ['uncond', 'cond']")
        self.anchor = anchor
        self.scale = float(scale)
        self.batched = bool(batched)
        low = self.scale if low_noise_scale is None else float(low_noise_scale)
        self.scales = (self.scale, low)  # per expert: high noise, low noise

    def prepare(self, cond: list, uncond: list | None) -> list | tuple[list, list]:
        """The batched [cond | uncond] K/V, or the pair for two forwards."""
        if uncond is None:
            raise ConfigError("guidance=cfg needs the negative prompt's context")
        return _batch_context(cond, uncond) if self.batched else (cond, uncond)

    def predict(
        self, forward: ForwardFn, x, t, prepared, index: int, expert: int = 0
    ) -> torch.Tensor:
        if self.batched:
            flow = forward(torch.cat([x, x]), torch.cat([t, t]), prepared)
            cond, uncond = flow.chunk(2, dim=0)
        else:
            # clone: a replayed CUDA graph returns the same static output buffer twice
            cond = forward(x, t, prepared[0]).clone()
            uncond = forward(x, t, prepared[1])
        base = cond if self.anchor == "cond" else uncond
        return base + self.scales[expert] * (cond - uncond)
