"""OmniDreams HDMap control: a rendered HD-map video -> Wan VAE latents, the DiT's ``hdmap`` input.

The HDMap clip (``*_hdmap.mp4`` of ``nvidia/omni-dreams-samples``) is read once per clip,
resampled to the run's frame rate (nearest source frame of each output time) and size (Lanczos,
when the aspect ratio matches; else a one-line error), then encoded *streamed*: the Wan 2.1
encoder's causal chunks (frame 0 alone, then 4 frames per latent frame) run through one
per-conv cache as the rollout asks for latent frames, so each AR block encodes only its own
frames (8 video frames for the release's 2-latent blocks) and the latents equal those of one
encode of the whole clip. With an endless stream (``rollout.total_blocks=null``) the last
frame of the file repeats once it runs out.

Closed loop (``control.live=true``): a client (a driving simulator rendering the map) hands
frames in with :meth:`HDMapControl.push_frames`; they replace the file's frames (if any) from
the first frame not yet encoded, so they condition the next AR step; when a step needs frames
nobody gave, the last frame repeats. Frames pushed for exactly the file's frames give exactly
the file-driven latents.
"""

from __future__ import annotations

import logging
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import torch
from PIL import Image

from flashdreams import ConfigError
from flashdreams.control.base import ControlEncoder
from flashdreams.io.image import image_to_tensor
from flashdreams.model.base import ConditionInput

log = logging.getLogger(__name__)
ASPECT_TOL = 0.01  # relative aspect-ratio difference accepted before resizing


def probe_video(path: str, setting: str) -> tuple[int, int, float, int]:
    """(width, height, fps, frame count) of a video file, one-line errors naming ``setting``."""
    if not Path(path).is_file():
        raise ConfigError(f"{setting}={path!r}: no such file")
    try:
        reader = imageio_ffmpeg.read_frames(str(path))
        meta = next(reader)
        reader.close()
        count, _ = imageio_ffmpeg.count_frames_and_secs(str(path))
    except Exception as err:  # noqa: BLE001  (ffmpeg fails in several ways on bad files)
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{setting}={path!r}: cannot read it as a video ({reason})") from None
    width, height = meta["size"]
    return int(width), int(height), float(meta.get("fps") or 0.0), int(count)


def resample_indices(src_fps: float, dst_fps: float, count: int, src_count: int) -> list[int]:
    """Source frame of each of ``count`` output frames at ``dst_fps`` (nearest in time,
    clamped to the last source frame)."""
    ratio = 1.0 if src_fps <= 0 or dst_fps <= 0 else src_fps / dst_fps
    return [min(int(round(i * ratio)), src_count - 1) for i in range(count)]


class HDMapControl(ControlEncoder):
    """The ``hdmap`` input of an OmniDreams DiT from an HDMap video, encoded block by block.

    Args:
        encoder: the Wan 2.1 VAE encoder (``flashdreams.vae.wan21_encode.Wan21Encoder``).
        video: the HDMap video (mp4, ...); required.
        fps: the run's frame rate; the video is resampled to it (the release: 30).
        channels: latent channels of the encoder (the DiT's ``hdmap_channels``: 16).
        live: frames may be pushed in while the clip runs (:meth:`push_frames`); ``video``
            becomes optional (without it the clip waits for the first pushed frame).
    """

    def __init__(self, encoder, video: str | None = None, fps: float = 30.0,
                 channels: int = 16, live: bool = False) -> None:  # fmt: skip
        super().__init__()
        self.encoder, self.video, self.fps, self.channels = encoder, video, float(fps), channels
        self.live = live
        self._size: tuple[int, int] | None = None  # (width, height) of the run
        self.temporal_factor = int(encoder.temporal_factor)
        self.spatial_factor = int(encoder.spatial_factor)
        self._frames: list[np.ndarray] | None = None  # (H, W, 3) uint8 at the run's fps and size
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
                              "pass control.video=path/to/clip_hdmap.mp4")  # fmt: skip
        return probe_video(str(self.video), "control.video")

    def check_frames(self, num_frames: int) -> None:
        if self.live and not self.video:
            return  # frames come from the client
        _, _, src_fps, count = self._probe()
        need = self._video_frames(num_frames)
        have = count if src_fps <= 0 else int(count * self.fps / src_fps + 1e-6)
        if have < need:
            raise ConfigError(f"control.video={self.video!r} is too short: {count} frames at "
                              f"{src_fps:g} fps give {have} at {self.fps:g} fps, the clip of "
                              f"{num_frames} latent frames needs {need}")  # fmt: skip

    # ---------------------------------------------------------------- clip
    def prepare(self, batch, *, height, width, num_frames, device) -> None:
        self._latents, self._encoded, self._device = {}, 0, device
        self._cache = [None] * self.encoder._num_convs
        self._size, self._frames = (width, height), []
        if self.live and not self.video:
            return
        src_w, src_h, src_fps, count = self._probe()
        if abs((src_w / src_h) / (width / height) - 1.0) > ASPECT_TOL:
            raise ConfigError(f"control.video={self.video!r} is {src_w}x{src_h}, the run is "
                              f"{width}x{height}: the HDMap must have the run's aspect ratio")  # fmt: skip
        if num_frames is not None:
            self.check_frames(num_frames)
        total = count if num_frames is None else self._video_frames(num_frames)
        if num_frames is None and src_fps > 0:
            total = max(1, int(count * self.fps / src_fps + 1e-6))
        wanted = resample_indices(src_fps, self.fps, total, count)
        keep = set(wanted)
        frames: dict[int, np.ndarray] = {}
        reader = imageio_ffmpeg.read_frames(str(self.video))
        try:
            next(reader)
            for i, raw in enumerate(reader):
                if i > wanted[-1]:
                    break
                if i in keep:
                    img = np.frombuffer(raw, np.uint8).reshape(src_h, src_w, 3)
                    if (src_w, src_h) != (width, height):
                        img = np.asarray(Image.fromarray(img).resize(
                            (width, height), Image.Resampling.LANCZOS))  # fmt: skip
                    frames[i] = img
        finally:
            reader.close()
        self._frames = [frames[i] for i in wanted]
        if (src_w, src_h) != (width, height) or abs(src_fps - self.fps) > 1e-3:
            log.info("control.video %s: %dx%d at %g fps resampled to %dx%d at %g fps "
                     "(%d frames)", self.video, src_w, src_h, src_fps, width, height, self.fps,
                     len(self._frames))  # fmt: skip

    def push_frames(self, frames) -> int:
        """Live HDMap frames (``control.live=true``): (T, H, W, 3) uint8 RGB, any size of the
        run's aspect ratio (resized). They replace the clip's frames from the first one not
        yet encoded. Returns the index of the first frame they landed on.

        Raises:
            ValueError: not live, no clip prepared, or frames of another shape / aspect ratio.
        """
        if not self.live or self._frames is None:
            raise ValueError("HDMap frames can be pushed only to control=hdmap with "
                             "control.live=true, once a clip started")  # fmt: skip
        arr = np.asarray(frames)
        if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8 or not len(arr):
            raise ValueError(f"HDMap frames must be (T, H, W, 3) uint8, got {list(arr.shape)} "
                             f"({arr.dtype})")  # fmt: skip
        width, height = self._size
        if abs((arr.shape[2] / arr.shape[1]) / (width / height) - 1.0) > ASPECT_TOL:
            raise ValueError(f"HDMap frames are {arr.shape[2]}x{arr.shape[1]}, the run is "
                             f"{width}x{height}: the aspect ratio must match")  # fmt: skip
        first = self._consumed()
        for i, img in enumerate(arr):
            if img.shape[:2] != (height, width):
                img = np.asarray(Image.fromarray(img).resize((width, height),
                                                             Image.Resampling.LANCZOS))  # fmt: skip
            if first + i < len(self._frames):
                self._frames[first + i] = img
            else:
                self._frames.append(img)
        return first

    def _consumed(self) -> int:
        """Video frames the encoded latent frames cover (1 + tf (n - 1); 0 before any)."""
        return 0 if self._encoded == 0 else 1 + self.temporal_factor * (self._encoded - 1)

    # ---------------------------------------------------------------- streamed encode
    def _pixels(self, latent: int) -> torch.Tensor:
        """(1, 3, T, H, W) in [-1, 1]: the video frames of latent frame ``latent`` (frame 0
        alone, then ``temporal_factor`` frames each); past the file's end, its last frame."""
        tf = self.temporal_factor
        first, num = (0, 1) if latent == 0 else (1 + tf * (latent - 1), tf)
        if not self._frames:
            raise ConfigError("control.video=null and no HDMap frame was pushed: a live "
                              "HDMap clip needs its first frame before the first step")  # fmt: skip
        last = len(self._frames) - 1
        imgs = [Image.fromarray(self._frames[min(i, last)]) for i in range(first, first + num)]
        return image_to_tensor(imgs).permute(1, 0, 2, 3).unsqueeze(0)

    @torch.no_grad()
    def _encode_next(self) -> None:
        enc = self.encoder
        x = self._pixels(self._encoded).to(self._device, enc.quant_conv.weight.dtype)
        moments = enc.quant_conv(enc.encoder(x, feat_cache=self._cache, feat_idx=[0])).float()
        mu = moments[:, : enc.mean.shape[1]]
        self._latents[self._encoded] = (mu - enc.mean.float()) / enc.std.float()
        self._encoded += 1

    def inputs(self, start: int, num: int) -> dict[str, torch.Tensor]:
        """``hdmap`` (1, C, num, h, w) of latent frames [start, start + num), broadcast over
        the batch; frames are encoded once, in order, as they are first asked for."""
        if self._frames is None:
            return {}
        while self._encoded < start + num:
            self._encode_next()
        for old in [k for k in self._latents if k < start]:
            del self._latents[old]  # the rollout never goes back
        return {"hdmap": torch.cat([self._latents[i] for i in range(start, start + num)], 2)}

    def state(self) -> dict | None:
        return None if self._frames is None else {"hdmap_latent_frames": self._encoded}
