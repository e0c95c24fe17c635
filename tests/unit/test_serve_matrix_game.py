"""Matrix-Game 2.0 through a real ``flashdreams-serve`` process (CPU, tiny random weights): the
page learns the variant's keys from ``hello``; a control message with a key the variant does not
have gets one ``bad_message`` error naming the key (checked when it arrives, by the recipe's
control encoder, not at the step that would use it) and the stream goes on to its end."""

from __future__ import annotations

import json

import pytest

from tests.unit.test_matrix_game_recipes import TINY, _image
from tests.unit.test_serve_protocol import ServerProcess, recv_json, send


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_mg")
    srv = ServerProcess(root, "recipe=matrix_game2_universal", *TINY, f"image={_image(root)}",
                        "rollout.total_blocks=2", "serve.realtime=false")  # fmt: skip
    yield srv
    srv.close()


def _stream(server, controls: list[dict]):
    """One 2-block stream with ``controls`` sent after ``started``: (hello, errors, frames,
    the stop reason)."""
    with server.ws() as ws:
        hello = recv_json(ws, "hello")
        send(ws, type="start", prompt="a game", seed=0, total_blocks=2)
        recv_json(ws, "started")
        for control in controls:
            send(ws, type="control", **control)
        errors, frames = [], 0
        while True:
            raw = ws.recv(timeout=120)
            if isinstance(raw, bytes):
                frames += 1
                continue
            msg = json.loads(raw)
            if msg["type"] == "error":
                errors.append(msg)
            elif msg["type"] == "stopped":
                return hello, errors, frames, msg["reason"]


def test_a_key_the_variant_lacks_is_refused_and_the_stream_goes_on(server):
    hello, errors, frames, reason = _stream(server, [{"keys": ["space"]}, {"keys": ["w"]}])
    assert hello["control"]["mouse"] is True and "w" in hello["control"]["keys"]
    assert "space" not in hello["control"]["keys"]  # templerun's jump, not the universal model's
    assert len(errors) == 1 and errors[0]["code"] == "bad_message"
    assert "'space'" in errors[0]["message"] and "\n" not in errors[0]["message"]
    assert reason == "finished" and frames > 0  # the valid control after it streamed on
    assert "Traceback" not in (server.log.name and open(server.log.name).read())


def test_the_pointer_units_are_announced_and_a_hostile_mouse_never_stops_the_stream(server):
    """hello tells the page how many camera units a pointer pixel is (0.1 = one camera step =
    20 px per video frame) and the per-frame bound; a huge mouse is clamped, a non-finite one is
    one ``bad_message`` error, and the stream goes on to its end."""
    hostile = [{"keys": ["w"], "mouse": [1e308, -1e308]}, {"mouse": [10**400, 0]},
               {"mouse": [float("nan"), 0.0]}, {"keys": ["w"], "mouse": [0.1, 0.0]}]  # fmt: skip
    hello, errors, frames, reason = _stream(server, hostile)
    assert hello["control"]["mouse_per_px"] == pytest.approx(0.1 / 20)
    assert hello["control"]["mouse_max"] == pytest.approx(0.2)
    assert [e["code"] for e in errors] == ["bad_message", "bad_message"]
    assert all("\n" not in e["message"] for e in errors)
    assert reason == "finished" and frames > 0
    assert "Traceback" not in open(server.log.name).read()
