"""The low-resolution video of a super-resolution recipe (FlashVSR) -> the DiT's LR tokens.

``control=lr_video`` takes its frames from a video file (``input=clip.mp4``, decoded once with
``flashdreams.io.video.read_video``) or, chained after a generation recipe
(``postprocess=flashvsr_v1_1_tiny``), from another rollout's frames as they come
(``stream=true``, :meth:`LRVideoControl.push_frames`). Every frame is upscaled by ``scale``
(bicubic: PIL on the uint8 frame as the release's file runner, or ``resize=torch`` on the
device as its GPU runner) and centre-cropped to the run's ``rollout.height`` x ``width``,
pixels in [-1, 1]; the clip is padded with 4 copies of its last frame and cut to 8n + 1 frames
(a stream: padded when it ends).

Per forward, ``inputs(start, num)`` runs the LR projector (``LRProjector``, ``LQ_proj_in.ckpt``)
on LR frames 4 start + 1 .. 4 (start + num) (frame 0 only warms the release's cache): the
DiT's ``lr_features``. The decoder's named input ``lr_frames`` (``decoder_inputs``) holds frames
4j - 3 .. 4j of each latent j (frame 0 repeated before the clip start): what the Tiny
Conditional Decoder reads and the frames colour correction matches.

Run size (``run_size``): the input's size x ``scale`` floored to ``size_multiple`` (the
release: 128), and its (8n + 1-padded) frames: ``(frames - 1) / 4`` latent frames.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from flashdreams import ConfigError
from flashdreams.control.base import ControlEncoder, RunSize
from flashdreams.model.base import ConditionInput
from flashdreams.model.flashvsr.projector import FRAMES_PER_LATENT, UNSHUFFLE, LRProjector

log = logging.getLogger(__name__)
PAD_FRAMES = 4  # copies of the last frame the release appends


def clip_frames(raw: int) -> int:
    """LR frames the release keeps of a ``raw``-frame video: padded by 4, cut to 8n + 1."""
    padded = raw + PAD_FRAMES
    return 0 if padded < 1 else (padded - 1) // 8 * 8 + 1


def latent_frames_of(raw: int) -> int:
    """Latent frames a ``raw``-frame video fills (output: 4 per latent frame, minus 3)."""
    return max(0, (clip_frames(raw) - 1) // FRAMES_PER_LATENT)


class LRVideoControl(ControlEncoder):
    """LR video (file or stream) -> ``lr_features`` per forward and ``lr_frames`` per decode.

    Args:
        video: the LR video file (``input=``); None with ``stream=true``.
        checkpoint: the projector's weights (``LQ_proj_in.ckpt``, release names); None = seeded
            random weights.
        scale: upscaling factor of the LR frames before the centre crop (4 or 2).
        lr_layers: the projector's per-layer outputs (must equal ``model.lr_layers``).
        dim: the DiT width (``model.dim``).
        hidden_dim1, hidden_dim2: the projector's convolution widths (2048, 3072).
        dtype: the projector's weight dtype.
        seed: seed of the random weights.
        size_multiple: proposed output sizes are multiples of it (the release: 128).
        resize: ``pil`` (uint8 PIL bicubic, the release's file runner) or ``torch``
            (``F.interpolate`` bicubic on the device, its GPU runner).
        stream: frames come from ``push_frames`` (a chained recipe), not a file.
        stream_size: [height, width] of the pushed frames (stream only).
        stream_frames: frames the stream will push (None: endless).
    """

    def __init__(self, video: str | None = None, checkpoint: str | None = None,
                 scale: float = 4.0, lr_layers: int = 1, dim: int = 1536,
                 hidden_dim1: int = 2048, hidden_dim2: int = 3072, dtype: str = "bfloat16",
                 seed: int = 0, size_multiple: int = 128, resize: str = "pil",
                 stream: bool = False, stream_size=None, stream_frames: int | None = None) -> None:  # fmt: skip
        super().__init__()
        if not stream and (video is None or str(video) in ("", "???")):
            raise ConfigError("input= is required: the low-resolution clip to upscale "
                              "(e.g. input=clip.mp4)")  # fmt: skip
        if not scale > 0:
            raise ConfigError(f"vsr.scale={scale} must be > 0")
        if size_multiple < UNSHUFFLE or size_multiple % UNSHUFFLE:
            raise ConfigError(f"vsr.size_multiple={size_multiple} must be a multiple of 16")
        if resize not in ("pil", "torch"):
            raise ConfigError(f"control.resize={resize!r} must be pil or torch")
        if stream and (stream_size is None or len(stream_size) != 2):
            raise ConfigError(
                "control.stream_size must be [height, width] with control.stream=true"
            )
        self.video_path, self.scale = None if stream else str(video), float(scale)
        self.multiple, self.resize, self.stream = int(size_multiple), resize, bool(stream)
        self.stream_size = None if stream_size is None else tuple(int(v) for v in stream_size)
        self.stream_frames = stream_frames
        self.projector = LRProjector(3, dim, lr_layers, hidden_dim1, hidden_dim2)
        self._load(checkpoint, seed)
        self.projector.to(getattr(torch, str(dtype))).eval().requires_grad_(False)
        self._file: np.ndarray | None = None  # the decoded file, read once
        self._raw: dict[int, torch.Tensor] = {}  # frame index -> (b, h, w, 3) uint8
        self._up: dict[int, torch.Tensor] = {}  # frame index -> (b, 3, H, W) float in [-1, 1]
        self._count, self._ended = 0, False
        self._batch, self._device, self._size = 1, torch.device("cpu"), (0, 0)
        self._marks: list = []  # (begin, end) of each projector forward (stats: projector_ms)

    @property
    def _name(self) -> str:
        return "the stream" if self.stream else f"input={self.video_path}"

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

    def decoder_provides(self) -> dict[str, str]:
        return {"lr_frames": "LR frames 4j-3..4j of each latent frame j, [-1, 1]"}

    def _file_frames(self) -> np.ndarray:
        if self._file is None:
            from flashdreams.io.video import read_video

            self._file = read_video(self.video_path)[0]
        return self._file

    def _input_frames(self) -> int | None:
        return self.stream_frames if self.stream else len(self._file_frames())

    def run_size(self) -> RunSize:
        h0, w0 = self.stream_size if self.stream else self._file_frames().shape[1:3]
        sh, sw = round(h0 * self.scale), round(w0 * self.scale)
        height, width = sh // self.multiple * self.multiple, sw // self.multiple * self.multiple
        if not height or not width:
            raise ConfigError(f"{self._name} is {w0}x{h0}: x{self.scale:g} gives {sw}x{sh}, "
                              f"smaller than vsr.size_multiple={self.multiple}")  # fmt: skip
        raw = self._input_frames()
        return RunSize(height, width, None if raw is None else latent_frames_of(raw))

    def check_frames(self, num_frames: int) -> None:
        raw = self._input_frames()
        if raw is None:
            return
        have = latent_frames_of(raw)
        if have < num_frames:
            raise ConfigError(
                f"{self._name} has {raw} frames ({have} latent frames after the release's "
                f"padding to 8n+1), the run needs {num_frames} (too short; lower "
                "rollout.total_blocks)")  # fmt: skip

    def prepare(self, batch: int, *, height: int, width: int, num_frames: int | None,
                device: torch.device) -> None:  # fmt: skip
        if height % UNSHUFFLE or width % UNSHUFFLE:
            raise ConfigError(f"rollout.height={height} and rollout.width={width} must be "
                              f"multiples of {UNSHUFFLE} for the LR projector")  # fmt: skip
        h0, w0 = self.stream_size if self.stream else self._file_frames().shape[1:3]
        sh, sw = round(h0 * self.scale), round(w0 * self.scale)
        if width > sw or height > sh:
            raise ConfigError(f"{self._name} is {w0}x{h0}: x{self.scale:g} gives {sw}x{sh}, "
                              f"smaller than the run's {width}x{height} (lower rollout.width / "
                              "rollout.height or raise vsr.scale)")  # fmt: skip
        if num_frames is not None:
            self.check_frames(num_frames)
        self._batch, self._device, self._size = batch, torch.device(device), (height, width)
        self.projector.to(self._device)
        self._raw, self._up, self._count, self._ended = {}, {}, 0, False
        if not self.stream:
            raw = self._file_frames()
            keep = clip_frames(len(raw))
            for i in range(keep):  # the last frame repeated
                self._raw[i] = torch.from_numpy(raw[min(i, len(raw) - 1)])[None]
            self._count, self._ended = keep, True

    # ---------------------------------------------------------------- the stream
    def push_frames(self, frames) -> None:
        """Append frames of the stream: (B, T, 3, H, W) floats in [0, 1] (a rollout's frames,
        quantized to uint8 as a video file stores them) or (T, H, W, 3) uint8."""
        if self._ended:
            raise RuntimeError("LRVideoControl: frames pushed after the stream ended")
        if frames.dtype != torch.uint8:
            frames = (frames.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 0, 3, 4, 2)
        else:
            frames = torch.as_tensor(frames)[:, None]  # (T, 1, H, W, 3)
        for frame in frames:
            self._raw[self._count] = frame
            self._count += 1

    def end_stream(self) -> None:
        """The stream ended: pad it with 4 copies of its last frame (the release's padding)."""
        if not self._ended and self._count:
            for _ in range(PAD_FRAMES):
                self._raw[self._count] = self._raw[self._count - 1]
                self._count += 1
        self._ended = True

    @property
    def available(self) -> int:
        """LR frames available so far (the padding included once the stream ended)."""
        return self._count

    def frames_needed(self, latent_end: int) -> int:
        """LR frames a run must have to compute latent frames [0, latent_end)."""
        return FRAMES_PER_LATENT * latent_end + 1

    # ---------------------------------------------------------------- frames
    def _upscale(self, raw: torch.Tensor) -> torch.Tensor:
        """(b, h, w, 3) uint8 -> (b, 3, H, W) float in [-1, 1]: bicubic x scale, centre crop."""
        h0, w0 = raw.shape[1:3]
        sh, sw = round(h0 * self.scale), round(w0 * self.scale)
        height, width = self._size
        top, left = (sh - height) // 2, (sw - width) // 2
        if self.resize == "pil":
            ups = [np.asarray(Image.fromarray(f.cpu().numpy()).resize((sw, sh), Image.BICUBIC))
                   for f in raw]  # fmt: skip
            x = torch.from_numpy(np.stack(ups)).to(self._device).permute(0, 3, 1, 2).float()
            x = x[:, :, top : top + height, left : left + width]
            return x.div(127.5).sub(1.0)
        x = raw.to(self._device).permute(0, 3, 1, 2).float().div(255.0)
        x = F.interpolate(x, size=(sh, sw), mode="bicubic", align_corners=False)
        return x[:, :, top : top + height, left : left + width].mul(2.0).sub(1.0)

    def _frame(self, i: int) -> torch.Tensor:
        if i >= self._count:
            raise ConfigError(f"{self._name} ended: frames up to {i + 1} needed, it has "
                              f"{self._count} after padding")  # fmt: skip
        if i not in self._up:
            self._up[i] = self._upscale(self._raw[i])
        return self._up[i]

    def lr_frames(self, indices) -> torch.Tensor:
        """(B, 3, len(indices), H, W) upscaled LR frames in [-1, 1] on the run's device."""
        if not self._size[0]:
            raise RuntimeError("LRVideoControl.prepare() was not called")
        x = torch.stack([self._frame(i) for i in indices], dim=2)
        self._forget(min(indices) - 2 * FRAMES_PER_LATENT)
        return x.expand(self._batch, *x.shape[1:]) if x.shape[0] == 1 else x

    def _forget(self, below: int) -> None:
        """Drop frames no later forward or decode reads (both read forward in time)."""
        for store in (self._up, self._raw) if self.stream else (self._up,):
            for i in [i for i in store if i < below]:
                del store[i]

    def inputs(self, start: int, num: int) -> dict[str, torch.Tensor]:
        from flashdreams.stats import Mark

        begin = Mark(self._device)
        lo = FRAMES_PER_LATENT * start + 1  # LR frame 0 only warms the release's cache
        video = self.lr_frames(range(lo, lo + FRAMES_PER_LATENT * num))
        with torch.no_grad():
            dtype = self.projector.conv1.weight.dtype
            features = self.projector(video.to(dtype))
        self._marks.append((begin, Mark(self._device)))
        return {"lr_features": features}

    def take_parts(self) -> dict[str, list]:
        marks, self._marks = self._marks, []
        return {"projector": marks} if marks else {}

    def parts_inside(self) -> dict[str, str]:
        return {"projector": "diffuse"}  # the DiT's inputs are projected inside its stage

    def decoder_inputs(self, start: int, num: int) -> dict[str, torch.Tensor]:
        idx = [max(0, FRAMES_PER_LATENT * j - 3 + i) for j in range(start, start + num)
               for i in range(FRAMES_PER_LATENT)]  # fmt: skip
        return {"lr_frames": self.lr_frames(idx)}
