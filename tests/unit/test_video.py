"""Tests of the incremental fragmented-MP4 writer."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
import torch

from flashdreams.io.video import Mp4Writer, read_video_frames, to_uint8_frames


def _video_size(path: Path) -> tuple[int, int]:
    """(W, H) of the first video stream."""
    reader = imageio_ffmpeg.read_frames(str(path))
    try:
        return next(reader)["size"]
    finally:
        reader.close()


def _wait_for_frames(path: Path, minimum: int, timeout_s: float = 20.0) -> int:
    """Poll until ``path`` decodes to at least ``minimum`` frames; return the last count."""
    deadline = time.monotonic() + timeout_s
    count = 0
    while time.monotonic() < deadline:
        try:
            count = read_video_frames(path)
        except OSError:  # header not flushed yet
            count = 0
        if count >= minimum:
            break
        time.sleep(0.1)
    return count


def test_three_chunks_mixed_inputs(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "video.mp4"
    rng = np.random.default_rng(0)
    with Mp4Writer(path, fps=8) as writer:
        writer.write(rng.integers(0, 256, (5, 32, 48, 3), dtype=np.uint8))  # numpy uint8 THWC
        writer.write(torch.rand(4, 3, 32, 48))  # torch float TCHW in [0, 1]
        writer.write(torch.zeros(3, 32, 48, 3, dtype=torch.uint8))  # torch uint8 THWC
    assert writer.num_frames == 12
    assert read_video_frames(path) == 12
    assert _video_size(path) == (48, 32)
    writer.close()  # idempotent


def test_odd_size_is_padded_to_even(tmp_path: Path) -> None:
    path = tmp_path / "odd.mp4"
    with Mp4Writer(path, fps=4) as writer:
        writer.write(np.full((2, 31, 45, 3), 200, dtype=np.uint8))
    assert writer.size == (46, 32)
    assert read_video_frames(path) == 2
    assert _video_size(path) == (46, 32)


def test_float_frames_scale_and_clamp() -> None:
    frames = torch.tensor([-1.0, 0.0, 0.5, 1.0, 2.0]).view(1, 1, 1, 5).expand(1, 3, 1, 5)
    out = to_uint8_frames(frames)
    assert out.shape == (1, 1, 5, 3) and out.dtype == np.uint8
    assert out[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255]


def test_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        to_uint8_frames(np.zeros((2, 8, 8, 3), dtype=np.float32))  # float must be TCHW
    with pytest.raises(ValueError):
        to_uint8_frames(np.zeros((2, 3, 8, 8), dtype=np.uint8))  # uint8 must be THWC
    with Mp4Writer(tmp_path / "v.mp4", fps=4) as writer:
        writer.write(np.zeros((1, 8, 8, 3), dtype=np.uint8))
        with pytest.raises(ValueError, match="size changed"):
            writer.write(np.zeros((1, 8, 10, 3), dtype=np.uint8))
    with pytest.raises(RuntimeError, match="closed"):
        writer.write(np.zeros((1, 8, 8, 3), dtype=np.uint8))


def test_killed_encoder_leaves_playable_fragments(tmp_path: Path) -> None:
    """SIGKILL on ffmpeg mid-run: every fragment flushed before the kill stays decodable."""
    path = tmp_path / "killed.mp4"
    writer = Mp4Writer(path, fps=8, keyframe_interval=8)
    rng = np.random.default_rng(1)
    for _ in range(4):  # 32 frames: fragments start at frames 0, 8, 16, 24
        writer.write(rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8))
    # The file is readable while it is being written; wait for two complete fragments.
    assert _wait_for_frames(path, 16) >= 16
    writer._proc.kill()
    writer._proc.wait()
    count = read_video_frames(path)
    assert 16 <= count <= 32
    with pytest.raises(RuntimeError, match="ffmpeg failed"):
        writer.close()
    writer.close()  # still idempotent after a failure


def test_dead_python_process_still_finalizes(tmp_path: Path) -> None:
    """A writer whose Python process is SIGKILLed without close() yields all its frames."""
    path = tmp_path / "orphan.mp4"
    script = (
        "import os, signal, numpy as np\n"
        "from flashdreams.io.video import Mp4Writer\n"
        f"w = Mp4Writer({str(path)!r}, fps=8)\n"
        "for _ in range(3):\n"
        "    w.write(np.zeros((6, 16, 16, 3), dtype=np.uint8))\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], timeout=60)
    assert result.returncode == -9
    # ffmpeg outlives its parent, reads EOF on its stdin and finishes the file.
    assert _wait_for_frames(path, 18) == 18
