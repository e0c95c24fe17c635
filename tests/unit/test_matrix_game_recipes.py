"""Matrix-Game 2.0 recipes: the three compose with the release's settings; a tiny universal
run goes through flashdreams-run; a live session driven by keys equals the file-driven run (all
three variants)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from flashdreams import ConfigError, Session
from flashdreams.build import build_conditioning
from flashdreams.control.keyboard_mouse import KeyboardMouseControl
from tests.unit.test_config import compose_run

ROOT = Path(__file__).resolve().parents[2]
CLIP_TINY = ("image_encoder.config={hidden_size:16,intermediate_size:32,num_hidden_layers:2,"
             "num_attention_heads:2,projection_dim:8}")  # fmt: skip
TINY = ["model.checkpoint=null", "model.dim=64", "model.num_heads=2", "model.num_layers=2",
        "model.ffn_dim=128", "model.action_blocks=1", "model.action_heads=2",
        "model.keyboard_hidden_dim=128", "model.mouse_hidden_dim=128", "model.action_embed_dim=16",
        "model.image_dim=16", "image_encoder.checkpoint=null", "image_encoder.processor=null",
        CLIP_TINY, "vae=preview", "~vae.checkpoint", "conditioner.encoder.checkpoint=null",
        "conditioner.encoder.base_dim=8", "conditioner.encoder.num_res_blocks=1", "graph=eager",
        "attention=sdpa", "rollout.height=32", "rollout.width=32", "rollout.total_blocks=3",
        "device=cpu", "dtype=float32"]  # fmt: skip


@pytest.mark.parametrize("variant,keyboard,mouse,steps,window", [
    ("universal", 4, 2, [1000, 666, 333], 6),
    ("gta_drive", 2, 2, [1000, 666, 333], 4),
    ("templerun", 7, 0, [1000, 750, 500, 250], 6),
])  # fmt: skip
def test_recipes_compose_with_the_release_settings(variant, keyboard, mouse, steps, window):
    cfg = compose_run([f"recipe=matrix_game2_{variant}"])
    m = cfg.model
    assert (m.dim, m.num_layers, m.in_dim, m.image_dim, m.action_blocks) == (1536, 30, 36, 1280, 15)
    assert (m.keyboard_dim, m.mouse_dim, cfg.control.variant) == (keyboard, mouse, variant)
    assert m.checkpoint.startswith("hf://Skywork/Matrix-Game-2.0/")
    assert list(cfg.scheduler.timesteps) == steps and cfg.scheduler.shift == 5.0
    assert (cfg.cache.window_frames, cfg.cache.sink_frames) == (window, 0)
    assert (cfg.rollout.height, cfg.rollout.width, cfg.rollout.frames_per_block) == (352, 640, 3)


def _image(tmp_path: Path) -> Path:
    path = tmp_path / "first.png"
    Image.new("RGB", (64, 40), (90, 140, 200)).save(path)
    return path


def test_tiny_universal_run_through_the_cli(tmp_path):
    actions = tmp_path / "actions.json"
    actions.write_text(json.dumps([{"keys": ["w"], "mouse": [0.1, 0.0], "frames": 33}]))
    args = ["recipe=matrix_game2_universal", *TINY, f"image={_image(tmp_path)}",
            f"control.actions={actions}", f"paths.root={tmp_path / 'out'}"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run([sys.executable, "-m", "flashdreams.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run,) = (tmp_path / "out" / "runs").glob("*/*")
    assert len(json.loads((run / "stats.json").read_text())["steps"]) == 3


def test_a_control_of_another_variant_fails_at_build_in_one_line():
    cfg = compose_run(["recipe=matrix_game2_universal", *TINY, "control.variant=gta_drive"])
    with pytest.raises(ConfigError) as err:  # GTA's 2 keyboard dims into the universal model's 4
        build_conditioning(cfg, torch.device("cpu"))
    assert "\n" not in str(err.value) and "'keyboard'" in str(err.value)


def test_live_session_equals_the_file_driven_run(tmp_path):
    steps = [{"keys": ["w"]}, {"keys": ["w", "d"], "mouse": [0.1, 0.0]}, {"keys": ["s"]}]
    frames = [9, 12, 12]  # video frames of blocks 0, 1, 2 (3 latent frames each)
    actions = tmp_path / "actions.json"
    actions.write_text(json.dumps([{**s, "frames": n} for s, n in zip(steps, frames, strict=True)]))
    image = [f"image={_image(tmp_path)}"]
    from_file = Session(compose_run(["recipe=matrix_game2_universal", *TINY, *image,
                                     f"control.actions={actions}"]), total_blocks=3)  # fmt: skip
    live = Session(compose_run(["recipe=matrix_game2_universal", *TINY, *image]), total_blocks=3)
    from_file_frames = []
    for control in steps:
        a, b = from_file.step(), live.step(control=control)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        from_file_frames.append(a)
    live.reset(seed=0)
    idle = live.step(control={"keys": []})
    live.reset(seed=0)
    pressed = live.step(control={"keys": ["w"], "mouse": [0.5, 0.5]})
    assert (idle - pressed).abs().max() > 1e-4  # the keys reach the model
    with pytest.raises(ConfigError, match="'space' is not an action of the universal variant"):
        live.step(control={"keys": ["space"]})
    # a prompt switch replays the committed blocks (recache) with their recorded actions: the
    # model has no text, so the stream goes on exactly as without the switch
    live.reset(seed=0)
    for i, control in enumerate(steps):
        if i == 2:
            live.set_prompt("another prompt")
        torch.testing.assert_close(live.step(control=control), from_file_frames[i], rtol=0,
                                   atol=1e-6)  # fmt: skip
    assert live.last.recache_ms > 0


# The release's own per-frame rows for these keys (its interactive ``get_current_action``): GTA
# W = throttle [1, 0], A / D steer through the mouse yaw -0.1 / +0.1; Temple Run one-hot
# [nomove, jump, slide, turn left, turn right, left side, right side], idle = nomove.
_RELEASE_ROWS = {
    "gta_drive": {(): [0, 0, 0, 0], ("w",): [1, 0, 0, 0], ("a", "w"): [1, 0, 0, -0.1],
                  ("d", "s"): [0, 1, 0, 0.1]},
    "templerun": {(): [1, 0, 0, 0, 0, 0, 0], ("z",): [0, 0, 0, 1, 0, 0, 0],
                  (" ",): [0, 1, 0, 0, 0, 0, 0]},
}  # fmt: skip


@pytest.mark.parametrize("variant,steps", [
    ("gta_drive", [{"keys": ["w"]}, {"keys": ["w", "a"]}, {"keys": ["s", "d"]}]),
    ("templerun", [{"keys": ["z"]}, {"keys": []}, {"keys": [" "]}]),  # turn, nomove, jump
])  # fmt: skip
def test_live_keys_equal_the_release_file_with_the_same_actions(tmp_path, variant, steps):
    """A live session driven by the variant's keys (GTA: throttle / brake + A/D steering;
    Temple Run: one key at a time, none = its idle ``nomove``) equals the run driven by the
    release's own per-frame tensors of the same actions."""
    rows = _RELEASE_ROWS[variant]
    per_frame = [rows[tuple(sorted(s["keys"]))] for s in steps]
    frames = [9, 12, 12]  # video frames of blocks 0, 1, 2 (3 latent frames each)
    table = torch.tensor([r for r, n in zip(per_frame, frames, strict=True) for _ in range(n)])
    release = {"keyboard_condition": table}
    if variant == "gta_drive":
        release = {"keyboard_condition": table[:, :2], "mouse_condition": table[:, 2:]}
    actions = tmp_path / "actions.pt"
    torch.save({k: v.float() for k, v in release.items()}, actions)
    # a JSON file of the same keys holds the same rows
    js = tmp_path / "actions.json"
    js.write_text(json.dumps([{**s, "frames": n} for s, n in zip(steps, frames, strict=True)]))
    torch.testing.assert_close(KeyboardMouseControl(variant, actions=str(js)).file, table.float())
    recipe, image = f"recipe=matrix_game2_{variant}", f"image={_image(tmp_path)}"
    from_file = Session(compose_run([recipe, *TINY, image, f"control.actions={actions}"]),
                        total_blocks=3)  # fmt: skip
    live = Session(compose_run([recipe, *TINY, image]), total_blocks=3)
    for control in steps:
        torch.testing.assert_close(live.step(control=control), from_file.step(), rtol=0, atol=0)
    live.reset(seed=0)
    first = live.step(control={"keys": []})
    live.reset(seed=0)
    pressed = live.step(control=steps[0])
    assert (first - pressed).abs().max() > 1e-4  # the keys reach the model


def test_precapture_covers_every_forward_with_the_action_caches(tmp_path):
    """Graph pre-capture (stand-ins of keyboard / mouse) makes every (shape key, inputs, shapes)
    the live steps use, while the DiT cache and both action caches fill and then roll."""
    from tests.contract import recording

    search = f"hydra.searchpath=[file://{ROOT / 'tests' / 'contract' / 'conf'}]"
    cfg = compose_run(["recipe=matrix_game2_universal", *TINY, search, "graph=recording",
                       f"image={_image(tmp_path)}", "cache.window_frames=6"])  # fmt: skip
    recording.RECORDS.clear()
    session = Session(cfg, total_blocks=None)  # endless: the caches fill, then roll
    captured = {key for _, key in recording.RECORDS}
    assert {k[1] for k in captured} == {(("image_latents", "keyboard", "mouse"),)}
    recording.RECORDS.clear()
    for i in range(4):
        session.step(control={"keys": ["w"] if i % 2 else ["a"], "mouse": [0.1 * i, 0.0]})
    used = {key for _, key in recording.RECORDS}
    assert used and used <= captured
