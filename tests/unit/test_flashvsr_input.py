"""FlashVSR input: ``input=clip.mp4`` sizes the run (frames, height, width: LR size x scale
floored to a multiple of 128), explicit sizes win, and a missing, unreadable or too short file
is a one-line error (exit status 2 from the CLI)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from flashdreams import ConfigError
from flashdreams.build import build_conditioning
from flashdreams.cli import user_error
from flashdreams.config.options import scope_options
from flashdreams.config.validate import check_run_config
from flashdreams.control.lr_video import clip_frames, latent_frames_of
from tests.unit.test_config import compose_run
from tests.unit.test_flashvsr_recipe import ROOT, _mp4

TINY = ["model.checkpoint=null", "model.dim=64", "model.num_heads=2", "model.num_layers=2",
        "model.ffn_dim=128", "control.checkpoint=null", "control.hidden_dim1=8",
        "control.hidden_dim2=8", "control.dtype=float32", "text_encoder=random"]  # fmt: skip


def _sized(*overrides: str):
    cfg = compose_run(["recipe=flashvsr_v1_1_tiny", *TINY, *overrides])
    scope_options(cfg)  # as the CLI: text_encoder=random drops the recipe's path
    check_run_config(cfg)
    build_conditioning(cfg, torch.device("cpu"))  # resolves rollout.* left null
    return cfg.rollout


def test_the_run_is_sized_from_the_input(tmp_path):
    assert [clip_frames(n) for n in (1, 4, 5, 30, 77)] == [1, 1, 9, 33, 81]
    assert [latent_frames_of(n) for n in (4, 5, 30, 77)] == [0, 2, 8, 20]
    video = _mp4(tmp_path / "lr.mp4", 30, w=72, h=40)  # 30 frames -> 33 -> 8 latent frames
    r = _sized(f"input={video}")  # 4x: 160x288 -> 128x256 (multiples of 128)
    assert (r.height, r.width, r.total_blocks) == (128, 256, 2)  # chunks of 6 + 2 latent frames
    r = _sized(f"input={video}", "vsr.scale=2", "vsr.size_multiple=16")  # 80x144
    assert (r.height, r.width, r.total_blocks) == (80, 144, 2)
    r = _sized(f"input={video}", "rollout.height=64", "rollout.total_blocks=1")  # given: kept
    assert (r.height, r.width, r.total_blocks) == (64, 256, 1)
    with pytest.raises(ConfigError) as err:  # 2x of 40x72 is smaller than 128
        _sized(f"input={video}", "vsr.scale=2")
    assert "\n" not in str(err.value) and "vsr.size_multiple=128" in str(err.value)
    with pytest.raises(ConfigError) as err:  # more blocks than the clip fills
        _sized(f"input={video}", "rollout.total_blocks=5")
    assert "\n" not in str(err.value) and "too short" in str(err.value)


def test_bad_inputs_are_one_line_errors(tmp_path):
    short = _mp4(tmp_path / "short.mp4", 3, w=32, h=32)  # 3 + 4 frames: no 8n + 1 above 1
    with pytest.raises(ConfigError) as err:
        _sized(f"input={short}")
    assert "\n" not in str(err.value) and "too short" in str(err.value)
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    with pytest.raises(ConfigError) as err:
        _sized(f"input={bad}")
    assert "\n" not in str(err.value) and "cannot read it as a video" in str(err.value)
    with pytest.raises(Exception) as err:  # raised inside Hydra's instantiate
        _sized()
    assert "input= is required" in user_error(err.value)
    # through the CLI: a missing file stops before anything is built, one line, exit status 2
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "flashdreams.cli", "recipe=flashvsr_v1_1_tiny",
                           f"input={tmp_path / 'nope.mp4'}", f"paths.root={tmp_path}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert "input=" in lines[0] and "no such file" in lines[0]
