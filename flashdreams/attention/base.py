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
    #: whether a K/V bound from the cache (``kv_amax``) saves the backend a pass over K and V;
    #: the rollout then builds its cache with ``track_amax``
    wants_kv_amax: bool = False
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
        kv_amax: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Attend.

        Args:
            q: (B, Lq, H, D) queries.
            k: (B, Lk, H, D) keys.
            v: (B, Lk, H, D) values.
            mask: optional (Lq, Lk) boolean mask, True = may attend.
            kv_amax: optional (|K| bound, |V| bound), each a (1,) fp32 tensor, from a KV cache
                that tracks them (``KVCache(track_amax=True)``); backends that quantize use it.

        Returns:
            (B, Lq, H, D) attention output in q's dtype.
        """
        raise NotImplementedError


class Attention:
    """The attention the transformer blocks call: a backend composed with a sequence hook.

    Built in one place (``ParallelPolicy.attention``) and installed with ``DiT.set_attention``.
    The blocks name what they attend to, so a parallel policy never has to guess it:

    * ``self_attention(q, k, v, mask, kv_amax)``: the block's queries against the keys the KV
      cache returned (sharded across ranks under context parallelism);
    * ``cross_attention(q, k, v)``: queries against replicated context K/V (text, image);
    * ``sequence``: the model's token hook around the blocks (``scatter`` / ``gather``).

    Args:
        backend: the kernel choice (``attention=`` config group).
        sequence: the token hook (identity for one process).
    """

    def __init__(self, backend: AttentionBackend, sequence=None) -> None:
        from flashdreams.parallel.base import SequenceParallel

        self.backend = backend
        self.sequence = sequence if sequence is not None else SequenceParallel()

    @property
    def name(self) -> str:
        return self.backend.name

    @property
    def has_exact_mode(self) -> bool:
        return self.backend.has_exact_mode

    @property
    def wants_kv_amax(self) -> bool:
        return self.backend.wants_kv_amax

    def exact(self) -> contextlib.AbstractContextManager:
        return self.backend.exact()

    @property
    def kv_written_at_update(self) -> bool:
        """Whether a layer's K/V are in the cache once ``cache.update`` returned, so a forward
        that only writes K/V (``DiT.forward_kv``) may skip the last layer's attention; False
        where the self-attention call completes an exchange (context parallelism)."""
        return True

    def self_attention(self, q, k, v, mask=None, kv_amax=None) -> torch.Tensor:
        """(B, Lq, H, D) queries against the cache's (B, Lk, H, D) keys and values."""
        return self.backend(q, k, v, mask, kv_amax)

    def cross_attention(self, q, k, v) -> torch.Tensor:
        """(B, Lq, H, D) queries against context K/V shared by every rank."""
        return self.backend(q, k, v)

    def __call__(self, q, k, v, mask=None, kv_amax=None) -> torch.Tensor:
        """A plain call is a self-attention call (tests and micro-benchmarks)."""
        return self.self_attention(q, k, v, mask, kv_amax)
