"""The OmniDreams closed loop through a real ``flashdreams-serve`` process (CPU, tiny random
weights, 32x32): HDMap frames streamed in as binary messages (``FDM1`` header + PNG) condition
the next steps. The server runs ``control.live=true`` with the clip's file, so one process
serves both runs: a stream fed the file's own frames gives byte-identical JPEG frames to the
file-driven stream, and one fed other frames a different video (the frames are used). Bad
frame messages get one ``error`` each and the stream goes on.
"""

from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest
from PIL import Image

from flashdreams.conditioner.cosmos_video import read_last_frames
from flashdreams.serve.protocol import pack_control_frame, unpack_frame
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


# ---------------------------------------------------------------------------- hostile clients
MAX_AHEAD = 32  # control.max_ahead_frames of the served recipe (the default)


def png_declaring(width: int, height: int) -> bytes:
    """A PNG of a few dozen bytes whose header declares ``width`` x ``height`` pixels (its
    pixel data is a few zero bytes: a decompression bomb's header)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def rss_bytes(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _recv(ws, kind: str, frames: list, timeout: float = 20.0) -> dict:
    """Next JSON message of type ``kind``; the frames before it are appended to ``frames``."""
    deadline = time.monotonic() + timeout
    while True:
        msg = ws.recv(timeout=max(0.01, deadline - time.monotonic()))
        if isinstance(msg, bytes):
            frames.append(unpack_frame(msg))
        elif json.loads(msg)["type"] == kind:
            return json.loads(msg)


def _one_line_error(ws, code: str, *needles: str, frames: list | None = None) -> dict:
    error = _recv(ws, "error", [] if frames is None else frames)
    assert error["code"] == code and "\n" not in error["message"], error
    assert "Traceback" not in error["message"] and "/" not in error["message"], error
    for needle in needles:
        assert needle in error["message"], error
    return error


def _paused_after_step0(ws) -> None:
    """Start a 2-block stream and pause it (step 0, file-driven, runs; step 1 waits)."""
    recv_json(ws, "hello")
    send(ws, type="start", prompt="a road", seed=0, total_blocks=2)
    recv_json(ws, "started")
    send(ws, type="pause")
    recv_json(ws, "paused")


def _by_index(server, pushed: dict[int, np.ndarray]) -> list[bytes]:
    """One paused 2-block stream, ``pushed`` frames sent by index; its JPEG frames."""
    with server.ws() as ws:
        _paused_after_step0(ws)
        for k, frame in pushed.items():
            ws.send(pack_control_frame(png(frame), k))
        send(ws, type="resume")
        frames: list = []
        assert _recv(ws, "stopped", frames, timeout=60)["reason"] == "finished"
    return [jpeg for _, jpeg in frames]


def test_a_flood_of_frames_is_refused_past_the_window_and_nothing_is_lost(served):
    """Frames sent faster than the model takes them: the first control.max_ahead_frames wait
    (at the run's size, however large the client's images), each one past them gets one
    bad_frame error naming the limit and is dropped unread; the stream goes on with the frames
    that were accepted, and every frame already produced reaches the client."""
    server, _ = served
    rng = np.random.default_rng(7)
    other = rng.integers(0, 255, (MAX_AHEAD, SIZE, SIZE, 3), np.uint8)
    # the same frames as 1024x1024 PNGs (resized to the run's 32x32 when they arrive): pending
    # frames held at the client's size would take 32 x 3 MiB
    big = [png(np.asarray(Image.fromarray(f).resize((1024, 1024), Image.Resampling.NEAREST)))
           for f in other]  # fmt: skip
    extra = 8
    with server.ws() as ws:
        _paused_after_step0(ws)
        wide = np.zeros((1024, 2048, 3), np.uint8)  # refused from its header, not decoded
        ws.send(pack_control_frame(png(wide)))
        frames: list = []  # step 0's, as they come
        _one_line_error(ws, "bad_frame", "2048x1024", frames=frames)
        base = rss_bytes(server.proc.pid)
        for image in big + big[:extra]:
            ws.send(pack_control_frame(image))  # NEXT_FRAME: 5, 6, ... (step 0 took 0-4)
        for _ in range(extra):
            _one_line_error(ws, "bad_frame", f"control.max_ahead_frames={MAX_AHEAD}", frames=frames)
        grown = rss_bytes(server.proc.pid) - base
        send(ws, type="resume")
        stopped = _recv(ws, "stopped", frames, timeout=60)
        with pytest.raises(TimeoutError):  # nothing else: the accepted frames were all taken
            recv_json(ws, "error", timeout=0.5)
    assert stopped["reason"] == "finished" and stopped["frames"] == FRAMES
    assert stopped["dropped"] == 0 and [f.frame for f, _ in frames] == list(range(FRAMES))
    assert grown < 48 * 2**20, f"{MAX_AHEAD} pending frames took {grown / 2**20:.0f} MiB"
    # the accepted frames (the first ones) conditioned step 1: as if sent by index
    resized = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB").resize((SIZE, SIZE),
                          Image.Resampling.LANCZOS)) for b in big[:8]]  # fmt: skip
    reference = _by_index(server, {5 + k: f for k, f in enumerate(resized)})
    assert [jpeg for _, jpeg in frames] == reference


def test_a_flood_while_the_stream_runs_keeps_every_produced_frame(served):
    """Frames streamed in without pause or reading: memory stays bounded by the window, the
    stream finishes with all its frames, and every refusal is one bad_frame / no_session error."""
    server, frames = served
    image = png(frames[0])
    with server.ws() as ws:
        recv_json(ws, "hello")
        send(ws, type="start", prompt="a road", seed=0, total_blocks=2)
        recv_json(ws, "started")
        for _ in range(3 * MAX_AHEAD):
            ws.send(pack_control_frame(image))
        ws.send("{")  # its bad_json error comes after every reply to the flood
        got, errors, stopped, last = [], [], None, False
        while stopped is None or not last:
            msg = ws.recv(timeout=60)
            if isinstance(msg, bytes):
                got.append(msg)
                continue
            msg = json.loads(msg)
            if msg["type"] == "error" and msg["code"] == "bad_json":
                last = True
            elif msg["type"] == "error":
                errors.append(msg)
            elif msg["type"] == "stopped":
                stopped = msg
    assert stopped["frames"] == len(got) and stopped["dropped"] == 0
    assert stopped["reason"] == "finished" and len(got) == FRAMES
    assert len(errors) >= MAX_AHEAD  # 3 windows sent, at most 2 taken (the stream is 2 steps)
    for error in errors:
        assert error["code"] in ("bad_frame", "no_session") and "\n" not in error["message"]
    assert server.wait_idle()["active_sessions"] == 0


@pytest.mark.parametrize("width, height", [(20000, 20000), (5000, 4000)])
def test_a_decompression_bomb_is_refused_before_its_pixels_are_decoded(served, width, height):
    server, frames = served
    with server.ws() as ws:
        _paused_after_step0(ws)
        base = rss_bytes(server.proc.pid)
        t0 = time.monotonic()
        bomb = png_declaring(width, height)
        assert len(bomb) < 200
        ws.send(pack_control_frame(bomb, 5))
        _one_line_error(ws, "too_large", "serve.max_frame_pixels=16777216")
        assert time.monotonic() - t0 < 2.0
        assert rss_bytes(server.proc.pid) - base < 32 * 2**20
        ws.send(pack_control_frame(png(frames[5]), 5))  # the session goes on
        send(ws, type="resume")
        got: list = []
        assert _recv(ws, "stopped", got, timeout=60)["frames"] == FRAMES
        assert [f.frame for f, _ in got][-(FRAMES - 5) :] == list(range(5, FRAMES))


def test_a_frame_of_another_aspect_ratio_is_refused_on_arrival(served):
    server, frames = served
    wide = np.zeros((SIZE, 2 * SIZE, 3), np.uint8)
    with server.ws() as ws:
        _paused_after_step0(ws)
        ws.send(pack_control_frame(png(wide), 5))
        _one_line_error(ws, "bad_frame", f"{2 * SIZE}x{SIZE}", f"the run is {SIZE}x{SIZE}")
        ws.send(pack_control_frame(png(frames[5]), 5))
        send(ws, type="resume")
        got: list = []
        assert _recv(ws, "stopped", got, timeout=60)["frames"] == FRAMES
        assert [f.frame for f, _ in got][-(FRAMES - 5) :] == list(range(5, FRAMES))
        with pytest.raises(TimeoutError):  # refused once, on arrival: no error after the step
            recv_json(ws, "error", timeout=0.5)


def test_streamed_hdmap_frames_reach_the_model_through_the_ray_backend(served, tmp_path):
    """``serve.backend=ray``: the ingress relays binary control frames to the replica that holds
    the stream, so the closed loop gives the local server's video; a frame before ``start`` and
    one past ``serve.max_frame_bytes`` get one error each on the ingress."""
    pytest.importorskip("ray.serve", reason="ray[serve] is not installed (pip install -e .[ray])")
    local, frames = served
    srv = ServerProcess(tmp_path, *local.overrides, "serve.backend=ray", "serve.replicas=1",
                        "serve.ray_num_cpus=2", timeout=240, stop_s=60)  # fmt: skip
    try:
        with srv.ws() as ws:
            recv_json(ws, "hello")
            ws.send(pack_control_frame(png(frames[0]), 0))
            assert recv_json(ws, "error")["code"] == "no_session"
            ws.send(pack_control_frame(b"\0" * 300001, 0))
            assert recv_json(ws, "error")["code"] == "too_large"
        assert _run(srv, frames) == _run(local, frames)
    finally:
        srv.close()
