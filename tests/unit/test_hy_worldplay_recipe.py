"""HY-WorldPlay recipe: composes with the release's settings; a tiny run goes through
flashdreams-run; bad poses fail in one line; live keys drive a Session like the same moves as a
pose string."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flashdreams import ConfigError, Session
from tests.unit.test_config import compose_run

ROOT = Path(__file__).resolve().parents[2]
VAE = ["checkpoint=null", "base_dim=8", "dim_mult=[1,2,2]", "num_res_blocks=1",
       "temperal_downsample=[true,true]"]  # fmt: skip
TINY = ["recipe=hy_worldplay_wan_i2v_5b", "model.checkpoint=null", "model.dim=64",
        "model.num_heads=2", "model.num_layers=2", "model.ffn_dim=128", "model.text_dim=32",
        "model.text_len=8", "model.memory_points=4000", "text_encoder=random",
        *[f"vae.{a}" for a in VAE], *[f"conditioner.encoder.{a}" for a in VAE],
        "rollout.height=32", "rollout.width=32", "rollout.total_blocks=2", "device=cpu",
        "dtype=float32", "graph=eager", "attention=sdpa"]  # fmt: skip


def test_recipe_composes_with_the_release_settings():
    cfg = compose_run(["recipe=hy_worldplay_wan_i2v_5b"])
    m = cfg.model
    assert (m.dim, m.num_heads, m.num_layers, m.ffn_dim, m.in_dim) == (3072, 24, 30, 14336, 48)
    assert (m.context_frames, m.recent_frames, m.memory_timestep) == (16, 12, 14.0)
    assert m.checkpoint == "hf://tencent/HY-WorldPlay/wan_distilled_model/model.pt"
    assert list(cfg.scheduler.timesteps) == [1000.0, 960.0, 888.8889, 727.2728]
    assert cfg.conditioner.image_timestep == 14.0 and cfg.cache.context_frames == 16
    assert (cfg.rollout.height, cfg.rollout.width, cfg.rollout.frames_per_block) == (704, 1280, 4)


def _image(tmp_path: Path) -> Path:
    path = tmp_path / "first.png"
    Image.new("RGB", (64, 40), (90, 140, 200)).save(path)
    return path


def test_tiny_run_through_the_cli(tmp_path):
    args = [*TINY, f"image={_image(tmp_path)}", "pose='w-3, right-2, d-2'",
            f"paths.root={tmp_path / 'out'}"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run([sys.executable, "-m", "flashdreams.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run,) = (tmp_path / "out" / "runs").glob("*/*")
    assert len(json.loads((run / "stats.json").read_text())["steps"]) == 2


@pytest.mark.parametrize("pose,message", [
    ("w-3, jump-2", "pose: 'jump-2' has the unknown action 'jump'"),
    ("w-3, d2", "pose: 'd2' is not 'action-count'"),
    ("w-x", "pose: 'w-x' has the count 'x', not a number"),
    ("w-2", "pose='w-2' gives 3 latent frames, the run needs 8"),
])  # fmt: skip
def test_bad_poses_fail_in_one_line_naming_the_token(pose, message):
    err = _config_error(lambda: Session(compose_run([*TINY, f"pose='{pose}'"]), total_blocks=2))
    assert message in str(err) and "\n" not in str(err)


def _config_error(fn) -> ConfigError:
    """The ConfigError ``fn`` raises, unwrapped from Hydra's instantiation error (the CLI
    prints it alone)."""
    with pytest.raises(Exception) as info:
        fn()
    err = info.value
    while err is not None and not isinstance(err, ConfigError):
        err = err.__cause__ or err.__context__
    assert err is not None, info.value
    return err


def test_bad_pose_files_fail_in_one_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"0": {"extrinsic": [[1, 0], [0, 1]], "K": [[1, 0, 1]]}}))
    err = _config_error(lambda: Session(compose_run([*TINY, f"pose={bad}"]), total_blocks=2))
    assert f"pose='{bad}': entry '0'" in str(err) and "\n" not in str(err)
    short = tmp_path / "short.npy"
    np.save(short, np.stack([np.eye(4)] * 3))
    err = _config_error(lambda: Session(compose_run([*TINY, f"pose={short}"]), total_blocks=2))
    assert f"pose='{short}' gives 3 latent frames, the run needs 8" in str(err)


def test_live_keys_equal_the_same_moves_as_a_pose_string():
    # block 0: frames 1-3 forward (w); block 1: frames 4-7 forward + yaw right
    scripted = Session(compose_run([*TINY, "pose='w-3, right-4'"]), total_blocks=2)
    live = Session(compose_run([*TINY, "pose=null"]), total_blocks=2)
    a = [scripted.step(), scripted.step()]
    b = [live.step(control={"keys": ["w"]}), live.step(control={"keys": ["arrowright"]})]
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    live.reset(seed=0)
    idle = live.step(control={"keys": []})
    assert (idle - b[0]).abs().max() > 1e-4  # the keys reach the model
    with pytest.raises(ConfigError, match="'space' is not a key of the pose control"):
        live.step(control={"keys": ["space"]})


def test_fast_recipe_sets_the_measured_fast_form_and_runs_tiny_on_cpu():
    """``hy_worldplay_wan_i2v_5b_fast``: the release's settings plus compiled and captured blocks,
    FP8 linears and attention (the memory re-run too) and the compiled NDHWC decode; on a CPU
    (no FP8 GEMMs, no cuDNN) it runs the fallbacks and gives the bf16 recipe's frames."""
    cfg = compose_run(["recipe=hy_worldplay_wan_i2v_5b_fast"])
    assert cfg.graph._target_.endswith("CudaGraphPolicy") and cfg.graph.compile
    assert cfg.attention._target_.endswith("CudnnFp8Attention") and not cfg.attention.exact_commit
    assert cfg.precision._target_.endswith("Fp8Precision")
    assert cfg.vae.graph == "follow" and cfg.vae.channels_last
    assert cfg.model.checkpoint == compose_run(["recipe=hy_worldplay_wan_i2v_5b"]).model.checkpoint
    # TINY's sizes on the fast recipe, keeping its FP8 attention
    tiny = [o for o in TINY if not o.startswith(("recipe=", "attention="))]
    fast = Session(compose_run([*tiny, "recipe=hy_worldplay_wan_i2v_5b_fast", "pose='w-7'"]),
                   total_blocks=2)  # fmt: skip
    plain = Session(compose_run([*TINY, "pose='w-7'"]), total_blocks=2)
    for _ in range(2):
        torch.testing.assert_close(fast.step(), plain.step(), rtol=0, atol=1e-5)
