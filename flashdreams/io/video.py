"""Incremental MP4 writing that survives a crash, plus a frame-counting reader.

`Mp4Writer` pipes raw RGB frames into the ffmpeg binary shipped by ``imageio-ffmpeg`` and
encodes H.264 (yuv420p) into a *fragmented* MP4: the ``moov`` box is written first and every
keyframe starts a new ``moof``/``mdat`` fragment. A process that dies mid-run therefore leaves a
playable file holding every fragment ffmpeg had flushed, instead of an unreadable file with no
index. With the default ``tune="zerolatency"`` the encoder holds back no frames, so at most one
keyframe interval (default: one second of video) is lost.
"""

from __future__ import annotations

import contextlib
import subprocess
from fractions import Fraction
from pathlib import Path
from typing import Any

import imageio_ffmpeg
import numpy as np

FRAGMENT_FLAGS = "+frag_keyframe+empty_moov+default_base_moof"


def to_uint8_frames(frames: Any) -> np.ndarray:
    """Convert a chunk of frames to a contiguous uint8 array.

    Two layouts are accepted, told apart by dtype:

    - uint8, channels last: ``(T, H, W, 3)`` with values in [0, 255];
    - floating point, channels first: ``(T, 3, H, W)`` with values in [0, 1] (clamped).

    Both numpy arrays and torch tensors (any device) work.

    Args:
        frames: The frame chunk.

    Returns:
        A C-contiguous ``(T, H, W, 3)`` uint8 numpy array.

    Raises:
        ValueError: If the shape does not match the layout implied by the dtype.
    """
    if hasattr(frames, "detach"):  # torch.Tensor, imported lazily by the caller's code
        frames = frames.detach()
        if frames.is_floating_point():
            frames = frames.float()
        frames = frames.cpu().numpy()
    frames = np.asarray(frames)
    if frames.dtype == np.uint8:
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"uint8 frames must be (T, H, W, 3), got {frames.shape}")
        return np.ascontiguousarray(frames)
    if np.issubdtype(frames.dtype, np.floating):
        if frames.ndim != 4 or frames.shape[1] != 3:
            raise ValueError(f"float frames must be (T, 3, H, W) in [0, 1], got {frames.shape}")
        scaled = np.rint(np.clip(frames, 0.0, 1.0) * 255.0).astype(np.uint8)
        return np.ascontiguousarray(scaled.transpose(0, 2, 3, 1))  # (T, H, W, 3)
    raise ValueError(f"frames must be uint8 or floating point, got dtype {frames.dtype}")


def pad_to_even(frames: np.ndarray) -> np.ndarray:
    """Pad ``(T, H, W, 3)`` frames on the bottom/right by edge replication to even H and W.

    yuv420p subsamples chroma by two in both directions, so H.264 needs even sizes.

    Args:
        frames: uint8 frames ``(T, H, W, 3)``.

    Returns:
        The frames, unchanged if both sizes are already even.
    """
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if not (pad_h or pad_w):
        return frames
    return np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")


class Mp4Writer:
    """Write video chunks to a fragmented H.264 MP4 as they are produced.

    The frame size is fixed by the first `write`; odd heights or widths are padded by one
    edge-replicated row/column (the file is then one pixel larger than the frames). Use as a
    context manager, or call `close` (idempotent) to finalize the file.

    Args:
        path: Output ``.mp4`` file; parent directories are created.
        fps: Frame rate of the video, frames per second.
        crf: x264 constant rate factor: 0 is lossless, 18 visually lossless, 51 worst.
        preset: x264 speed/size preset (``ultrafast`` ... ``veryslow``).
        keyframe_interval: Frames between keyframes, which is also the fragment length and so
            the most video a crash can lose; ``None`` means one second (``round(fps)``).
        tune: x264 tuning; ``"zerolatency"`` disables look-ahead so fragments are flushed as
            soon as they are complete. ``None`` leaves x264's default (better compression).

    Example:
        >>> with Mp4Writer("out.mp4", fps=16) as writer:  # doctest: +SKIP
        ...     for chunk in chunks:  # (T, 3, H, W) floats in [0, 1]
        ...         writer.write(chunk)
    """

    def __init__(
        self,
        path: str | Path,
        fps: float,
        crf: int = 18,
        preset: str = "veryfast",
        keyframe_interval: int | None = None,
        tune: str | None = "zerolatency",
    ) -> None:
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.path = Path(path)
        self.fps = fps
        self.crf = crf
        self.preset = preset
        self.keyframe_interval = keyframe_interval or max(1, round(fps))
        self.tune = tune
        self.num_frames = 0
        self.size: tuple[int, int] | None = None  # (W, H) as encoded, after padding
        self._proc: subprocess.Popen | None = None
        self._closed = False

    def _command(self, width: int, height: int) -> list[str]:
        """Build the ffmpeg command line for frames of ``width`` x ``height``."""
        rate = str(Fraction(self.fps).limit_denominator(1001))
        cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-hide_banner", "-nostats"]
        cmd += ["-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24"]
        cmd += ["-s", f"{width}x{height}", "-r", rate, "-i", "-", "-an"]
        cmd += ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-preset", self.preset]
        cmd += ["-crf", str(self.crf), "-g", str(self.keyframe_interval)]
        if self.tune:
            cmd += ["-tune", self.tune]
        cmd += ["-movflags", FRAGMENT_FLAGS, "-flush_packets", "1", "-f", "mp4", str(self.path)]
        return cmd

    def _open(self, width: int, height: int) -> None:
        """Start ffmpeg for the given (already even) frame size."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.size = (width, height)
        # A new session keeps Ctrl-C away from ffmpeg so that `close` can still finalize.
        self._proc = subprocess.Popen(
            self._command(width, height),
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )

    def write(self, frames: Any) -> None:
        """Append a chunk of frames.

        Args:
            frames: uint8 ``(T, H, W, 3)`` or float ``(T, 3, H, W)`` in [0, 1], numpy or torch
                (see `to_uint8_frames`).

        Raises:
            RuntimeError: If the writer is closed or ffmpeg has exited.
            ValueError: If the frame size differs from the first chunk's.
        """
        if self._closed:
            raise RuntimeError(f"Mp4Writer for {self.path} is closed")
        chunk = pad_to_even(to_uint8_frames(frames))
        height, width = chunk.shape[1:3]
        if self._proc is None:
            self._open(width, height)
        elif self.size != (width, height):
            raise ValueError(f"frame size changed from {self.size} to {(width, height)}")
        try:
            self._proc.stdin.write(chunk.tobytes())
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError) as err:
            self._closed = True
            err_text = self._wait()
            raise RuntimeError(f"ffmpeg stopped while writing {self.path}: {err_text}") from err
        self.num_frames += chunk.shape[0]

    def _wait(self) -> str:
        """Close ffmpeg's input, wait for it to exit and return its error output."""
        with contextlib.suppress(OSError, ValueError):  # pipe already broken or closed
            self._proc.stdin.close()
        err = self._proc.stderr.read()
        self._proc.stderr.close()
        self._proc.wait()
        return err.decode(errors="replace").strip()

    def close(self) -> None:
        """Finish encoding and wait for ffmpeg; safe to call more than once.

        Raises:
            RuntimeError: If ffmpeg exits with an error.
        """
        if self._closed:
            return
        self._closed = True
        if self._proc is None:
            return
        err = self._wait()
        if self._proc.returncode != 0:
            raise RuntimeError(f"ffmpeg failed ({self._proc.returncode}) on {self.path}: {err}")

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def read_video_frames(path: str | Path) -> int:
    """Decode a video completely and count its frames.

    Decoding (rather than reading the container's index) also checks that a fragmented file
    cut short by a crash is readable up to its last complete fragment.

    Args:
        path: Video file.

    Returns:
        The number of decoded frames.
    """
    reader = imageio_ffmpeg.read_frames(str(path))
    try:
        next(reader)  # metadata dict
        return sum(1 for _ in reader)
    finally:
        reader.close()


def open_video(path: str | Path, setting: str):
    """(frame-bytes iterator, ffmpeg metadata) of a video file, read with ffmpeg.

    Raises:
        ConfigError: one line naming ``setting`` when the file is missing or not a video.
    """
    from flashdreams import ConfigError

    if not Path(path).is_file():
        raise ConfigError(f"{setting}={str(path)!r}: no such file")
    try:
        reader = imageio_ffmpeg.read_frames(str(path))
        return reader, next(reader)
    except (RuntimeError, OSError, StopIteration, KeyError, ValueError) as err:
        raise video_error(path, setting, err) from None


def video_error(path: str | Path, setting: str, err: BaseException):
    """The one-line ``ConfigError`` of a file ffmpeg cannot decode (its last message line)."""
    from flashdreams import ConfigError

    text = str(err).strip()
    reason = text.splitlines()[-1] if text else type(err).__name__
    return ConfigError(f"{setting}={str(path)!r}: cannot read it as a video ({reason})")


def read_video(path: str | Path, setting: str = "input") -> tuple[np.ndarray, float]:
    """Decode a whole video file: ((T, H, W, 3) uint8 frames, frames per second or 0).

    Args:
        path: the video file (anything ffmpeg reads: mp4, mkv, mov, ...).
        setting: the setting that named the file, for the one-line errors.

    Raises:
        ConfigError: the file is missing, cannot be decoded, or holds no frame.
    """
    from flashdreams import ConfigError

    reader, meta = open_video(path, setting)
    try:
        w, h = meta["size"]
        frames = [np.frombuffer(f, np.uint8).reshape(h, w, 3) for f in reader]
    except (RuntimeError, OSError, KeyError, ValueError) as err:
        raise video_error(path, setting, err) from None
    if not frames:
        raise ConfigError(f"{setting}={str(path)!r}: the video holds no frames")
    return np.stack(frames), float(meta.get("fps") or 0.0)
