"""A model's self-attention cache plus the caches of its extra K/V branches, driven as one."""

from __future__ import annotations

from flashdreams.cache.base import KV, KVCache


class BranchedKVCache:
    """The loop's cache for a model whose layout declares extra K/V branches
    (``CacheLayout.branches``: an action module's keys, a memory branch, ...).

    ``update`` / ``write`` / ``read`` act on the self-attention cache, so the blocks use this
    object as they use a plain ``KVCache``; ``branch(name)`` is the named branch's own cache.
    ``begin_block`` and ``reset`` reach every cache: all share the frame slots and the valid
    frame range of the recipe's cache policy (window, sink), each with its own tokens per frame.

    Args:
        main: the self-attention cache.
        branches: name -> cache of that branch, built by the same cache factory.
    """

    def __init__(self, main: KVCache, branches: dict[str, KVCache]) -> None:
        self.main, self.branches = main, dict(branches)

    def branch(self, name: str) -> KVCache:
        return self.branches[name]

    def _all(self) -> list[KVCache]:
        return [self.main, *self.branches.values()]

    def begin_block(self, start_frame: int, num_frames: int) -> None:
        for cache in self._all():
            cache.begin_block(start_frame, num_frames)

    def begin_context(self, num_frames: int) -> None:
        for cache in self._all():
            cache.begin_context(num_frames)

    def reset(self) -> None:
        for cache in self._all():
            cache.reset()

    def update(self, layer: int, k, v) -> KV:
        return self.main.update(layer, k, v)

    def write(self, layer: int, index, k, v) -> None:
        self.main.write(layer, index, k, v)

    def read(self, layer: int, index=None):
        return self.main.read(layer, index)

    def frame_slot(self, frame: int) -> int:
        return self.main.frame_slot(frame)

    @property
    def valid_tokens(self) -> int:
        """Valid keys of every cache (the graph key changes with any of them)."""
        return self.main.valid_tokens

    @property
    def filled_frames(self) -> int:
        return self.main.filled_frames

    @property
    def capacity_frames(self) -> int:
        return self.main.capacity_frames

    def sizer(self):
        return self.main.sizer()

    @property
    def rolls(self) -> bool:
        return self.main.rolls

    @property
    def frames_per_block(self) -> int:
        return self.main.frames_per_block

    @property
    def tokens_per_frame(self) -> int:
        return self.main.tokens_per_frame

    @property
    def is_steady(self) -> bool:
        return self.main.is_steady
