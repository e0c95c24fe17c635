"""Protocol of a graph-capture policy: how the model's forwards are executed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class GraphPolicy:
    """Decides how the rollout's forwards run (eager, compiled, captured as CUDA graphs).

    The loop calls ``prepare(model)`` once after loading, then routes every model forward
    through ``run(key, fn, *args, static=...)``. ``key`` names the call site ("diffuse",
    "commit"); ``static`` is True when every buffer the forward reads has reached its final
    shape (the KV cache is steady), which is when a capture may be replayed safely.
    """

    name = "base"

    def prepare(self, model: nn.Module) -> nn.Module:
        """Return the model to run (possibly compiled); called once after loading."""
        return model

    def run(self, key: str, fn: Callable[..., torch.Tensor], *args: Any, static: bool) -> Any:
        """Execute ``fn(*args)`` under this policy."""
        raise NotImplementedError

    def reset(self) -> None:
        """Drop captured state (e.g. when a new clip or prompt changes static inputs)."""
