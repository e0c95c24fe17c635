"""A KV cache refilled before every block: a reconstituted context, then the block."""

from __future__ import annotations

import torch

from flashdreams import ConfigError
from flashdreams.cache.base import KVCache


class ContextKVCache(KVCache):
    """Fixed buffers of ``context_frames + frames_per_block`` frames: ``[context | block]``.

    For models that re-run chosen history frames before each block instead of keeping
    committed K/V (``DiT.context_plan``, HY-WorldPlay's memory). Per block:

    1. ``begin_context(n)``: the next forward (the history's) writes slots [0, n) and attends
       to exactly those keys (the history frames see only each other);
    2. ``begin_block(start, num)``: the block's forwards write slots [n, n + num) and attend to
       all n + num frames.

    Buffers never move and the index buffers are kept per length, so once the history is
    ``context_frames`` long every block has the same shapes (graph replay). Nothing carries
    from one block to the next: a block without ``begin_context`` attends to itself only.

    Args:
        context_frames: most history frames a block attends to (HY-WorldPlay: 16).
    """

    rolls = True  # any stream fits: the history is chosen anew for every block

    def __init__(self, *, context_frames: int, **kwargs) -> None:
        if context_frames < 0:
            raise ConfigError(f"cache.context_frames={context_frames} must be >= 0")
        self.context_frames = context_frames
        self.context = 0  # history frames of the current block
        super().__init__(**kwargs)

    def _capacity(self) -> int:
        return self.context_frames + self.frames_per_block

    def reset(self) -> None:
        super().reset()
        self.context = 0

    @property
    def is_steady(self) -> bool:
        return self.context == self.context_frames

    def frame_slot(self, frame: int) -> int:
        raise IndexError("cache=context places frames by begin_context / begin_block, not by "
                         "their index")  # fmt: skip

    def _slots(self, first: int, num: int) -> None:
        """Write slots [first, first + num); valid keys [0, first + num)."""
        if first + num > self.capacity_frames:
            raise IndexError(f"{first} context frames + a block of {num} exceed the cache's "
                             f"{self.capacity_frames} frames (cache.context_frames="
                             f"{self.context_frames})")  # fmt: skip
        tpf = self.tokens_per_frame
        idx = torch.arange(first * tpf, (first + num) * tpf)
        buffer = self._index_buffers.get(idx.numel())
        if buffer is None:
            buffer = self._index_buffers[idx.numel()] = torch.empty_like(
                idx, device=self.write_index.device
            )
        buffer.copy_(idx, non_blocking=True)
        self.write_index = buffer
        self.filled_frames = first + num
        self.valid_tokens = self.filled_frames * tpf

    def begin_context(self, num_frames: int) -> None:
        """The history forward of the next block: ``num_frames`` frames in slots [0, n)."""
        self.context = num_frames
        self._slots(0, num_frames)

    def begin_block(self, start_frame: int, num_frames: int) -> None:
        self._slots(self.context, num_frames)
