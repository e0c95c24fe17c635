"""Tiny Cosmos-Predict2.5 recipes through the CLI on the CPU, as a user runs them: Video2World
from an mp4 file (CFG, UniPC, the cosmos_video conditioner) and the distilled 4-step T2W."""

from __future__ import annotations

import json

import numpy as np

from flashdreams.io.video import Mp4Writer, read_video_frames
from tests.unit.test_cli import _only, _run

TINY = ["model=cosmos_tiny", "model.checkpoint=null", "text_encoder=random", "vae=preview",
        "~vae.checkpoint", "device=cpu", "dtype=float32", "rollout.height=32",
        "rollout.width=32", "rollout.frames_per_block=3"]  # fmt: skip


def test_v2w_recipe_runs(tmp_path):
    video = tmp_path / "input.mp4"
    with Mp4Writer(video, fps=16) as writer:
        writer.write(np.random.default_rng(0).integers(0, 255, (9, 32, 32, 3), dtype=np.uint8))
    _run(["recipe=cosmos_predict2_5_2b_v2w", *TINY, "scheduler.num_steps=2",
          f"conditioner.video={video}", "conditioner.encoder.checkpoint=null",
          "conditioner.encoder.base_dim=8"], tmp_path)  # fmt: skip
    run_dir = _only("outputs/runs/cosmos_predict2_5_2b_v2w/*", tmp_path)
    assert read_video_frames(run_dir / "video.mp4") == 9  # 3 latent frames, 2 of them given
    stats = json.loads((run_dir / "stats.json").read_text())
    assert stats["status"] == "completed" and stats.get("forwards_per_step", 2) == 2


def test_distilled_recipe_runs(tmp_path):
    _run(["recipe=cosmos_predict2_5_2b_distilled_t2v", *TINY], tmp_path)
    run_dir = _only("outputs/runs/cosmos_predict2_5_2b_distilled_t2v/*", tmp_path)
    assert read_video_frames(run_dir / "video.mp4") == 9
