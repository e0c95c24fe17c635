"""Protocol of a graph-capture policy: how the model's forwards are executed."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import nn


class GraphPolicy:
    """Decides how the rollout's forwards run (eager, compiled, captured as CUDA graphs).

    The loop calls ``prepare(model)`` once after loading, then routes every model forward
    through ``run(fn, *args, shape_key=...)``. ``shape_key`` names everything that is not a
    tensor argument but changes the work a forward does (the KV cache's valid length); two
    calls with equal ``shape_key`` and equal argument shapes do identical work on different
    data, which is what makes a capture replayable. ``shape_key=None`` forbids capture.
    Tensor arguments may be nested in lists/tuples (the per-layer context K/V) and dicts (the
    named conditioning inputs); other arguments (the cache, the expert) are passed through.
    """

    name = "base"
    #: replays captured graphs, which read weights at fixed addresses (weights must not move)
    captures: bool = False
    #: runs compiled regions (weights that move between forwards are untested there)
    compiles: bool = False

    def prepare(self, model: nn.Module) -> nn.Module:
        """Return the model to run (possibly compiled); called once after loading."""
        return model

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` as this policy runs a network outside the DiT (a control's encoder step):
        compiled (static shapes) when the policy compiles, else unchanged. Pass the result to
        :meth:`run` with a ``shape_key`` to have it captured as well."""
        return fn

    def run(self, fn: Callable[..., torch.Tensor], *args: Any, shape_key: Hashable | None) -> Any:
        """Execute ``fn(*args)`` under this policy."""
        raise NotImplementedError

    def wants_precapture(self, device: torch.device) -> bool:
        """True if the loop should run every future shape once during warm-up on ``device``."""
        return False

    def reset(self) -> None:
        """A new clip starts (captured state that reads buffers, not values, stays valid)."""

    def invalidate(self) -> None:
        """Drop everything captured: the buffers it reads (a rebuilt KV cache) are gone."""
