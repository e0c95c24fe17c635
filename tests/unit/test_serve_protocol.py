"""The streaming protocol against a real `flashdreams-serve` process on loopback."""

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image
from websockets.sync.client import connect

from flashdreams.serve.protocol import unpack_frame

SERVE = [sys.executable, "-m", "flashdreams.serve.cli"]
DEVICE = os.environ.get("FLASHDREAMS_TEST_DEVICE", "cpu")  # cuda: the same tests on a GPU
TINY = [f"device={DEVICE}", "rollout.height=64", "rollout.width=64"]


class ServerProcess:
    """A `flashdreams-serve` subprocess on a free loopback port."""

    def __init__(self, tmp: Path, *overrides: str, timeout: float = 90, stop_s: float = 10) -> None:
        self.stop_s, self.overrides = stop_s, overrides
        port_file = tmp / "port"
        args = [*TINY, "serve.port=0", f"serve.port_file={port_file}",
                f"hydra.run.dir={tmp / 'run'}", *overrides]  # fmt: skip
        self.log = open(tmp / "server.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen([*SERVE, *args], stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
        deadline = time.monotonic() + timeout
        while not port_file.is_file() or not port_file.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError("server did not start:\n" + (tmp / "server.log").read_text())
            time.sleep(0.05)
        self.port = int(port_file.read_text())
        self.url = f"http://127.0.0.1:{self.port}"

    def ws(self, **kwargs):
        return connect(f"ws://127.0.0.1:{self.port}/ws", open_timeout=10, **kwargs)

    def status(self) -> dict:
        with urllib.request.urlopen(self.url + "/status", timeout=10) as resp:
            return json.loads(resp.read())

    def wait_idle(self, timeout: float = 20.0) -> dict:
        """Wait until no session holds a slot or device memory."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            if status["active_sessions"] == 0 and status["live_sessions"] == 0:
                return status
            assert time.monotonic() < deadline, status
            time.sleep(0.05)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=self.stop_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def recv_json(ws, kind: str, timeout: float = 20.0) -> dict:
    """Next JSON message of type ``kind`` (frames and other messages are skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        msg = ws.recv(timeout=max(0.01, deadline - time.monotonic()))
        if isinstance(msg, str) and json.loads(msg)["type"] == kind:
            return json.loads(msg)


def recv_frames(ws, count: int, timeout: float = 20.0) -> list:
    """The next ``count`` frames as (FrameInfo, jpeg); JSON messages are skipped."""
    out, deadline = [], time.monotonic() + timeout
    while len(out) < count:
        msg = ws.recv(timeout=max(0.01, deadline - time.monotonic()))
        if isinstance(msg, bytes):
            out.append(unpack_frame(msg))
    return out


def send(ws, **msg) -> None:
    ws.send(json.dumps(msg))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("serve"), "serve.max_sessions=2",
                        "serve.realtime=false", "serve.queue_frames=16",
                        "serve.send_buffer_bytes=8192")  # fmt: skip
    yield srv
    srv.close()


def test_page_and_hello(server):
    with urllib.request.urlopen(server.url + "/", timeout=10) as resp:
        assert b"<canvas" in resp.read()
    with server.ws() as ws:
        hello = json.loads(ws.recv(timeout=10))
        assert hello["type"] == "hello" and (hello["height"], hello["width"]) == (64, 64)
        assert hello["control"] is None  # a recipe without control: the page sends every key


def test_finite_stream_frames_have_the_right_size_and_count(server):
    with server.ws() as ws:
        send(ws, type="start", prompt="a fox", seed=1, total_blocks=3)
        assert recv_json(ws, "started")["total_blocks"] == 3
        frames, stopped = [], None
        while stopped is None:
            msg = ws.recv(timeout=20)
            if isinstance(msg, bytes):
                frames.append(unpack_frame(msg))
            elif json.loads(msg)["type"] == "stopped":
                stopped = json.loads(msg)
    assert stopped["reason"] == "finished" and stopped["frames"] == len(frames) == 9 + 12 + 12
    assert [info.step for info, _ in frames] == [0] * 9 + [1] * 12 + [2] * 12
    assert [info.frame for info, _ in frames] == list(range(33))
    assert all(info.step_ms > 0 and info.period_ms >= info.step_ms for info, _ in frames[:-12])
    assert Image.open(io.BytesIO(frames[-1][1])).size == (64, 64)


def test_prompt_switch_mid_stream_then_stop(server):
    with server.ws() as ws:
        send(ws, type="start", prompt="a fox")  # endless
        assert recv_json(ws, "started")["total_blocks"] is None
        first = recv_frames(ws, 21)
        assert {info.prompt_version for info, _ in first} == {0}
        send(ws, type="prompt", text="a river at night")
        assert recv_json(ws, "prompt")["text"] == "a river at night"
        step = recv_json(ws, "step")
        while step["prompt_version"] == 0:
            step = recv_json(ws, "step")
        assert step["recache_ms"] > 0 and step["step"] >= 2
        after = recv_frames(ws, 12)
        assert {info.prompt_version for info, _ in after} == {1}
        send(ws, type="stop")
        stopped = recv_json(ws, "stopped")
        assert stopped["reason"] == "client" and stopped["steps"] > step["step"]
        send(ws, type="prompt", text="too late")
        assert recv_json(ws, "error")["code"] == "no_session"
    server.wait_idle()


BAD = [
    ("not json", "bad_json"),
    (json.dumps([1, 2]), "bad_message"),
    (json.dumps({"type": "fly"}), "unknown_type"),
    (json.dumps({"type": "start", "seed": "x"}), "bad_message"),
    (json.dumps({"type": "start", "total_blocks": 0}), "bad_message"),
    (json.dumps({"type": "start", "colour": "red"}), "bad_message"),
    (json.dumps({"type": "prompt", "text": ""}), "bad_message"),
    (json.dumps({"type": "prompt", "text": "x" * 3000}), "bad_message"),
    (json.dumps({"type": "control", "keys": {"a": 1}}), "bad_message"),
    (json.dumps({"type": "prompt", "text": "x" * 70000}), "too_large"),
    (b"\x00\x01", "binary"),
]


def test_malformed_messages_get_errors_and_the_stream_goes_on(server):
    with server.ws() as ws:
        send(ws, type="pause")
        assert recv_json(ws, "error")["code"] == "no_session"
        send(ws, type="start", prompt="a fox")
        recv_json(ws, "started")
        recv_frames(ws, 3)
        for raw, code in BAD:
            ws.send(raw)
            error = recv_json(ws, "error")
            assert error["code"] == code, (raw[:40], error)
        before = recv_frames(ws, 1)[0][0].frame
        send(ws, type="control", keys=["w"], yaw=0.5)
        controlled = recv_json(ws, "step")
        while controlled["control"] is None:
            controlled = recv_json(ws, "step")
        assert controlled["control"] == {"keys": ["w"], "yaw": 0.5}
        assert recv_frames(ws, 12)[-1][0].frame > before  # still streaming
        send(ws, type="pause")
        assert recv_json(ws, "paused")["step"] >= 1
        send(ws, type="resume")
        recv_json(ws, "resumed")
        recv_frames(ws, 12)
    server.wait_idle()


def test_max_sessions_plus_one_gets_busy_and_no_device_work(server):
    with server.ws() as a, server.ws() as b, server.ws() as c:
        for ws in (a, b):
            send(ws, type="start", prompt="a fox")
            recv_json(ws, "started")
        send(c, type="start", prompt="a fox")
        busy = recv_json(c, "error")
        assert busy["code"] == "busy" and "serve.max_sessions=2" in busy["message"]
        status = server.status()
        assert status["active_sessions"] == 2 and status["live_sessions"] == 2
        send(a, type="stop")
        recv_json(a, "stopped")
        send(c, type="start", prompt="a fox")  # a slot is free again
        recv_json(c, "started")
        recv_frames(c, 9)
        for ws in (b, c):  # stop and drain, so closing needs no timeout
            send(ws, type="stop")
            recv_json(ws, "stopped")
    server.wait_idle()


def test_disconnect_mid_stream_frees_the_session(server):
    with server.ws() as ws:
        send(ws, type="start", prompt="a fox")
        recv_json(ws, "started")
        recv_frames(ws, 10)
        assert server.status()["active_sessions"] == 1
        ws.socket.shutdown(socket.SHUT_RDWR)  # vanish without a close handshake
        status = server.wait_idle()
    assert status["live_sessions"] == 0


def test_slow_client_never_stalls_generation(server):
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a slow link: tiny buffers
    with connect(f"ws://127.0.0.1:{server.port}/ws", sock=sock, max_queue=1) as ws:
        send(ws, type="start", prompt="a fox")
        recv_json(ws, "started")
        time.sleep(1.5)  # read nothing: the buffers fill, then the server's queue drops frames
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)  # now read fast
        frames = []
        while not frames or frames[-1][0].dropped == 0:
            frames += recv_frames(ws, 1)
            assert len(frames) < 1000
        send(ws, type="stop")
        stopped = recv_json(ws, "stopped", timeout=30)
    dropped = frames[-1][0].dropped
    assert dropped > 0 and stopped["dropped"] >= dropped
    gap = frames[-1][0].frame - frames[-2][0].frame
    assert gap > 1  # the oldest queued frames were dropped, the newest kept
    assert stopped["frames"] > 2 * len(frames)  # generation went on while the client stalled
    server.wait_idle()


def test_cli_help_and_one_line_config_errors(tmp_path):
    help_text = subprocess.run([*SERVE, "--help"], capture_output=True, text=True, timeout=120)
    assert "flashdreams-serve" in help_text.stdout and "serve.max_sessions" in help_text.stdout
    proc = subprocess.run([*SERVE, *TINY, "serve.max_sessions=0", f"hydra.run.dir={tmp_path}"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "flashdreams: error: serve.max_sessions=0 must be >= 1"
    )


def test_control_frame_images_are_checked_from_their_header():
    """``parse_control_frame``: the pixel limit is read from the image header (a PNG declaring
    20000 x 20000 is refused without decoding, past PIL's own bomb limit too); PNG and JPEG only."""
    import io
    import struct
    import zlib

    from PIL import Image

    from flashdreams.serve.protocol import ProtocolError, pack_control_frame, parse_control_frame

    def declaring(width: int, height: int) -> bytes:
        def chunk(kind: bytes, data: bytes) -> bytes:
            crc = struct.pack(">I", zlib.crc32(kind + data))
            return struct.pack(">I", len(data)) + kind + data + crc

        ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))  # fmt: skip

    for size, limit in (((20000, 20000), 2**24), ((300, 200), 50_000)):
        with pytest.raises(ProtocolError) as err:
            parse_control_frame(pack_control_frame(declaring(*size), 3), limit)
        assert err.value.code == "too_large" and f"serve.max_frame_pixels={limit}" in str(err.value)
    buf = io.BytesIO()
    Image.new("RGB", (8, 4), (1, 2, 3)).save(buf, format="PNG")
    index, frame = parse_control_frame(pack_control_frame(buf.getvalue()), 32)
    assert index is None and frame.shape == (4, 8, 3) and frame[0, 0].tolist() == [1, 2, 3]
    with pytest.raises(ProtocolError, match="8x4 pixels: the run is 32x32") as err:
        parse_control_frame(pack_control_frame(buf.getvalue()), 32, run_size=(32, 32))
    assert err.value.code == "bad_frame"
    for fmt in ("BMP", "TIFF"):
        buf = io.BytesIO()
        Image.new("RGB", (8, 4)).save(buf, format=fmt)
        with pytest.raises(ProtocolError, match="PNG or JPEG") as err:
            parse_control_frame(pack_control_frame(buf.getvalue(), 0))
        assert err.value.code == "bad_frame"


def flood_controls(ws, count: int = 500) -> list[dict]:
    """Send ``count`` control messages back to back on a running stream (a thread reads the
    replies meanwhile), then a ``pause``; the JSON replies until ``paused``."""
    import threading

    replies: list = []

    def read() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            msg = ws.recv(timeout=30)
            if isinstance(msg, bytes):
                continue
            replies.append(msg)
            if json.loads(msg)["type"] == "paused":
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    for i in range(count):
        send(ws, type="control", keys=["w"] if i % 2 else [])
    time.sleep(1.0)  # the bucket refills: the pause is taken
    send(ws, type="pause")
    reader.join(timeout=90)
    assert not reader.is_alive() and replies and '"paused"' in replies[-1], replies[-3:]
    for msg in replies:
        assert "Traceback" not in msg and 'File "' not in msg, msg
    return [json.loads(m) for m in replies[:-1]]


def check_flood(ws, count: int = 500) -> list[dict]:
    """A flood of controls: some ``rate_limited`` errors naming the setting (one per dropped
    message, no other reply), the connection stays open and pause / resume work."""
    replies = flood_controls(ws, count)
    errors = [m for m in replies if m["type"] == "error"]
    assert errors and len(errors) <= count - 200, len(errors)  # the burst (200) got through
    for error in errors:
        assert error["code"] == "rate_limited", error
        assert "serve.max_messages_per_s=100" in error["message"] and "\n" not in error["message"]
    assert all(m["type"] in ("error", "step") for m in replies), replies
    send(ws, type="resume")
    recv_json(ws, "resumed")
    recv_frames(ws, 12)
    return errors


def test_a_flood_of_messages_is_rate_limited_and_the_server_stays_responsive(server):
    from tests.unit.test_serve_hardening import rss_bytes

    with server.ws() as ws:
        send(ws, type="start", prompt="a fox")
        recv_json(ws, "started")
        recv_frames(ws, 3)
        base = rss_bytes(server.proc.pid)
        t0 = time.monotonic()
        errors = check_flood(ws)
        print(f"{len(errors)} rate_limited in {time.monotonic() - t0:.2f} s")
        assert rss_bytes(server.proc.pid) - base < 64 * 2**20
        time.sleep(1.0)  # the bucket refills: a normal pace is untouched
        for _ in range(5):
            send(ws, type="control", keys=["d"])
            time.sleep(0.05)
        send(ws, type="stop")
        stopped = recv_json(ws, "stopped")
        with pytest.raises(TimeoutError):
            recv_json(ws, "error", timeout=0.5)
    assert stopped["reason"] == "client"
    server.wait_idle()


def test_the_message_rate_is_a_token_bucket_and_a_long_flood_overflows_it():
    from flashdreams.serve.limits import MessageRate

    now = [0.0]
    rate = MessageRate(10, 5, clock=lambda: now[0])
    assert [rate.admit() for _ in range(7)] == [True] * 5 + [False] * 2  # the burst, then none
    now[0] += 0.25  # 2.5 tokens
    assert [rate.admit() for _ in range(3)] == [True, True, False]
    assert rate.refused == 3 and not rate.flooding
    for _ in range(100):  # 2x the rate for 10 s: refusals drain as fast as they come
        now[0] += 0.05
        rate.admit()
    assert not rate.flooding
    for _ in range(101):  # far past it: more than 10 s worth of refusals pile up
        rate.admit()
    assert rate.flooding
    assert all(MessageRate(0, 1).admit() for _ in range(10_000))  # 0: no limit


def test_a_client_that_keeps_flooding_is_disconnected_on_both_endpoints(tmp_path):
    from websockets.exceptions import ConnectionClosed

    server = ServerProcess(tmp_path, "serve.max_messages_per_s=5", "serve.message_burst=5")
    try:
        for path, message in (("ws", {"type": "pause"}), ("v1/realtime/video",
                                                          {"type": "session.ping"})):  # fmt: skip
            with connect(f"ws://127.0.0.1:{server.port}/{path}", open_timeout=10) as ws:
                if path != "ws":  # (before its session.start, a ping ends the connection)
                    ws.send(json.dumps({"type": "session.start", "prompt": "a fox"}))
                    recv_json(ws, "video.start")
                codes = []
                with contextlib.suppress(ConnectionClosed):
                    for _ in range(2000):
                        ws.send(json.dumps(message))
                with pytest.raises(ConnectionClosed) as closed:  # the replies sent before it
                    while True:
                        msg = ws.recv(timeout=20)
                        if isinstance(msg, str) and '"error"' in msg:
                            codes.append(json.loads(msg).get("code"))
                assert closed.value.rcvd.code == 1008, closed.value
                assert "serve.max_messages_per_s=5" in closed.value.rcvd.reason
                # (the errors still queued when it is cut off may not reach it)
                assert set(codes) <= {"rate_limited", "no_session"} and len(codes) < 2000
        with server.ws() as ws:  # the server goes on
            recv_json(ws, "hello")
            send(ws, type="start", prompt="a fox", total_blocks=1)
            assert recv_json(ws, "stopped")["reason"] == "finished"
    finally:
        server.close()
