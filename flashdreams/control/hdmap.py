"""OmniDreams HDMap control: a rendered HD-map video -> Wan VAE latents, the DiT's ``hdmap`` input.

The HDMap clip (``*_hdmap.mp4`` of ``nvidia/omni-dreams-samples``) is streamed from the file
(``VideoFrames``: one ffmpeg reader, frames decoded only as far as a block needs), resampled
to the run's frame rate (nearest source frame of each output time) and size (Lanczos, when the
aspect ratio matches; else a one-line error), then encoded *streamed*: the Wan 2.1 encoder's
causal chunks (frame 0 alone, then 4 frames per latent frame) run through one per-conv cache
as the rollout asks for latent frames, so each AR block decodes and encodes only its own frames
(8 video frames for the release's 2-latent blocks) and the latents equal those of one encode of
the whole clip. ``encode_block`` does a block's work ahead of its forwards (timed as the
step's ``control`` stage).

Closed loop: a client (a driving simulator rendering the map) hands frames in with
:meth:`HDMapControl.push_frames` (``Session.push_frames``, or binary messages to
``flashdreams-serve``). Video frame ``k`` of the stream is conditioned by HDMap frame ``k``; a
pushed frame replaces the file's frame of that index. When a step needs a frame nobody
pushed, the file's frame is used (if the file has it), else the last frame used repeats.
``control.live=true`` makes the file optional: the stream then waits for its first frame.
Memory is bounded: pushed frames at most ``max_ahead_frames`` ahead of the encoded ones, and
the latents of the first and last ``history_frames`` latent frames (a prompt switch replays
the commits of the frames still in the KV cache, which read their HDMap latents again).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from flashdreams import ConfigError
from flashdreams.control.base import ControlEncoder
from flashdreams.control.video_frames import VideoFrames, fit, probe_video, same_aspect
from flashdreams.io.image import image_to_tensor
from flashdreams.model.base import ConditionInput

log = logging.getLogger(__name__)


class HDMapControl(ControlEncoder):
    """The ``hdmap`` input of an OmniDreams DiT from an HDMap video, encoded block by block.

    Args:
        encoder: the Wan 2.1 VAE encoder (``flashdreams.vae.wan21_encode.Wan21Encoder``).
        video: the HDMap video (mp4, ...); required unless ``live``.
        fps: the run's frame rate; the video is resampled to it (the release: 30).
        channels: latent channels of the encoder (the DiT's ``hdmap_channels``: 16).
        live: the video is optional; without it the stream waits for its first pushed frame.
        max_ahead_frames: pushed frames held at most beyond the last encoded one.
        history_frames: latent frames whose latents are kept at each end of the stream (must
            cover the KV cache's window and sink frames for a prompt switch's recache).
    """

    def __init__(self, encoder, video: str | None = None, fps: float = 30.0,
                 channels: int = 16, live: bool = False, max_ahead_frames: int = 32,
                 history_frames: int = 32) -> None:  # fmt: skip
        super().__init__()
        for key, value in (("max_ahead_frames", max_ahead_frames),
                           ("history_frames", history_frames)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"control.{key}={value!r} must be an integer >= 1")
        self.encoder, self.video, self.fps, self.channels = encoder, video, float(fps), channels
        self.live, self.max_ahead, self.history = live, max_ahead_frames, history_frames
        self.temporal_factor = int(encoder.temporal_factor)
        self.spatial_factor = int(encoder.spatial_factor)
        self._size: tuple[int, int] | None = None  # (width, height) of the run; None: no clip
        self._file: VideoFrames | None = None
        self._pushed: dict[int, np.ndarray] = {}  # video frame -> (H, W, 3) uint8, not yet used
        self._next_push = 0  # where a push without an index lands
        self._last: np.ndarray | None = None  # the last frame encoded (repeats when none comes)
        self._latents: dict[int, torch.Tensor] = {}  # latent frame -> (1, C, 1, h, w)
        self._encoded = 0  # latent frames encoded so far (the causal cache holds their past)
        self._cache: list | None = None
        self._device: torch.device | str = "cpu"

    def provides(self) -> dict[str, ConditionInput]:
        return {"hdmap": ConditionInput.per_latent_pixel("hdmap", self.channels)}

    # ---------------------------------------------------------------- checks
    def _video_frames(self, num_frames: int) -> int:
        """Video frames a clip of ``num_frames`` latent frames covers (1 + 4 (n - 1))."""
        return 1 + self.temporal_factor * (num_frames - 1)

    def _probe(self) -> tuple[int, int, float, int]:
        if not self.video:
            raise ConfigError("control.video=null: OmniDreams is driven by an HDMap video; "
                              "pass control.video=path/to/clip_hdmap.mp4 (or control.live=true "
                              "to stream the frames in)")  # fmt: skip
        return probe_video(str(self.video), "control.video")

    def _resampled(self, src_fps: float, count: int) -> int:
        """Frames the file gives at the run's frame rate."""
        return count if src_fps <= 0 else max(1, int(count * self.fps / src_fps + 1e-6))

    def check_frames(self, num_frames: int) -> None:
        if self.live and not self.video:
            return  # frames come from the client
        _, _, src_fps, count = self._probe()
        need, have = self._video_frames(num_frames), self._resampled(src_fps, count)
        if have < need:
            raise ConfigError(f"control.video={self.video!r} is too short: {count} frames at "
                              f"{src_fps:g} fps give {have} at {self.fps:g} fps, the clip of "
                              f"{num_frames} latent frames needs {need}")  # fmt: skip

    # ---------------------------------------------------------------- clip
    def prepare(self, batch, *, height, width, num_frames, device) -> None:
        if self._file is not None:
            self._file.close()
        self._latents, self._encoded, self._device = {}, 0, device
        self._cache = [None] * self.encoder._num_convs
        self._size, self._file, self._pushed, self._next_push, self._last = (
            (width, height), None, {}, 0, None)  # fmt: skip
        if self.live and not self.video:
            return
        probe = self._probe()
        src_w, src_h, src_fps, count = probe
        if not same_aspect(src_w, src_h, width, height):
            raise ConfigError(f"control.video={self.video!r} is {src_w}x{src_h}, the run is "
                              f"{width}x{height}: the HDMap must have the run's aspect ratio")  # fmt: skip
        if num_frames is not None:
            self.check_frames(num_frames)
        total = self._resampled(src_fps, count)
        if num_frames is not None:
            total = min(total, self._video_frames(num_frames))
        self._file = VideoFrames(str(self.video), probe, self.fps, width, height, total)
        if (src_w, src_h) != (width, height) or abs(src_fps - self.fps) > 1e-3:
            log.info("control.video %s: %dx%d at %g fps resampled to %dx%d at %g fps "
                     "(%d frames, streamed)", self.video, src_w, src_h, src_fps, width, height,
                     self.fps, total)  # fmt: skip

    # ---------------------------------------------------------------- closed loop
    def frames_ahead(self) -> int:
        return self.max_ahead

    def waiting(self) -> bool:
        """True while the stream cannot step: live, no file, and frame 0 not pushed yet."""
        return (self._size is not None and self._file is None and self._last is None
                and 0 not in self._pushed)  # fmt: skip

    def push_frames(self, frames, first: int | None = None) -> int:
        """Streamed HDMap frames: (T, H, W, 3) uint8 RGB of the run's aspect ratio (resized to
        the run), for video frames ``first``, ``first + 1``, ... of the stream (default: right
        after the last pushed frame, or the first not yet encoded). Returns ``first``.

        Raises:
            ValueError: no clip started, frames of another shape / aspect ratio, frames already
                encoded (late) or more than ``max_ahead_frames`` beyond the encoded ones.
        """
        if self._size is None:
            raise ValueError("HDMap frames can be pushed once a clip started")
        arr = np.asarray(frames)
        if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8 or not len(arr):
            raise ValueError(f"HDMap frames must be (T, H, W, 3) uint8, got {list(arr.shape)} "
                             f"({arr.dtype})")  # fmt: skip
        width, height = self._size
        if not same_aspect(arr.shape[2], arr.shape[1], width, height):
            raise ValueError(f"HDMap frames are {arr.shape[2]}x{arr.shape[1]}, the run is "
                             f"{width}x{height}: the aspect ratio must match")  # fmt: skip
        done = self._consumed()
        first = max(self._next_push, done) if first is None else int(first)
        if first < done:
            raise ValueError(f"HDMap frame {first} comes too late: frames up to {done - 1} are "
                             f"encoded (next: {done})")  # fmt: skip
        if first + len(arr) > done + self.max_ahead:
            raise ValueError(f"HDMap frames {first}..{first + len(arr) - 1} are too far ahead: "
                             f"frames up to {done + self.max_ahead - 1} are taken now "
                             f"(control.max_ahead_frames={self.max_ahead})")  # fmt: skip
        for i, img in enumerate(arr):
            self._pushed[first + i] = fit(img, width, height)
        self._next_push = max(self._next_push, first + len(arr))
        return first

    def _consumed(self) -> int:
        """Video frames the encoded latent frames cover (1 + tf (n - 1); 0 before any)."""
        return 0 if self._encoded == 0 else self._video_frames(self._encoded)

    # ---------------------------------------------------------------- streamed encode
    def _frame(self, k: int) -> np.ndarray:
        """Video frame ``k``: pushed, else the file's, else the last one used again."""
        img = self._pushed.pop(k, None)
        if img is None and self._file is not None:
            img = self._file.get(k)
        img = self._last if img is None else img
        if img is None:
            raise ConfigError("control.video=null and no HDMap frame was pushed: a live "
                              "HDMap clip needs its first frame before the first step")  # fmt: skip
        self._last = img
        return img

    def _pixels(self, latent: int) -> torch.Tensor:
        """(1, 3, T, H, W) in [-1, 1]: the video frames of latent frame ``latent`` (frame 0
        alone, then ``temporal_factor`` frames each)."""
        tf = self.temporal_factor
        first, num = (0, 1) if latent == 0 else (1 + tf * (latent - 1), tf)
        imgs = np.stack([self._frame(k) for k in range(first, first + num)])
        return image_to_tensor(imgs).permute(1, 0, 2, 3).unsqueeze(0)

    @torch.no_grad()
    def _encode_next(self) -> None:
        enc = self.encoder
        x = self._pixels(self._encoded).to(self._device, enc.quant_conv.weight.dtype)
        moments = enc.quant_conv(enc.encoder(x, feat_cache=self._cache, feat_idx=[0])).float()
        mu = moments[:, : enc.mean.shape[1]]
        self._latents[self._encoded] = (mu - enc.mean.float()) / enc.std.float()
        self._encoded += 1
        leaving = self._encoded - 1 - self.history  # keep [0, history) and the last history
        if leaving >= self.history:
            self._latents.pop(leaving, None)

    def encode_block(self, start: int, num: int) -> None:
        """Encode the HDMap latents of latent frames [start, start + num) now."""
        if self._size is not None:
            while self._encoded < start + num:
                self._encode_next()

    def inputs(self, start: int, num: int) -> dict[str, torch.Tensor]:
        """``hdmap`` (1, C, num, h, w) of latent frames [start, start + num), broadcast over
        the batch; frames are encoded once, in order, as they are first asked for."""
        if self._size is None:
            return {}
        self.encode_block(start, num)
        gone = [i for i in range(start, start + num) if i not in self._latents]
        if gone:
            raise RuntimeError(f"the HDMap latents of frame {gone[0]} were dropped: raise "
                               f"control.history_frames={self.history} to cover the KV cache")  # fmt: skip
        return {"hdmap": torch.cat([self._latents[i] for i in range(start, start + num)], 2)}

    def state(self) -> dict | None:
        if self._size is None:
            return None
        return {"hdmap_latent_frames": self._encoded, "hdmap_next_frame": self._consumed()}
