"""HY-WorldPlay pose control: the release's grammar, action labels worked out by hand, JSON and
.npy trajectories equal to the string, live keys and pointer; graph pre-capture covers every
forward of memory-engaged steps (recorded on the CPU)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from flashdreams import ConfigError, Session
from flashdreams.control.pose import PoseControl, parse_pose_string
from tests.unit.test_config import compose_run
from tests.unit.test_hy_worldplay_recipe import TINY

ROOT = Path(__file__).resolve().parents[2]


def _inputs(control: PoseControl, frames: int) -> dict[str, torch.Tensor]:
    control.prepare(1, height=32, width=32, num_frames=None, device="cpu")
    return control.inputs(0, frames)


def test_labels_of_each_command():
    # trans code (forward 1, back 2, right 3, left 4) * 9 + rotate code (yaw right 1, yaw left
    # 2, pitch up 3, pitch down 4); frame 0 is 0
    got = _inputs(PoseControl("w-2, s-1, d-1, a-1, right-1, left-1, up-1, down-1"), 10)
    assert got["action"][0].tolist() == [0, 9, 9, 18, 27, 36, 1, 2, 3, 4]


def test_string_poses_move_and_turn_in_the_camera_frame():
    got = _inputs(PoseControl("w-2, right-30, w-1"), 34)
    c2w = torch.linalg.inv(got["viewmats"][0].double())
    assert torch.allclose(c2w[2, :3, 3], torch.tensor([0.0, 0.0, 0.16], dtype=torch.float64))
    # 30 x 3 degrees of yaw right: the last step moves along +x (the camera now faces +x)
    step = c2w[33, :3, 3] - c2w[32, :3, 3]
    assert torch.allclose(step, torch.tensor([0.08, 0.0, 0.0], dtype=torch.float64), atol=1e-6)
    k = got["intrinsics"][0, 0]  # the release's K normalized: fx / (2 cx), fy / (2 cy)
    assert math.isclose(k[0, 0], 969.6969696969696 / 1920, rel_tol=1e-6)
    assert math.isclose(k[1, 1], 969.6969696969696 / 1080, rel_tol=1e-6)


def test_json_and_npy_trajectories_equal_the_string(tmp_path):
    string = _inputs(PoseControl("w-3, up-2, a-2"), 8)
    c2w = torch.linalg.inv(string["viewmats"][0].double()).numpy()
    k = [[969.6969696969696, 0, 960.0], [0, 969.6969696969696, 540.0], [0, 0, 1]]
    path = tmp_path / "pose.json"
    path.write_text(json.dumps({str(i): {"extrinsic": c.tolist(), "K": k}
                                for i, c in enumerate(c2w)}))  # fmt: skip
    np.save(tmp_path / "pose.npy", c2w)
    for file in (path, tmp_path / "pose.npy"):
        got = _inputs(PoseControl(str(file)), 8)
        assert got["action"].tolist() == string["action"].tolist()
        torch.testing.assert_close(got["viewmats"], string["viewmats"], rtol=0, atol=1e-6)
        torch.testing.assert_close(got["intrinsics"], string["intrinsics"], rtol=0, atol=1e-7)


def test_grammar_errors_name_the_command():
    assert len(parse_pose_string("w-31", 0.08, 3.0)) == 31
    assert len(parse_pose_string(" w-20, right-10 ,d-30, up-36, ", 0.08, 3.0)) == 96
    for text, token in (("w-3,,x-1", "'x-1'"), ("w-3, -2", "'-2'"), ("w-1-2", "'w-1-2'")):
        with pytest.raises(ConfigError, match=token):
            parse_pose_string(text, 0.08, 3.0)


def test_live_keys_and_pointer_continue_the_path():
    control = PoseControl("w-1")
    control.prepare(1, height=32, width=32, num_frames=None, device="cpu")
    control.set_control({"keys": ["d", "arrowleft"]})
    got = control.inputs(0, 4)["action"][0].tolist()
    assert got == [0, 9, 3 * 9 + 2, 3 * 9 + 2]  # then right + yaw left
    control.set_control({"keys": [], "mouse": [0.0, -5.0]})  # pointer up: pitch up
    assert control.inputs(4, 1)["action"][0].tolist() == [3]
    assert control.state()["action"] == 3
    with pytest.raises(ConfigError, match="'q' is not a key"):
        control.set_control({"keys": ["q"]})


def test_precapture_covers_every_memory_engaged_forward():
    """Pre-capture (stand-ins) makes every (shape key, inputs, shapes) the steps use: the
    history forward of each length and the block after it, memory engaged from block 4."""
    from tests.contract import recording

    search = f"hydra.searchpath=[file://{ROOT / 'tests' / 'contract' / 'conf'}]"
    # the DiT's forwards only: the recipe's decoder follows the policy too (vae.graph=follow)
    cfg = compose_run([*TINY, search, "graph=recording", "pose=null", "vae.graph=eager"])
    recording.RECORDS.clear()
    session = Session(cfg, total_blocks=None)  # endless, live keys
    captured = {key for _, key in recording.RECORDS}
    recording.RECORDS.clear()
    for i in range(6):
        session.step(control={"keys": ["w", "arrowright"] if i % 2 else ["a"]})
    used = {key for _, key in recording.RECORDS}
    # blocks after 0, 4, 8, 12, 16 history frames; histories of 4, 8, 12, 16 (forward_kv: keys
    # of their own, so the 4-frame history no longer shares block 0's)
    assert len(used) == 9
    assert sum(isinstance(k[0], tuple) and k[0][-1] == "kv" for k in used) == 4
    assert used <= captured
