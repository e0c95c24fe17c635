"""HY-WorldPlay steered live through a real ``flashdreams-serve`` process (CPU, tiny random
weights, ``pose=null``): ``hello`` tells the page the pose control's keys and that it takes the
pointer; W moves the camera forward, the right arrow turns it right, an upward pointer move pitches
it up (the ``state`` of each ``step``), and a key the control lacks is one ``bad_message``
error while the stream goes on."""

from __future__ import annotations

from flashdreams.control.pose import LIVE_KEYS
from tests.unit.test_hy_worldplay_recipe import TINY
from tests.unit.test_serve_protocol import ServerProcess, recv_json, send


def _step_with(ws, control: dict) -> dict:
    """The first ``step`` message that ran with ``control``."""
    step = recv_json(ws, "step", timeout=120)
    while step.get("control") != control:
        step = recv_json(ws, "step", timeout=120)
    return step


def test_websocket_keys_and_pointer_steer_the_camera(tmp_path):
    server = ServerProcess(tmp_path, *TINY, "pose=null", "rollout.total_blocks=12",
                           "serve.realtime=false", timeout=180)  # fmt: skip
    try:
        with server.ws() as ws:
            hello = recv_json(ws, "hello", timeout=60)
            assert hello["control"] == {"keys": list(LIVE_KEYS), "mouse": True}
            send(ws, type="start", prompt="a street", seed=0, total_blocks=12)
            recv_json(ws, "started", timeout=60)
            first = recv_json(ws, "step", timeout=120)
            send(ws, type="control", keys=["w"])
            fwd = _step_with(ws, {"keys": ["w"]})["state"]
            assert fwd["position"][2] > first["state"]["position"][2] and fwd["yaw_deg"] == 0
            send(ws, type="control", keys=["space"])  # not a key of the pose control
            error = recv_json(ws, "error", timeout=60)
            assert error["code"] == "bad_message" and "'space'" in error["message"]
            send(ws, type="control", keys=["arrowright"])
            assert _step_with(ws, {"keys": ["arrowright"]})["state"]["yaw_deg"] > 0
            up = {"keys": [], "mouse": [0, -5]}  # pointer up (screen y decreases): pitch up
            send(ws, type="control", **up)
            assert _step_with(ws, up)["state"]["pitch_deg"] > 0
            send(ws, type="stop")
            assert recv_json(ws, "stopped", timeout=120)["reason"] == "client"
    finally:
        server.close()
