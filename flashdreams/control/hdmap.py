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

Encode ahead (``rollout.prefetch_control=true``): while block n is denoised, the loop asks for
block n + 1's latents (``encode_ahead``); its frames are read (ffmpeg) while the GPU denoises and
encoded on a side CUDA stream beside block n's decode and commit (``control.ahead_overlap=commit``;
``denoise``: beside the denoising), and block n + 1's ``control`` stage only waits for that work.
Only frames already known are encoded ahead (pushed, or in the file): a live stream whose next
frames have not arrived encodes them in the step, as without the option. A push that lands in
frames encoded ahead drops that work (the causal cache, the counters and the frames read are
restored) and the step encodes them again with the pushed frames, so the latents are always
those of the in-step encode.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from flashdreams import ConfigError
from flashdreams.control.base import ControlEncoder
from flashdreams.control.video_frames import VideoFrames, fit, probe_video, same_aspect
from flashdreams.model.base import ConditionInput
from flashdreams.stats import Mark

log = logging.getLogger(__name__)


@dataclass
class _Ahead:
    """An encode queued ahead of its block (``encode_ahead``) that no step has taken yet: what
    dropping it restores."""

    encoded: int  # latent frames encoded before it
    cache: list  # the causal cache before it (copies where a captured replay rewrites it)
    last: np.ndarray | None  # the last frame used before it
    frames: dict[int, np.ndarray] = field(default_factory=dict)  # video frame -> frame read
    done: torch.cuda.Event | None = None  # its side-stream work is done (CUDA)


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
        ahead_overlap: what an encode ahead's GPU work runs beside (``ahead_beside``): the
            block's ``commit`` (its frames are read while the GPU denoises, encoded once the
            decode is queued: the denoising and decode, the step's latency, have the GPU alone)
            or its ``denoise`` (read and encoded once the denoising is queued).
    """

    def __init__(self, encoder, video: str | None = None, fps: float = 30.0,
                 channels: int = 16, live: bool = False, max_ahead_frames: int = 32,
                 history_frames: int = 32, ahead_overlap: str = "commit") -> None:  # fmt: skip
        super().__init__()
        if ahead_overlap not in ("commit", "denoise"):
            raise ConfigError(f"control.ahead_overlap={ahead_overlap!r} must be commit or denoise")
        self.ahead_beside = ahead_overlap
        for key, value in (("max_ahead_frames", max_ahead_frames),
                           ("history_frames", history_frames)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"control.{key}={value!r} must be an integer >= 1")
        self.encoder, self.video, self.fps, self.channels = encoder, video, float(fps), channels
        self.live, self.max_ahead, self.history = live, max_ahead_frames, history_frames
        self.temporal_factor = int(encoder.temporal_factor)
        self.lead_frames = int(encoder.lead_frames)  # video frames of latent frame 0
        self.spatial_factor = int(encoder.spatial_factor)
        self._size: tuple[int, int] | None = None  # (width, height) of the run; None: no clip
        self._file: VideoFrames | None = None
        self._pushed: dict[int, np.ndarray] = {}  # video frame -> (H, W, 3) uint8, not yet used
        self._next_push = 0  # where a push without an index lands
        self._last: np.ndarray | None = None  # the last frame encoded (repeats when none comes)
        self._latents: dict[int, torch.Tensor] = {}  # latent frame -> (1, C, 1, h, w)
        self._encoded = 0  # latent frames encoded so far (the causal cache holds their past)
        self._cache: list | None = None
        self._staging: dict[tuple, tuple] = {}  # frames shape -> (pinned uint8, copy event)
        self._device: torch.device | str = "cpu"
        self._ahead: _Ahead | None = None  # an encode ahead of its block, not taken yet
        # frames read and not encoded yet: read ahead of their encode, or by a dropped one
        self._reread: dict[int, np.ndarray] = {}
        self._side: torch.cuda.Stream | None = None  # the encode-ahead stream (CUDA)
        self._main_done: torch.cuda.Event | None = None  # the last in-step encode is done
        self._parts: dict[str, list] = {}  # control_ahead: (begin, end) marks of encodes ahead
        self._reading: dict[int, np.ndarray] | None = None  # frames read by an encode ahead

    def provides(self) -> dict[str, ConditionInput]:
        return {"hdmap": ConditionInput.per_latent_pixel("hdmap", self.channels)}

    # ---------------------------------------------------------------- checks
    def _video_frames(self, num_frames: int) -> int:
        """Video frames the encode of ``num_frames`` latent frames reads: ``lead + 4 (n - 1)``
        (the Wan encoders: frame 0 alone, 1 + 4 (n - 1), the clip's length; TAEHV: 4 n, the
        clip's last frame repeated past its end)."""
        return self.lead_frames + self.temporal_factor * (num_frames - 1)

    def _probe(self) -> tuple[int, int, float, int]:
        if not self.video:
            raise ConfigError("control.video=null: OmniDreams is driven by an HDMap video; "
                              "pass hdmap=path/to/clip_hdmap.mp4 (control.video=) (or control.live=true "
                              "to stream the frames in)")  # fmt: skip
        return probe_video(str(self.video), "control.video")

    def _resampled(self, src_fps: float, count: int) -> int:
        """Frames the file gives at the run's frame rate."""
        return count if src_fps <= 0 else max(1, int(count * self.fps / src_fps + 1e-6))

    def check_frames(self, num_frames: int) -> None:
        if self.live and not self.video:
            return  # frames come from the client
        _, _, src_fps, count = self._probe()
        need = 1 + self.temporal_factor * (num_frames - 1)  # the clip's own video frames
        have = self._resampled(src_fps, count)
        if have < need:
            raise ConfigError(f"control.video={self.video!r} is too short: {count} frames at "
                              f"{src_fps:g} fps give {have} at {self.fps:g} fps, the clip of "
                              f"{num_frames} latent frames needs {need}")  # fmt: skip

    # ---------------------------------------------------------------- clip
    def prepare(self, batch, *, height, width, num_frames, device) -> None:
        if self._file is not None:
            self._file.close()
        self._latents, self._encoded, self._device = {}, 0, device
        self._ahead, self._reread, self._main_done, self._parts = None, {}, None, {}
        self._cache = self.encoder.new_cache()
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

    def pending_frames(self) -> int:
        return len(self._pushed)

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
        done = self._settled()
        first = max(self._next_push, done) if first is None else int(first)
        if self._ahead is not None and first + len(arr) > done and first < self._consumed():
            self._drop_ahead()  # the frames change: the step encodes them again
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

    def _consumed(self, encoded: int | None = None) -> int:
        """Video frames the encoded latent frames read (``_video_frames``; 0 before any)."""
        encoded = self._encoded if encoded is None else encoded
        return 0 if encoded == 0 else self._video_frames(encoded)

    def _settled(self) -> int:
        """Video frames encoded for good: those encoded ahead may still be dropped."""
        return self._consumed(self._encoded if self._ahead is None else self._ahead.encoded)

    # ---------------------------------------------------------------- streamed encode
    def _frame(self, k: int) -> np.ndarray:
        """Video frame ``k``: pushed, else the file's, else the last one used again."""
        img, read = self._pushed.pop(k, None), self._reread.pop(k, None)
        img = read if img is None else img  # a push wins over a frame read before it came
        if img is None and self._file is not None:
            img = self._file.get(k)
        img = self._last if img is None else img
        if img is None:
            raise ConfigError("control.video=null and no HDMap frame was pushed: a live "
                              "HDMap clip needs its first frame before the first step")  # fmt: skip
        self._last = img
        if self._reading is not None:  # being encoded ahead: kept in case it is dropped
            self._reading[k] = img
        return img

    def _frames(self, first: int, num: int) -> torch.Tensor:
        """(T, H, W, 3) uint8 video frames [first, first + num) on the run's device.

        The frames travel as uint8 (a quarter of the bytes of float pixels) and become pixels
        on the device (``_step``). On CUDA they are stacked into a pinned buffer per shape and
        copied without a host sync; the buffer is refilled only once its last copy is done.
        """
        imgs = [self._frame(k) for k in range(first, first + num)]
        device = torch.device(self._device)
        if device.type != "cuda":
            return torch.from_numpy(np.stack(imgs)).to(device)
        shape = (num, *imgs[0].shape)
        buf, copied = self._staging.get(shape, (None, None))
        if buf is None:
            buf = torch.empty(shape, dtype=torch.uint8, pin_memory=True)
        elif copied is not None:
            copied.synchronize()  # the previous block's copy out of this buffer is done
        np.stack(imgs, out=buf.numpy())
        frames = buf.to(device, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        self._staging[shape] = (buf, copied)
        return frames

    def _step(self, frames: torch.Tensor, cache: list) -> tuple[torch.Tensor, list]:
        """uint8 frames (T, H, W, 3) + the causal cache -> normalized latents and the new cache
        (a function of tensors: compiled and captured for the steady block). Pixels in [-1, 1]
        as ``image_to_tensor`` gives them (x / 255 * 2 - 1 in float32), in the encoder's dtype."""
        x = frames.permute(3, 0, 1, 2).unsqueeze(0).float() / 255.0
        x = (2.0 * x - 1.0).to(self.encoder.input_dtype)
        return self.encoder.encode_step(x, cache)

    @torch.no_grad()
    def _encode_upto(self, end: int) -> None:
        """Encode latent frames [encoded, end): latent frame 0 alone (``lead_frames`` video
        frames), then all the others asked for in one causal step (4 video frames each). Once
        the cache has its steady shapes (from latent frame 2 on), the step runs under the
        control's graph policy."""
        tf = self.temporal_factor
        while self._encoded < end:
            count = 1 if self._encoded == 0 else end - self._encoded
            frames = self._frames(
                self._consumed(), self.lead_frames if self._encoded == 0 else tf * count
            )
            steady = None if self._encoded < 2 else tuple(frames.shape)
            latents, self._cache = self.run_graph("hdmap_encode", self._step, frames, self._cache,
                                                  shape_key=steady)  # fmt: skip
            for j in range(count):  # own copies: a captured step rewrites its output in place
                self._latents[self._encoded] = latents[:, :, j : j + 1].clone()
                self._encoded += 1
                leaving = self._encoded - 1 - self.history  # keep [0, history), the last history
                if leaving >= self.history:
                    self._latents.pop(leaving, None)

    def encode_block(self, start: int, num: int) -> None:
        """Encode the HDMap latents of latent frames [start, start + num) now (after waiting
        for an encode ahead that reached into them)."""
        if self._size is None:
            return
        if self._ahead is not None and start + num > self._ahead.encoded:
            self._take_ahead()
        if self._encoded < start + num:
            self._encode_upto(start + num)
            if self._cuda():
                self._main_done = torch.cuda.Event()
                self._main_done.record()

    # ---------------------------------------------------------------- encode ahead
    def _cuda(self) -> bool:
        return torch.device(self._device).type == "cuda"

    def _known(self, k: int) -> bool:
        """Whether video frame ``k`` is known now (pushed, read before, or in the file)."""
        in_file = self._file is not None and (k < self._file.total or not self.live)
        return k in self._pushed or k in self._reread or in_file  # past a file's end: its last

    def read_ahead(self, start: int, num: int) -> None:
        """With ``ahead_overlap=commit``: read the file's frames of latent frames [start,
        start + num) now (ffmpeg, while the GPU denoises), for ``encode_ahead`` to take; pushed
        frames still win (``_frame``)."""
        end = start + num
        if self.ahead_beside != "commit" or self._file is None or self._ahead is not None:
            return
        if self._size is None or self._encoded >= end:
            return
        for k in range(self._consumed(), self._video_frames(end)):
            if k not in self._pushed and k not in self._reread:
                img = self._file.get(k)
                if img is None:  # past the file's end
                    break
                self._reread[k] = img

    def encode_ahead(self, start: int, num: int) -> None:
        """Encode latent frames [start, start + num) ahead (on a side stream on CUDA) if every
        video frame they need is known; else leave them to the step (streamed frames late)."""
        end = start + num
        if self._size is None or self._ahead is not None or self._encoded >= end:
            return
        if not all(self._known(k) for k in range(self._consumed(), self._video_frames(end))):
            return
        ahead = _Ahead(self._encoded, [], self._last)
        device = torch.device(self._device)
        stream = contextlib.nullcontext()
        if self._cuda():
            if self._side is None:
                self._side = torch.cuda.Stream(device)
            if self.ahead_beside == "commit":  # after the denoising and decode queued
                self._side.wait_stream(torch.cuda.current_stream(device))
            elif self._main_done is not None:  # after the last in-step encode, not the DiT
                self._side.wait_event(self._main_done)
            stream = torch.cuda.stream(self._side)
        copy = self._graph.captures  # a replay rewrites its static output: keep the cache
        self._reading = ahead.frames
        try:
            with stream:
                begin = Mark(device)
                for c in self._cache if self._cuda() else ():
                    if isinstance(c, torch.Tensor):
                        c.record_stream(self._side)
                ahead.cache = [c.clone() if copy and isinstance(c, torch.Tensor) else c
                               for c in self._cache]  # fmt: skip
                self._encode_upto(end)
                if self._cuda():
                    ahead.done = torch.cuda.Event()
                    ahead.done.record()
                self._parts.setdefault("control_ahead", []).append((begin, Mark(device)))
        finally:
            self._reading = None
        self._ahead = ahead

    def _handover(self, ahead: _Ahead, tensors) -> None:
        """The current stream waits for ``ahead``'s side-stream work and owns ``tensors``."""
        if ahead.done is None:
            return
        current = torch.cuda.current_stream(torch.device(self._device))
        current.wait_event(ahead.done)
        for t in tensors:
            if isinstance(t, torch.Tensor):
                t.record_stream(current)

    def _take_ahead(self) -> None:
        """The encode ahead is the block's: the current stream waits for it."""
        ahead, self._ahead = self._ahead, None
        made = [self._latents[i] for i in range(ahead.encoded, self._encoded) if i in self._latents]
        self._handover(ahead, [*made, *self._cache])

    def _drop_ahead(self) -> None:
        """Undo the encode ahead (its frames changed): restore the cache, the counters and the
        last frame; the frames it read are read again from ``_reread``."""
        ahead, self._ahead = self._ahead, None
        self._handover(ahead, ahead.cache)
        for i in range(ahead.encoded, self._encoded):
            self._latents.pop(i, None)
        self._cache, self._encoded, self._last = ahead.cache, ahead.encoded, ahead.last
        for k, img in ahead.frames.items():
            self._reread.setdefault(k, img)

    def take_parts(self) -> dict[str, list]:
        """``control_ahead``: the encodes ahead queued since the last call (side stream)."""
        parts, self._parts = self._parts, {}
        return parts

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
        encoded = self._encoded if self._ahead is None else self._ahead.encoded
        return {"hdmap_latent_frames": encoded, "hdmap_next_frame": self._settled()}
