"""Protocol of a guidance rule (how conditional and unconditional predictions combine).

The base class is also the identity rule: one conditional forward, no negative prompt.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

# forward(x, t, context) -> flow: one DiT forward with the loop's cache, positions and graph
# policy already bound.
ForwardFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


class Guidance:
    """Combines DiT predictions into the flow one denoising step uses.

    Per prompt the loop calls ``prepare(cond, uncond)`` once (the per-layer cross-attention K/V of
    the prompt and, when ``needs_negative``, of the negative prompt) and caches the result; each
    denoising step then calls ``predict(forward, x, t, prepared, index)``. ``index`` (the step
    of the schedule) is passed so that rules varying per step, or caching per step, fit here;
    ``expert`` names the expert ``forward`` runs for two-expert models (0 = high noise, 1 = low
    noise; always 0 otherwise), for rules whose scale differs per expert (Wan 2.2 A14B).

    Attributes:
        needs_negative: whether the loop must encode the negative prompt.
        forwards_per_step: DiT forwards (or batch multiples) one step costs, for reports.
    """

    needs_negative: bool = False
    forwards_per_step: int = 1

    def prepare(self, cond: list, uncond: list | None) -> Any:
        """Per-prompt state handed to every ``predict`` call (here: the conditional K/V)."""
        return cond

    def predict(
        self, forward: ForwardFn, x: torch.Tensor, t: torch.Tensor, prepared: Any, index: int,
        expert: int = 0,
    ) -> torch.Tensor:  # fmt: skip
        """Flow for latents ``x`` (B, C, F, h, w) at timesteps ``t`` (B, F)."""
        return forward(x, t, prepared)
