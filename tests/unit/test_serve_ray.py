"""`serve.backend=ray`: two generator replicas in one local Ray (CPU, tiny demo recipe).

One Ray instance for the module (`serve.ray_num_cpus=4`, two replicas of `max_sessions=2`):
four concurrent streams equal single-process runs with the same seed (every message of a
stream reached the replica that holds it), a fifth start is `busy`, `/status` lists both
replicas; a killed replica's clients get `replica_lost` while the other streams go on, and
Ray's replacement takes new sessions; the vLLM-Omni realtime client and the limits work the
same as on the local backend.
"""

import contextlib
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.unit.test_serve_protocol import ServerProcess, recv_frames, recv_json, send

pytest.importorskip("ray.serve", reason="ray[serve] is not installed (pip install -e .[ray])")

STEPS = 3
FRAMES = 9 + 12 * (STEPS - 1)
CASES = [("a fox", 1), ("a fox", 2), ("a city", 1), ("a river", 5)]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("ray"), "serve.backend=ray", "serve.replicas=2",
                        "serve.max_sessions=2", "serve.ray_num_cpus=4", "serve.lead_s=0.5",
                        "serve.queue_frames=512", timeout=240, stop_s=60)  # fmt: skip
    try:
        wait_replicas(srv, 2)
        yield srv
    finally:
        srv.close()


def wait_replicas(server, count: int, timeout: float = 120, exclude=()) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        replicas = [r for r in server.status()["replicas"] if r["pid"] not in (None, *exclude)]
        if len(replicas) == count:
            return replicas
        assert time.monotonic() < deadline, server.status()
        time.sleep(0.2)


def reference_jpegs(prompt: str, seed: int) -> list[bytes]:
    """The first FRAMES frames of an endless stream, made in this process (no server)."""
    import torch

    from flashdreams import Session
    from flashdreams.serve.protocol import encode_jpeg

    session = Session.from_overrides(["device=cpu", "rollout.height=64", "rollout.width=64"],
                                     prompt=prompt, seed=seed, total_blocks=None)  # fmt: skip
    out = []
    for _ in range(STEPS):
        u8 = (session.step().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 1, 3, 4, 2)
        out += [encode_jpeg(frame.numpy(), 85) for frame in u8[0]]
    session.close()
    return out


def test_four_streams_stick_to_their_replicas_and_a_fifth_is_busy(server):
    references = {case: reference_jpegs(*case) for case in CASES}
    with contextlib.ExitStack() as stack:
        clients = [stack.enter_context(server.ws(max_size=None)) for _ in CASES]
        started = []
        for ws, (prompt, seed) in zip(clients, CASES, strict=True):
            send(ws, type="start", prompt=prompt, seed=seed)  # endless
            started.append(recv_json(ws, "started", timeout=60))
        assert sorted(s["replica"] for s in started).count(started[0]["replica"]) == 2
        with server.ws() as fifth:
            send(fifth, type="start", prompt="a fox")
            busy = recv_json(fifth, "error", timeout=60)
            assert busy["code"] == "busy" and "serve.max_sessions=2" in busy["message"]
        with ThreadPoolExecutor(len(clients)) as pool:
            frames = list(pool.map(lambda ws: recv_frames(ws, FRAMES, timeout=120), clients))
        for case, got in zip(CASES, frames, strict=True):
            assert [info.frame for info, _ in got] == list(range(FRAMES))
            assert [jpeg for _, jpeg in got] == references[case], f"stream {case} differs"
        status = server.status()
        assert status["backend"] == "ray" and status["num_replicas"] == 2
        assert status["active_sessions"] == 4 and status["max_sessions"] == 4
        assert {r["device"] for r in status["replicas"]} == {"cpu"}
        assert all(r["median_step_ms"] > 0 for r in status["replicas"])
        for ws in clients:
            send(ws, type="stop")
            assert recv_json(ws, "stopped", timeout=60)["reason"] == "client"
    server.wait_idle(timeout=30)


def test_limits_and_allow_lists_hold_on_the_ray_backend(server):
    from tests.unit.test_serve_hardening import raw_handshake

    port = server.port
    assert raw_handshake(port, f"127.0.0.1:{port}", None) == 101
    assert raw_handshake(port, f"127.0.0.1:{port}", "http://evil.example") == 403
    assert raw_handshake(port, f"attacker.example:{port}", None) == 403
    with server.ws() as ws:
        recv_json(ws, "hello")
        ws.send("x" * 70_000)
        error = recv_json(ws, "error")
        assert error["code"] == "too_large" and "serve.max_message_bytes=65536" in error["message"]
        ws.send(b"\0" * 70_000)
        assert recv_json(ws, "error")["code"] == "too_large"
        send(ws, type="pause")  # checked on the ingress: no stream runs
        assert recv_json(ws, "error")["code"] == "no_session"
        send(ws, type="start", seed=-1)
        assert recv_json(ws, "error")["code"] == "bad_message"


def test_a_stop_delivers_every_frame_already_produced_on_the_ray_backend(server):
    """As on the local backend (test_serve_pacing.py): the frames made before a stop, still
    waiting for their turn on the replica, all arrive before ``stopped``, which counts them."""
    from tests.unit.test_serve_pacing import frames_until_stopped

    with server.ws(max_size=None) as ws:
        send(ws, type="start", prompt="a fox", seed=1)  # endless
        recv_json(ws, "started", timeout=60)
        got = recv_frames(ws, 10, timeout=60)
        send(ws, type="stop")
        more, stopped = frames_until_stopped(ws, timeout=60)
    got += more
    assert stopped["reason"] == "client" and stopped["dropped"] == 0
    assert stopped["frames"] == len(got) > 10, (stopped, len(got))
    assert [info.frame for info, _ in got] == list(range(len(got)))
    server.wait_idle(timeout=30)


def test_a_flood_of_messages_is_rate_limited_on_the_ray_backend(server):
    """The ingress applies serve.max_messages_per_s (defaults) as the local server does: a flood
    of 500 messages gets one reply each (no_session from the ingress, or rate_limited past the
    burst), and the connection goes on to stream."""
    import json

    with server.ws(max_size=None) as ws:
        recv_json(ws, "hello")
        for _ in range(500):
            send(ws, type="pause")  # no stream: refused on the ingress, no replica call
        codes = [json.loads(ws.recv(timeout=30))["code"] for _ in range(500)]
        assert set(codes) == {"no_session", "rate_limited"}, set(codes)
        assert 200 <= codes.count("no_session") < 300, codes.count("no_session")
        time.sleep(1.0)  # the bucket refills
        send(ws, type="start", prompt="a fox", seed=1)
        recv_json(ws, "started", timeout=60)
        recv_frames(ws, 3, timeout=60)
        send(ws, type="stop")
        assert recv_json(ws, "stopped", timeout=60)["reason"] == "client"
    server.wait_idle(timeout=30)


def test_vllm_omni_client_streams_through_the_ray_backend(server, tmp_path):
    from tests.unit.test_serve_realtime import check_stream, realtime_session

    run = realtime_session(server.port, {"prompt": "a fox", "num_frames": 21, "seed": 3})
    check_stream(run, 21, tmp_path)
    server.wait_idle(timeout=30)


def test_a_killed_replica_loses_only_its_streams_and_comes_back(server):
    with server.ws(max_size=None) as a, server.ws(max_size=None) as b:
        send(a, type="start", prompt="a fox", seed=1)
        replica_a = recv_json(a, "started", timeout=60)["replica"]
        send(b, type="start", prompt="a city", seed=2)
        assert recv_json(b, "started", timeout=60)["replica"] != replica_a  # most free slots
        recv_frames(a, 3, timeout=60)
        replicas = wait_replicas(server, 2)
        pid = next(r["pid"] for r in replicas if r["replica"] == replica_a)
        os.kill(pid, signal.SIGKILL)
        t0 = time.monotonic()
        error = recv_json(a, "error", timeout=15)
        stopped = recv_json(a, "stopped", timeout=15)
        assert error["code"] == "replica_lost" and stopped["reason"] == "replica_lost"
        assert time.monotonic() - t0 < 10
        last = recv_frames(b, 1, timeout=30)[0][0].frame
        assert recv_frames(b, 24, timeout=30)[-1][0].frame > last  # the other stream goes on
        send(b, type="stop")
        recv_json(b, "stopped", timeout=30)
        wait_replicas(server, 2, timeout=180, exclude={pid})  # Ray's replacement is up
        for ws in (a, b):  # new sessions start (on either replica)
            send(ws, type="start", prompt="a fox", total_blocks=2)
            recv_json(ws, "started", timeout=60)
            assert recv_json(ws, "stopped", timeout=60)["reason"] == "finished"
    server.wait_idle(timeout=30)


def test_the_page_drives_the_ray_backend(server):
    """The browser test of the local backend (tests/unit/test_serve_browser.py), on Ray."""
    browser = pytest.importorskip("tests.unit.test_serve_browser")
    if browser.CHROMIUM is None:
        pytest.skip("Chromium is not installed (apt-get install -y chromium; .ci/run does this)")
    with browser.sync_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=browser.CHROMIUM, args=browser.ARGS)
        try:
            page = chromium.new_page(viewport={"width": 1100, "height": 800})
            browser.test_page_streams_steers_and_switches_prompt(server, page)
        finally:
            chromium.close()
