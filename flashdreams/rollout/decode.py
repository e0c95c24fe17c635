"""Decode a block's latents and commit its K/V: one after the other, or overlapped.

Overlapped decode (``overlap_decode``, CUDA only): the block's decode runs on a side stream,
after the diffuse, while the commit forward runs on the current stream. The commit writes only
the KV cache, never the latents the decode reads; the current stream waits for the decode
before the frames leave the step. Step latency stays encode + diffuse + decode (the decode timed
on its stream); the block period becomes the time from the step's start to both being done.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from flashdreams import ConfigError
from flashdreams.stats import StepTimer
from flashdreams.vae.base import StreamingDecoder

log = logging.getLogger(__name__)
_logged_cpu_overlap = False  # the CPU fallback of ``overlap_decode`` is logged once per process


def check_overlap(overlap_decode, device: torch.device) -> bool:
    """Whether the decode really overlaps the commit: asked for, and on CUDA."""
    global _logged_cpu_overlap
    if not isinstance(overlap_decode, bool):
        raise ConfigError(f"rollout.overlap_decode={overlap_decode!r} must be true or false")
    if overlap_decode and device.type != "cuda":
        if not _logged_cpu_overlap:
            _logged_cpu_overlap = True
            log.info("rollout.overlap_decode=true: decode and commit run one after the "
                     "other on %s (overlap needs CUDA streams)", device.type)  # fmt: skip
        return False
    return overlap_decode


class BlockDecoder:
    """Runs a block's decode and its commit (``commit``: a callable, or None for none).

    Args:
        vae: the streaming decoder.
        dtype: the latents' dtype for the decoder.
        device: the run's device.
        overlap: decode on a side stream while the commit runs (CUDA; see the module doc).
    """

    def __init__(self, vae: StreamingDecoder, dtype: torch.dtype, device: torch.device,
                 overlap: bool) -> None:  # fmt: skip
        self.vae, self.dtype, self.device = vae, dtype, device
        self.overlap = check_overlap(overlap, device)
        self._side_stream: torch.cuda.Stream | None = None  # made on first use

    def __call__(self, x0: torch.Tensor, timer: StepTimer,
                 commit: Callable[[], None] | None) -> torch.Tensor | None:  # fmt: skip
        """Frames (B, T, 3, H, W) of latents ``x0`` (B, C, F, h, w); ``commit`` runs too."""
        if self.overlap:
            return self._overlapped(x0, timer, commit)
        timer.start("decode")
        frames = self.vae.decode_step(x0.to(self.dtype))
        timer.stop()
        if commit is not None:
            timer.start("commit")
            commit()
            timer.stop()
        return frames

    def _overlapped(self, x0, timer: StepTimer, commit) -> torch.Tensor | None:
        """Decode on the side stream while the commit runs on the current one (CUDA).

        Both start after the diffuse. The commit writes only the KV cache (its input is a read
        of ``x0``, as is the decode's); the current stream waits for the decode before the
        frames are returned, so every later use of them is ordered after it.
        """
        main = torch.cuda.current_stream(self.device)
        if self._side_stream is None:  # high priority: the decode is on the visible path
            self._side_stream = torch.cuda.Stream(self.device, priority=-1)
        side = self._side_stream
        latents = x0.to(self.dtype)  # (B, C, F, h, w), made on the current stream
        side.wait_stream(main)  # the decode starts after the diffuse
        with torch.cuda.stream(side):
            latents.record_stream(side)  # its memory is not reused before the decode read it
            timer.start("decode")  # events on the side stream: the decode's own time
            frames = self.vae.decode_step(latents)
            timer.stop()
            decoded = torch.cuda.Event()
            decoded.record(side)
        if commit is not None:
            timer.start("commit")
            commit()
            timer.stop()
        main.wait_event(decoded)  # frames are complete for whatever the caller runs next
        if frames is not None:
            frames.record_stream(main)  # made on the side stream, freed after main's uses
        timer.close_period()
        return frames
