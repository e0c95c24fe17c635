"""The OmniDreams closed loop through a real ``flashdreams-serve`` process (CPU, tiny random
weights, 32x32): HDMap frames streamed in as binary messages (``FDM1`` header + PNG) condition
the next steps. The server runs ``control.live=true`` with the clip's file, so one process
serves both runs: a stream fed the file's own frames gives byte-identical JPEG frames to the
file-driven stream, and one fed other frames a different video (the frames are used). Bad
frame messages get one ``error`` each and the stream goes on.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from flashdreams.conditioner.cosmos_video import read_last_frames
from flashdreams.serve.protocol import pack_control_frame
from tests.unit.test_omnidreams_cli import ENCODER, SIZE, _hdmap, _image
from tests.unit.test_serve_protocol import ServerProcess, recv_frames, recv_json, send

FRAMES = 13  # 2 blocks of 2 latent frames: 5 + 8 video frames


def png(frame: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_hdmap")
    clip = _hdmap(root / "clip_hdmap.mp4", FRAMES)
    srv = ServerProcess(
        root, "recipe=omnidreams_single_view", "model=omnidreams_tiny", "model.checkpoint=null",
        "text_encoder=random", "vae=preview", "graph=eager", *ENCODER, f"rollout.height={SIZE}",
        f"rollout.width={SIZE}", "rollout.total_blocks=2", f"image={_image(root / 'first.png')}",
        f"control.video={clip}", "control.live=true", "serve.realtime=false",
        "serve.max_frame_bytes=300000",
    )  # fmt: skip
    frames = [np.asarray(f) for f in read_last_frames(str(clip), FRAMES)]
    yield srv, frames
    srv.close()


def _run(server, frames: list[np.ndarray] | None) -> list[bytes]:
    """One 2-block stream; ``frames`` are streamed in (by index) while it is paused."""
    with server.ws() as ws:
        hello = recv_json(ws, "hello")
        assert hello["control_frames"] == 32 and hello["max_frame_bytes"] == 300000
        send(ws, type="start", prompt="a road", seed=0, total_blocks=2)
        recv_json(ws, "started")
        if frames is not None:
            send(ws, type="pause")
            recv_json(ws, "paused")
            for k, frame in enumerate(frames):
                ws.send(pack_control_frame(png(frame), k))
            send(ws, type="resume")
        out = [jpeg for _, jpeg in recv_frames(ws, FRAMES, timeout=60)]
        assert recv_json(ws, "stopped", timeout=60)["reason"] == "finished"
    return out


def test_streamed_hdmap_frames_give_the_file_driven_video(served):
    server, frames = served
    from_file = _run(server, None)
    assert _run(server, frames) == from_file  # the file's own frames: byte-identical video
    other = np.random.default_rng(5).integers(0, 255, (FRAMES, SIZE, SIZE, 3), np.uint8)
    steered = _run(server, list(other))
    assert steered[5:] != from_file[5:]  # the pushed frames condition the video


def test_bad_frame_messages_get_one_error_each(served):
    server, frames = served
    with server.ws(max_size=None) as ws:
        recv_json(ws, "hello")
        ws.send(pack_control_frame(png(frames[0]), 0))
        assert recv_json(ws, "error")["code"] == "no_session"
        send(ws, type="start", prompt="a road", seed=0, total_blocks=2)
        recv_json(ws, "started")
        bad = {b"FDM1\0\0\0\0not an image": "bad_frame", b"\0" * 100: "binary",
               pack_control_frame(b"\0" * 400_000, 7): "too_large"}  # fmt: skip
        for raw, code in bad.items():
            ws.send(raw)
            error = recv_json(ws, "error")
            assert error["code"] == code and "\n" not in error["message"], error
        gif = io.BytesIO()
        Image.fromarray(frames[0]).save(gif, format="GIF")
        ws.send(pack_control_frame(gif.getvalue(), 3))
        assert "PNG or JPEG" in recv_json(ws, "error")["message"]
        ws.send(pack_control_frame(png(frames[0]), 0))  # the stream's step 0 may take it
        step = recv_json(ws, "step", timeout=60)
        assert step["state"]["hdmap_next_frame"] in (5, 13)
        assert recv_json(ws, "stopped", timeout=60)["reason"] == "finished"
    with open(server.log.name) as log:
        assert "Traceback" not in log.read()
