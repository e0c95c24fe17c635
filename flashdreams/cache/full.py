"""A KV cache that holds the whole rollout."""

from __future__ import annotations

from flashdreams import ConfigError
from flashdreams.cache.base import KVCache


class FullKVCache(KVCache):
    """Preallocated for every latent frame of the clip; block i writes frames [iF, (i+1)F).

    Phases: it only fills (the valid key range grows by one block per AR step); it is steady
    once the last block is written.
    """

    def _capacity(self) -> int:
        if self.total_frames is None:
            raise ConfigError("cache=full holds a finite run: set rollout.total_blocks (endless "
                              "streams need cache=rolling)")  # fmt: skip
        return self.total_frames

    def frame_slot(self, frame: int) -> int:
        if frame >= self.capacity_frames:
            raise IndexError(f"frame {frame} is past the full cache of {self.capacity_frames}")
        return frame
