"""A rolling-window KV cache with attention-sink frames."""

from __future__ import annotations

from flashdreams import ConfigError
from flashdreams.cache.base import KVCache


class RollingKVCache(KVCache):
    """``sink_frames`` first frames kept forever + a ring of ``window_frames`` recent frames.

    Layout of the fixed buffers: ``[sink | window]``. Absolute frame ``a`` lives in slot ``a``
    while ``a < sink_frames``, else in slot ``sink + (a - sink) % window``.

    Phases:
        filling: the valid key range grows by one block per AR step (a prefix of the buffer);
        steady: every slot is valid; writing a block overwrites the oldest non-sink frames
        (eviction), so the block attends to sink + the most recent ``window_frames`` frames
        including itself. From here on every shape is static.

    A finite run whose frames all fit (``total_frames <= sink + window``) never evicts: its
    buffers hold ``total_frames`` only (same attention, less memory); an endless stream
    (``total_frames=None``) gets the whole window.

    Args:
        window_frames: non-sink frames attended to, including the current block; must hold at
            least one block.
        sink_frames: leading frames that are never evicted.
    """

    def __init__(self, *, window_frames: int, sink_frames: int = 0, **kwargs) -> None:
        fpb = kwargs["frames_per_block"]
        if window_frames < fpb:
            raise ConfigError(
                f"cache.window_frames={window_frames} is smaller than one block "
                f"({fpb} latent frames); use cache.window_frames>={fpb}"
            )
        if sink_frames < 0:
            raise ConfigError(f"cache.sink_frames={sink_frames} must be >= 0")
        self.window_frames = window_frames
        self.sink_frames = sink_frames
        super().__init__(**kwargs)

    rolls = True

    def _capacity(self) -> int:
        window = self.sink_frames + self.window_frames
        return window if self.total_frames is None else min(window, self.total_frames)

    def frame_slot(self, frame: int) -> int:
        if frame < self.sink_frames:
            slot = frame
        else:
            slot = self.sink_frames + (frame - self.sink_frames) % self.window_frames
        if slot >= self.capacity_frames:  # a finite run's cache, past the run's frames
            raise IndexError(f"frame {frame} is past this run's {self.capacity_frames} frames")
        return slot
