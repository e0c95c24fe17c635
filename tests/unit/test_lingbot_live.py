"""Live camera control of LingBot-World: keys (Session ``control`` / WebSocket) move the camera."""

import pytest
import torch
from PIL import Image

from flashdreams import Session
from tests.unit.test_config import compose_run
from tests.unit.test_serve_protocol import ServerProcess, recv_json, send

LINGBOT = ["recipe=lingbot_world_fast", "model.dim=64", "model.num_heads=4", "model.num_layers=2",
           "model.ffn_dim=128", "model.text_dim=32", "model.text_len=16", "model.checkpoint=null",
           "text_encoder=random", "vae.checkpoint=null", "vae.base_dim=8", "graph=eager",
           "conditioner.encoder.checkpoint=null", "conditioner.encoder.base_dim=8",
           "conditioner.encoder.num_res_blocks=1", "dtype=float32"]  # fmt: skip


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "first.png"
    Image.new("RGB", (32, 32), (90, 140, 200)).save(path)
    return path


def _recording_session(image_path):
    session = Session(compose_run([*LINGBOT, "device=cpu", "rollout.height=32",
                                   "rollout.width=32", f"image={image_path}"]))  # fmt: skip
    model, seen = session.rollout.model, []
    forward = model.forward

    def record(*args, **kwargs):
        seen.append(args[6]["camera"])  # the named inputs of Forwards' call
        return forward(*args, **kwargs)

    model.forward = record
    return session, seen


def test_session_keys_change_the_rays_the_model_receives(image_path):
    session, seen = _recording_session(image_path)
    assert session.total_blocks is None  # rolling cache: endless live stream
    session.step()  # block 0, no keys: a still camera
    still = seen[-1]
    assert still.shape == (1, 384, 3, 4, 4)
    assert still[:, : 3 * 64].abs().max() == 0  # ray origins: no translation
    session.step(control={"keys": ["w"]})
    moving = seen[-1]  # the 4 steps and the commit of block 1 all get block 1's rays
    assert all(torch.equal(c, moving) for c in seen[-5:])
    origin_z = moving[:, 2 * 64 : 3 * 64]
    torch.testing.assert_close(origin_z, torch.ones_like(origin_z))  # one unit forward per frame
    assert session.last.state["position"] == [0.0, 0.0, 3.0] and session.last.state["frame"] == 5
    session.step(control={"keys": ["d"]})
    assert session.last.state["yaw_deg"] == pytest.approx(24.0)  # 3 frames x 8 degrees
    assert seen[-1][:, : 3 * 64].abs().max() == 0  # turning in place: no translation
    assert not torch.equal(seen[-1][:, 3 * 64 :], still[:, 3 * 64 :])  # rotated directions


def test_recache_replays_the_camera(image_path):
    session, _ = _recording_session(image_path)
    for keys in (["w"], ["d"], ["i", "q"]):
        session.step(control={"keys": keys})
    before = [k.clone() for k in session.rollout.cache.k]
    session.recache()  # must feed each replayed block its own rays again
    for a, b in zip(before, session.rollout.cache.k, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def _step_with(ws, keys):
    step = recv_json(ws, "step")
    while (step.get("control") or {}).get("keys") != keys:
        step = recv_json(ws, "step")
    return step


def test_websocket_keys_move_the_camera(tmp_path, image_path):
    server = ServerProcess(tmp_path, *LINGBOT, f"image={image_path}", "serve.realtime=false",
                           "rollout.height=32", "rollout.width=32")  # fmt: skip
    try:
        with server.ws() as ws:  # the page learns which keys the camera takes
            assert recv_json(ws, "hello")["control"] == {"keys": list("adeikqsw"), "mouse": False}
            send(ws, type="start", prompt="a lake")
            assert recv_json(ws, "started")["total_blocks"] is None
            first = recv_json(ws, "step")
            assert first["state"]["position"] == [0.0, 0.0, 0.0] and first["control"] is None
            send(ws, type="control", keys=["w"])
            fwd = _step_with(ws, ["w"])
            assert fwd["state"]["position"][2] > 0 and fwd["state"]["yaw_deg"] == 0
            send(ws, type="control", keys=["d"])
            turned = _step_with(ws, ["d"])
            assert turned["state"]["yaw_deg"] > 0
            send(ws, type="control", keys=["i"])
            assert _step_with(ws, ["i"])["state"]["pitch_deg"] > 0
            send(ws, type="control", keys=[])
            a, b = _step_with(ws, []), recv_json(ws, "step")
            assert a["state"]["position"] == b["state"]["position"]
            assert b["state"]["frame"] == a["state"]["frame"] + 3
            send(ws, type="stop")
            recv_json(ws, "stopped")
    finally:
        server.close()
