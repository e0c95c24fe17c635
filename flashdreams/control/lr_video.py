"""The low-resolution video of a super-resolution recipe (FlashVSR) -> the DiT's LR tokens.

``control=lr_video`` reads ``video=clip.mp4`` once per clip the way the FlashVSR release
prepares it (``examples/WanVSR``): every frame upscaled by ``scale`` (PIL bicubic) and
centre-cropped to the run's ``rollout.height`` x ``rollout.width``, the clip padded with 4
copies of its last frame and cut to 8n + 1 frames, pixels in [-1, 1]. Each forward's
``inputs(start, num)`` runs the LR projector (``LRProjector``, weights ``LQ_proj_in.ckpt``) on
the 4 LR frames of each of its latent frames: the DiT's ``lr_features``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from flashdreams import ConfigError
from flashdreams.control.base import ControlEncoder
from flashdreams.model.base import ConditionInput
from flashdreams.model.flashvsr.projector import FRAMES_PER_LATENT, UNSHUFFLE, LRProjector

log = logging.getLogger(__name__)


def read_video(path: str | Path) -> np.ndarray:
    """(T, H, W, 3) uint8 frames of a video file (ffmpeg); one-line errors when unreadable."""
    import imageio_ffmpeg

    if not Path(path).is_file():
        raise ConfigError(f"video={path!s}: no such file")
    try:
        reader = imageio_ffmpeg.read_frames(str(path))
        meta = next(reader)
        w, h = meta["size"]
        frames = [np.frombuffer(f, np.uint8).reshape(h, w, 3) for f in reader]
    except (RuntimeError, OSError, StopIteration, KeyError) as err:
        raise ConfigError(f"video={path!s} cannot be read: {str(err).splitlines()[0]}") from err
    if not frames:
        raise ConfigError(f"video={path!s} holds no frames")
    return np.stack(frames)


def clip_frames(raw: int) -> int:
    """LR frames the release keeps of a ``raw``-frame video: padded by 4, cut to 8n + 1."""
    padded = raw + 4
    return 0 if padded < 1 else (padded - 1) // 8 * 8 + 1


class LRVideoControl(ControlEncoder):
    """LR video file -> ``lr_features`` (B, lr_layers, num * tokens, dim) per forward.

    Args:
        video: the LR video file (mp4, ...). Required.
        checkpoint: the projector's weights (``LQ_proj_in.ckpt``, release names); None = seeded
            random weights.
        scale: upscaling factor of the LR frames before the centre crop (4 or 2).
        lr_layers: the projector's per-layer outputs (must equal ``model.lr_layers``).
        dim: the DiT width (``model.dim``).
        hidden_dim1, hidden_dim2: the projector's convolution widths (2048, 3072).
        dtype: the projector's weight dtype.
        seed: seed of the random weights.
    """

    def __init__(self, video: str | None = None, checkpoint: str | None = None,
                 scale: float = 4.0, lr_layers: int = 1, dim: int = 1536,
                 hidden_dim1: int = 2048, hidden_dim2: int = 3072, dtype: str = "bfloat16",
                 seed: int = 0) -> None:  # fmt: skip
        super().__init__()
        if video is None or str(video) in ("", "???"):
            raise ConfigError("video= is required: the low-resolution clip to upscale "
                              "(e.g. video=clip.mp4)")  # fmt: skip
        if not scale > 0:
            raise ConfigError(f"control.scale={scale} must be > 0")
        self.video_path, self.scale = str(video), float(scale)
        self.projector = LRProjector(3, dim, lr_layers, hidden_dim1, hidden_dim2)
        self._load(checkpoint, seed)
        self.projector.to(getattr(torch, str(dtype))).eval().requires_grad_(False)
        self._raw: np.ndarray | None = None  # the decoded file, read once
        self._frames: np.ndarray | None = None  # (T, H, W, 3) uint8 at the run's size
        self._batch, self._device = 1, torch.device("cpu")

    def _load(self, checkpoint: str | None, seed: int) -> None:
        if checkpoint is None:
            gen = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for name, p in self.projector.named_parameters():
                    if name.endswith("gamma"):
                        continue
                    p.copy_(torch.randn(p.shape, generator=gen) * (0 if name.endswith("bias")
                            else p[0].numel() ** -0.5))  # fmt: skip
            return
        from flashdreams.io.checkpoint import load_torch_file, resolve_path

        state = load_torch_file(resolve_path(checkpoint))
        try:
            self.projector.load_state_dict(state, strict=True)
        except RuntimeError as err:
            first = str(err).splitlines()[1].strip() if "\n" in str(err) else str(err)
            raise ConfigError(f"control.checkpoint={checkpoint} does not match the LR "
                              f"projector: {first}") from err  # fmt: skip

    # ---------------------------------------------------------------- contract
    def provides(self) -> dict[str, ConditionInput]:
        p = self.projector

        def shape(b: int, f: int, hw: tuple[int, int]) -> tuple[int, ...]:
            return (b, p.layer_num, f * (hw[0] // 2) * (hw[1] // 2), p.out_dim)

        return {"lr_features": ConditionInput("lr_features", shape, doc="LR projector tokens")}

    def _raw_frames(self) -> np.ndarray:
        if self._raw is None:
            self._raw = read_video(self.video_path)
        return self._raw

    def check_frames(self, num_frames: int) -> None:
        have = clip_frames(len(self._raw_frames()))
        need = FRAMES_PER_LATENT * num_frames + 1
        if have < need:
            raise ConfigError(
                f"video={self.video_path} has {len(self._raw_frames())} frames ({have} after "
                f"the release's padding to 8n+1); {num_frames} latent frames need {need} "
                "(lower rollout.total_blocks)")  # fmt: skip

    def prepare(self, batch: int, *, height: int, width: int, num_frames: int | None,
                device: torch.device) -> None:  # fmt: skip
        if height % UNSHUFFLE or width % UNSHUFFLE:
            raise ConfigError(f"rollout.height={height} and rollout.width={width} must be "
                              f"multiples of {UNSHUFFLE} for the LR projector")  # fmt: skip
        if num_frames is not None:
            self.check_frames(num_frames)
        raw = self._raw_frames()
        keep = clip_frames(len(raw))
        idx = [min(i, len(raw) - 1) for i in range(keep)]  # the last frame repeated
        self._frames = np.stack([self._upscale_crop(raw[i], height, width) for i in idx])
        self._batch, self._device = batch, torch.device(device)
        self.projector.to(self._device)

    def _upscale_crop(self, frame: np.ndarray, height: int, width: int) -> np.ndarray:
        """The release's ``upscale_then_center_crop``: bicubic by ``scale``, centre crop."""
        h0, w0 = frame.shape[:2]
        sw, sh = int(round(w0 * self.scale)), int(round(h0 * self.scale))
        if width > sw or height > sh:
            raise ConfigError(f"video={self.video_path} is {w0}x{h0}: x{self.scale:g} gives "
                              f"{sw}x{sh}, smaller than the run's {width}x{height} (lower "
                              "rollout.width / rollout.height or raise control.scale)")  # fmt: skip
        up = Image.fromarray(frame).resize((sw, sh), Image.BICUBIC)
        left, top = (sw - width) // 2, (sh - height) // 2
        return np.asarray(up.crop((left, top, left + width, top + height)))

    def lr_frames(self, lo: int, hi: int) -> torch.Tensor:
        """(B, 3, hi - lo, H, W) LR frames [lo, hi) in [-1, 1] on the run's device."""
        if self._frames is None:
            raise RuntimeError("LRVideoControl.prepare() was not called")
        if hi > len(self._frames):
            raise ConfigError(f"video={self.video_path} ended: frames up to {hi} needed, it "
                              f"has {len(self._frames)} after padding")  # fmt: skip
        x = torch.from_numpy(self._frames[lo:hi]).to(self._device)
        x = x.permute(3, 0, 1, 2).float().div(127.5).sub(1.0)[None]
        return x.expand(self._batch, *x.shape[1:])

    def inputs(self, start: int, num: int) -> dict[str, torch.Tensor]:
        lo = FRAMES_PER_LATENT * start + 1  # LR frame 0 only warms the release's cache
        video = self.lr_frames(lo, lo + FRAMES_PER_LATENT * num)
        with torch.no_grad():
            return {"lr_features": self.projector(video)}
