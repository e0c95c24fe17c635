"""`flashdreams-serve` in real time: frames paced at the video's rate; session memory bounded."""

import json
import time

import pytest

from flashdreams.serve.protocol import unpack_frame
from tests.unit.test_serve_protocol import ServerProcess, recv_frames, recv_json, send

FPS = 16
LIMIT = 2_000_000  # bytes: a few blocks of the tiny model's full KV cache at 64x64


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("pacing"), "cache=full", f"fps={FPS}",
                        "serve.total_blocks=4", f"serve.max_session_bytes={LIMIT}",
                        "serve.realtime=true", "serve.lead_s=0.5")  # fmt: skip
    yield srv
    srv.close()


def stream_arrivals(ws) -> list[float]:
    """Arrival times of every frame until ``stopped``."""
    times = []
    while True:
        msg = ws.recv(timeout=30)
        if isinstance(msg, bytes):
            times.append(time.monotonic())
        elif '"stopped"' in msg:
            assert '"finished"' in msg, msg
            return times


def test_frames_arrive_at_the_frame_rate_not_in_bursts(server):
    with server.ws() as ws:
        send(ws, type="start", prompt="a fox", total_blocks=4)
        recv_json(ws, "started")
        times = stream_arrivals(ws)
    assert len(times) == 9 + 3 * 12
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    bursts = sum(gap < 0.25 / FPS for gap in gaps)
    assert bursts <= len(gaps) // 5, f"{bursts} of {len(gaps)} frames came in bursts"
    assert max(gaps) < 4 / FPS, f"a gap of {max(gaps):.3f} s"
    rate = (len(times) - 1) / (times[-1] - times[0])
    assert 0.8 * FPS < rate < 1.2 * FPS, rate


def test_a_session_over_max_session_bytes_is_refused_before_allocating(server):
    with server.ws() as ws:
        t0 = time.monotonic()
        send(ws, type="start", prompt="a fox", total_blocks=100_000)
        error = recv_json(ws, "error")
        assert error["code"] == "too_large", error
        assert f"serve.max_session_bytes={LIMIT}" in error["message"]
        assert time.monotonic() - t0 < 2.0  # refused, not allocated
        status = server.status()
        assert status["live_sessions"] == 0 and status["max_session_bytes"] == LIMIT
        send(ws, type="start", prompt="a fox", total_blocks=2)  # a small one runs
        assert recv_json(ws, "started")["total_blocks"] == 2
        assert len(stream_arrivals(ws)) == 9 + 12
    server.wait_idle()


def frames_until_stopped(ws, timeout: float = 30) -> tuple[list, dict]:
    """The frame messages until ``stopped``, and ``stopped``."""
    frames, deadline = [], time.monotonic() + timeout
    while True:
        msg = ws.recv(timeout=max(0.01, deadline - time.monotonic()))
        if isinstance(msg, bytes):
            frames.append(unpack_frame(msg))
        elif json.loads(msg)["type"] == "stopped":
            return frames, json.loads(msg)


def test_a_stop_delivers_every_frame_already_produced(server):
    """A stop mid-stream: no step after it, and the frames made but still waiting for their
    turn (realtime: up to lead_s plus a block ahead) all arrive, at once, before ``stopped``,
    whose ``frames`` is the count received."""
    with server.ws() as ws:
        send(ws, type="start", prompt="a fox", total_blocks=4)
        recv_json(ws, "started")
        got = recv_frames(ws, 10)  # step 0 (9 frames) played, step 1 made and waiting
        t0 = time.monotonic()
        send(ws, type="stop")
        more, stopped = frames_until_stopped(ws)
        waited = time.monotonic() - t0
    got += more
    assert stopped["reason"] == "client" and stopped["dropped"] == 0
    assert stopped["frames"] == len(got) > 10, (stopped, len(got))
    assert [info.frame for info, _ in got] == list(range(len(got)))
    assert stopped["steps"] < 4 and waited < 2.0  # no step after the stop; not paced out
    server.wait_idle()
