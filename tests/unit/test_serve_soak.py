"""Bounded soak: sequential and concurrent sessions; memory returns to baseline, no cross-talk."""

from concurrent.futures import ThreadPoolExecutor

import pytest

from flashdreams.serve.protocol import unpack_frame
from tests.unit.test_serve_protocol import ServerProcess, recv_json, send

BLOCKS = 5
FRAMES = 9 + 12 * (BLOCKS - 1)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("soak"), "serve.max_sessions=2",
                        "serve.realtime=false", "serve.queue_frames=512")  # fmt: skip
    yield srv
    srv.close()


def run_stream(server: ServerProcess, prompt: str, seed: int) -> list[tuple]:
    """A whole finite stream; returns (step, frame index, JPEG) of each frame (not timings)."""
    frames = []
    with server.ws() as ws:
        send(ws, type="start", prompt=prompt, seed=seed, total_blocks=BLOCKS)
        recv_json(ws, "started")
        while True:
            msg = ws.recv(timeout=30)
            if isinstance(msg, bytes):
                info, jpeg = unpack_frame(msg)
                frames.append((info.step, info.frame, jpeg))
            elif '"stopped"' in msg:
                assert '"finished"' in msg, msg
                return frames


def check_baseline(server: ServerProcess, baseline: dict) -> None:
    status = server.wait_idle()
    assert status["memory_bytes"] == baseline["memory_bytes"]  # None on CPU


def test_sessions_return_memory_and_never_see_each_others_frames(server):
    baseline = server.wait_idle()
    cases = [("a fox", 1), ("a fox", 2), ("a city", 1)]
    reference = {}
    for prompt, seed in cases:  # sequential
        reference[prompt, seed] = run_stream(server, prompt, seed)
        assert len(reference[prompt, seed]) == FRAMES
        check_baseline(server, baseline)
    assert len({tuple(frames) for frames in reference.values()}) == len(cases)

    for _ in range(2):  # concurrent, up to max_sessions at a time, interleaved on the device
        with ThreadPoolExecutor(2) as pool:
            runs = {case: pool.submit(run_stream, server, *case) for case in cases}
            for case, run in runs.items():
                assert run.result() == reference[case], f"stream {case} differs when concurrent"
        check_baseline(server, baseline)
    assert run_stream(server, "a fox", 1) == reference["a fox", 1]
    check_baseline(server, baseline)
