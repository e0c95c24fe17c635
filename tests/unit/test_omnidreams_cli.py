"""The OmniDreams single-view recipe through the CLI on the CPU (tiny sizes, random weights), as a
user runs it: image= first frame + control.video= HDMap mp4; and its one-line input errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from flashdreams import ConfigError
from flashdreams.build import build_conditioning
from flashdreams.io.video import Mp4Writer, read_video_frames
from tests.unit.test_cli import _only, _run
from tests.unit.test_config import compose_run

SIZE = 32
ENCODER = ["control.encoder.checkpoint=null", "control.encoder.base_dim=8",
           "conditioner.encoder.checkpoint=null", "conditioner.encoder.base_dim=8"]  # fmt: skip
TINY = ["recipe=omnidreams_single_view", "model=omnidreams_tiny", "model.checkpoint=null",
        "text_encoder=random",
        "vae=preview", "device=cpu", "dtype=float32",
        f"rollout.height={SIZE}", f"rollout.width={SIZE}", "rollout.total_blocks=2",
        *ENCODER]  # fmt: skip


def _hdmap(path, frames: int, fps: int = 30, size=(SIZE, SIZE), seed: int = 0):
    rng = np.random.default_rng(seed)
    with Mp4Writer(path, fps=fps) as writer:
        writer.write(rng.integers(0, 255, (frames, *size, 3), dtype=np.uint8))
    return path


def _image(path):
    Image.fromarray(np.full((SIZE, SIZE, 3), 128, np.uint8)).save(path)
    return path


def test_recipe_runs_from_image_and_hdmap(tmp_path):
    hdmap = _hdmap(tmp_path / "clip_hdmap.mp4", 13)  # 2 blocks x 2 latent frames = 13 frames
    _run([*TINY, f"image={_image(tmp_path / 'first.png')}", f"control.video={hdmap}"], tmp_path)
    run_dir = _only("outputs/runs/omnidreams_single_view/*", tmp_path)
    assert read_video_frames(run_dir / "video.mp4") == 13
    stats = json.loads((run_dir / "stats.json").read_text())
    assert stats["status"] == "completed" and len(stats["steps"]) == 2


@pytest.mark.parametrize(
    "case, message",
    [("missing", "no such file"), ("short", "too short"), ("size", "aspect ratio"),
     ("null", "control.video=null")],
)  # fmt: skip
def test_bad_hdmap_is_one_line_error(case, message, tmp_path):
    video = {"missing": tmp_path / "nope.mp4", "null": None,
             "short": _hdmap(tmp_path / "short.mp4", 9),  # 13 needed
             "size": _hdmap(tmp_path / "wide.mp4", 13, size=(SIZE, 2 * SIZE))}[case]  # fmt: skip
    cfg = compose_run([*TINY, f"image={tmp_path / 'first.png'}",
                       f"control.video={'null' if video is None else video}"])  # fmt: skip
    with pytest.raises(ConfigError, match=message) as err:
        conditioning = build_conditioning(cfg, "cpu")
        conditioning.control.prepare(1, height=SIZE, width=SIZE, num_frames=4, device="cpu")
    assert "control.video" in str(err.value) and "\n" not in str(err.value)


def test_first_frame_keeps_the_block_timestep():
    """The release's conditional_frame_timestep=-1: the given first latent frame is replaced
    and masked but keeps the block's timestep (Cosmos Image2World gives it t = 0.1)."""
    cfg = compose_run([*TINY, "image=first.png", "control.video=x.mp4"])
    assert cfg.conditioner.conditional_timestep is None
    conditioner = instantiate(cfg.conditioner)
    conditioner.prepare([Image.new("RGB", (SIZE, SIZE))], height=SIZE, width=SIZE,
                        num_frames=4, device="cpu")  # fmt: skip
    assert conditioner.num_given == 1
    t = torch.full((1, 2), 937.5)
    assert torch.equal(conditioner.timesteps(t, 0), t)
    assert conditioner.inputs(0, 2)["condition_mask"][0, 0, :, 0, 0].tolist() == [1.0, 0.0]


def test_hdmap_input_name_sets_the_control_video(tmp_path):
    """``hdmap=clip_hdmap.mp4`` (the issue's input name) is the recipe's ``control.video``; an
    explicit ``control.video=`` still wins, and a run without either names both in one line."""
    clip = str(tmp_path / "clip_hdmap.mp4")
    assert compose_run([*TINY, f"hdmap={clip}"]).control.video == clip
    assert (
        compose_run([*TINY, f"hdmap={clip}", "control.video=other.mp4"]).control.video
        == "other.mp4"
    )
    cfg = compose_run([*TINY, f"image={tmp_path / 'first.png'}"])
    with pytest.raises(ConfigError, match=r"hdmap=path/to/clip_hdmap.mp4 \(control.video=\)"):
        build_conditioning(cfg, "cpu").control.prepare(1, height=SIZE, width=SIZE, num_frames=4,
                                                       device="cpu")  # fmt: skip


def test_hdmap_at_another_rate_and_size_is_resampled_with_a_log_line(tmp_path, caplog):
    """A 15 fps HDMap at twice the run's size drives the 30 fps run: one log line says so, every
    output frame is the nearest-in-time source frame fitted to the run's size (output frame i
    shows source frame i / 2, rounded)."""
    import logging

    from flashdreams.control.video_frames import fit
    from flashdreams.io.video import read_video

    clip = _hdmap(tmp_path / "half_rate.mp4", 8, fps=15, size=(2 * SIZE, 2 * SIZE), seed=4)
    cfg = compose_run([*TINY, f"image={_image(tmp_path / 'first.png')}", f"hdmap={clip}"])
    control = build_conditioning(cfg, "cpu").control
    with caplog.at_level(logging.INFO, logger="flashdreams.control.hdmap"):
        control.prepare(1, height=SIZE, width=SIZE, num_frames=4, device="cpu")
    (line,) = [r.getMessage() for r in caplog.records if "resampled" in r.getMessage()]
    assert f"{2 * SIZE}x{2 * SIZE} at 15 fps resampled to {SIZE}x{SIZE} at 30 fps" in line
    src = read_video(clip)[0]  # (8, 64, 64, 3)
    for i in range(13):  # 4 latent frames = 13 video frames; a tie goes to the even source frame
        np.testing.assert_array_equal(control._file.get(i), fit(src[round(i / 2)], SIZE, SIZE))
