"""Protocol of a parallel layout: which rank does what, and the model's sequence hook.

This module must stay free of ``torch.distributed``: the model imports ``SequenceParallel``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class SequenceParallel:
    """Hook the DiT calls around its blocks; the identity for one process.

    A context-parallel policy composes a subclass into the model's ``Attention``
    (``attention.sequence``) that keeps only this rank's tokens through the blocks and
    reassembles the head's output.
    """

    def scatter(self, tokens, cos, sin, cache, num_frames: int) -> tuple:
        """This rank's share of the block's tokens before the transformer blocks.

        Args:
            tokens: (B, L, C) patch tokens in (frame, h, w) order.
            cos: (L, D // 2) RoPE table.
            sin: (L, D // 2) RoPE table.
            cache: the KV cache or None; a policy may return a stand-in whose ``update``
                moves K/V between ranks before (or instead of) caching them.
            num_frames: latent frames in the forward (L = num_frames * tokens per frame).

        Returns:
            (tokens, cos, sin, cache) for the blocks.
        """
        return tokens, cos, sin, cache

    def gather(self, out, num_frames: int):
        """(B, L_local, C') per-token head output -> (B, L, C') of the whole block."""
        return out

    #: ``total(x)``: the sum of a (B, L_local, ...) per-token tensor over the forward's real
    #: tokens of every rank, the same on all ranks (a step cache's decision); None here: this
    #: process holds every token, so a plain reduction is the total
    total = None


class ParallelPolicy:
    """Rank bookkeeping and model wiring of a parallel layout (one process: a no-op).

    Call order (``build_rollout``): ``setup`` -> ``model.set_attention(attention(backend))``
    -> ``cache_factory(factory)`` -> the rollout runs -> ``teardown``.

    Attributes:
        rank: this process's rank.
        world_size: number of processes.
    """

    name: str = "single"
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Only the main rank writes video, stats and logs."""
        return self.rank == 0

    def setup(self, device):
        """Join the launcher's process group (no-op for one process).

        Args:
            device: the run's resolved torch device.

        Returns:
            This rank's device (``cuda:LOCAL_RANK`` under torchrun on GPUs).
        """
        return device

    def attention(self, backend):
        """The attention the model's blocks call: ``backend`` composed with this layout's
        sequence hook (one process: the backend as it is, tokens untouched)."""
        from flashdreams.attention.base import Attention

        return Attention(backend)

    def cache_factory(self, factory: Callable[..., Any]) -> Callable[..., Any]:
        """Wrap the rollout's cache factory so it builds this rank's share of the KV cache.

        The rollout finishes the factory with the model's ``num_heads`` and
        ``tokens_per_frame``; a policy rewrites them to the local head count / token count.
        """
        return factory

    def broadcast(self, obj: Any) -> Any:
        """``obj`` as rank 0 has it (e.g. its output dir), on every rank."""
        return obj

    def teardown(self) -> None:
        """Leave the process group if this policy created it."""
