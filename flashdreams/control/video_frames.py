"""A conditioning video read forward on demand, resampled to the run's frame rate and size.

``VideoFrames`` keeps one ffmpeg reader open per clip and decodes source frames only as far as
the frame asked for (the rollout asks in order, block by block), so a clip of any length costs
the memory of one decoded frame, not of the clip (189 frames at 704x1280 would be ~510 MB).
"""

from __future__ import annotations

import imageio_ffmpeg
import numpy as np
from PIL import Image

from flashdreams.io.video import open_video, video_error

ASPECT_TOL = 0.01  # relative aspect-ratio difference accepted before resizing


def probe_video(path: str, setting: str) -> tuple[int, int, float, int]:
    """(width, height, fps, frame count) of a video file, one-line errors naming ``setting``."""
    reader, meta = open_video(path, setting)
    reader.close()
    try:
        count, _ = imageio_ffmpeg.count_frames_and_secs(str(path))
    except Exception as err:  # noqa: BLE001  (ffmpeg fails in several ways on bad files)
        raise video_error(path, setting, err) from None
    width, height = meta["size"]
    return int(width), int(height), float(meta.get("fps") or 0.0), int(count)


def resample_indices(src_fps: float, dst_fps: float, count: int, src_count: int) -> list[int]:
    """Source frame of each of ``count`` output frames at ``dst_fps`` (nearest in time,
    clamped to the last source frame)."""
    return [source_index(i, src_fps, dst_fps, src_count) for i in range(count)]


def source_index(i: int, src_fps: float, dst_fps: float, src_count: int) -> int:
    """Source frame nearest in time to output frame ``i`` at ``dst_fps``."""
    ratio = 1.0 if src_fps <= 0 or dst_fps <= 0 else src_fps / dst_fps
    return min(int(round(i * ratio)), src_count - 1)


def same_aspect(width: int, height: int, run_width: int, run_height: int) -> bool:
    """Whether a ``width`` x ``height`` frame has the run's aspect ratio (within 1 %)."""
    return abs((width / height) / (run_width / run_height) - 1.0) <= ASPECT_TOL


def fit(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """(H, W, 3) uint8 resized to ``width`` x ``height`` (Lanczos) unless it has that size."""
    if img.shape[:2] == (height, width):
        return img
    return np.asarray(Image.fromarray(img).resize((width, height), Image.Resampling.LANCZOS))


class VideoFrames:
    """Frames of a video at ``fps`` and ``width`` x ``height``, decoded forward as asked for.

    Args:
        path: the video file (already probed: ``probe_video``).
        probe: its (width, height, fps, frame count).
        fps: the run's frame rate (nearest source frame of each output time).
        width, height: the run's frame size (same aspect ratio; resized with Lanczos).
        total: output frames the file covers (later ones are None).
    """

    def __init__(self, path: str, probe: tuple[int, int, float, int], fps: float,
                 width: int, height: int, total: int) -> None:  # fmt: skip
        self.path, self.total = path, total
        self.src_w, self.src_h, self.src_fps, self.src_count = probe
        self.fps, self.width, self.height = fps, width, height
        self._reader = None
        self._pos = -1  # source index of the last decoded frame
        self._last: tuple[int, np.ndarray] | None = None  # (source index, resized frame)

    def get(self, i: int) -> np.ndarray | None:
        """(H, W, 3) uint8 output frame ``i`` (indices must not go back), None past the file."""
        if i >= self.total:
            return None
        src = source_index(i, self.src_fps, self.fps, self.src_count)
        if self._last is not None and self._last[0] == src:
            return self._last[1]
        if src < self._pos:
            raise ValueError(f"{self.path}: frame {i} asked after a later one")
        if self._reader is None:
            self._reader = imageio_ffmpeg.read_frames(str(self.path))
            next(self._reader)  # the metadata
        raw = None
        while self._pos < src:
            raw = next(self._reader, None)
            if raw is None:  # the container said more frames than it holds
                self.total = i
                return None
            self._pos += 1
        img = np.frombuffer(raw, np.uint8).reshape(self.src_h, self.src_w, 3)
        self._last = (src, fit(img, self.width, self.height))
        return self._last[1]

    def close(self) -> None:
        """Stop the ffmpeg reader (a new ``get`` from frame 0 needs a new object)."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None
