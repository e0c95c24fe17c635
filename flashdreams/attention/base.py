"""Protocol of an attention backend: one call signature for every kernel choice."""

from __future__ import annotations

import contextlib

import torch


class AttentionBackend:
    """Computes softmax attention on (B, L, H, D) tensors.

    Subclasses pin one kernel (cuDNN, flash, efficient, flex, ...). The parallel group may wrap a
    backend to shard heads or sequence across ranks; the model only calls it.
    """

    name: str = "base"
    #: whether ``exact()`` changes what calls compute; a graph policy then captures the forwards
    #: run inside it (the KV-cache commit) apart from the others
    has_exact_mode: bool = False

    def exact(self) -> contextlib.AbstractContextManager:
        """Calls inside run at the model's own precision (a reduced-precision backend's
        fallback kernel); the rollout runs the commit, which writes the KV cache, inside."""
        return contextlib.nullcontext()

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend.

        Args:
            q: (B, Lq, H, D) queries.
            k: (B, Lk, H, D) keys.
            v: (B, Lk, H, D) values.
            mask: optional (Lq, Lk) boolean mask, True = may attend.

        Returns:
            (B, Lq, H, D) attention output in q's dtype.
        """
        raise NotImplementedError
