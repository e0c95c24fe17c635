"""`/v1/realtime/video` (vLLM-Omni's realtime video protocol) against a live local server.

The client follows vLLM-Omni's documentation (docs/serving/streaming_video_output_api.md):
one ``session.start``; ``video.start``; per chunk a ``video.chunk_metadata`` text message and
then one binary message of fragmented MP4; ``session.done``. The received bytes, concatenated,
must decode (the ffmpeg that imageio-ffmpeg ships) to the requested frames.
"""

import asyncio
import json

import imageio_ffmpeg
import numpy as np
import pytest
from websockets.sync.client import connect

from flashdreams.serve.fmp4 import FragmentedMP4Encoder
from tests.unit.test_serve_protocol import ServerProcess


def realtime_session(port: int, start: dict, interaction_after: int | None = None) -> dict:
    """A vLLM-Omni client: returns the events, the chunks and their metadata."""
    events, chunks = [], []
    with connect(f"ws://127.0.0.1:{port}/v1/realtime/video", max_size=None,
                 open_timeout=10) as ws:  # fmt: skip
        ws.send(json.dumps({"type": "session.start", **start}))
        while True:
            msg = ws.recv(timeout=60)
            if isinstance(msg, bytes):
                assert events[-1]["type"] == "video.chunk_metadata"  # metadata comes first
                assert events[-1]["byte_length"] == len(msg)
                chunks.append(msg)
                if interaction_after == len(chunks):
                    ws.send(json.dumps({"type": "session.ping"}))
                    ws.send(json.dumps({"type": "session.interaction", "interaction": {
                        "event_id": "river", "event": {"prompt": "a river at night"}}}))  # fmt: skip
                continue
            events.append(json.loads(msg))
            if events[-1]["type"] in ("session.done", "error"):
                break
    return {"events": events, "chunks": chunks}


def decode(data: bytes, tmp_path) -> list[np.ndarray]:
    path = tmp_path / "stream.mp4"
    path.write_bytes(data)
    frames = imageio_ffmpeg.read_frames(str(path))
    meta = next(frames)
    return [np.frombuffer(f, np.uint8).reshape(meta["size"][1], meta["size"][0], 3)
            for f in frames]  # fmt: skip


def check_stream(run: dict, num_frames: int, tmp_path) -> None:
    kinds = [e["type"] for e in run["events"]]
    assert kinds[0] == "video.start" and kinds[-1] == "session.done", kinds
    start, done = run["events"][0], run["events"][-1]
    assert start["format"] == "m4s" and start["request_id"].startswith("video_stream-")
    metas = [e for e in run["events"] if e["type"] == "video.chunk_metadata"]
    assert done == {"type": "session.done", "request_id": start["request_id"],
                    "chunks": len(run["chunks"]), "stopped": False}  # fmt: skip
    assert [m["transport_chunk_index"] for m in metas] == list(range(len(metas)))
    assert sum(m["num_frames"] for m in metas) == num_frames
    assert run["chunks"][0][4:8] == b"ftyp" and all(c[4:8] == b"moof" for c in run["chunks"][1:])
    frames = decode(b"".join(run["chunks"]), tmp_path)
    assert len(frames) == num_frames and frames[0].shape == (64, 64, 3)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("realtime"), "serve.realtime=false")
    yield srv
    srv.close()


def test_vllm_omni_client_receives_decodable_fragmented_mp4(server, tmp_path):
    start = {"model": "demo", "prompt": "a fox in the snow", "format": "m4s", "width": 64,
             "height": 64, "fps": 16, "num_frames": 25, "seed": 7}  # fmt: skip
    run = realtime_session(server.port, start, interaction_after=1)
    check_stream(run, 25, tmp_path)
    kinds = [e["type"] for e in run["events"]]
    assert "session.pong" in kinds and "session.interaction.queued" in kinds
    queued = next(e for e in run["events"] if e["type"] == "session.interaction.queued")
    assert queued["event_id"] == "river"
    again = realtime_session(server.port, start)  # same seed, same video
    assert b"".join(again["chunks"]) != b"" and len(again["chunks"]) == 3
    server.wait_idle()


@pytest.mark.parametrize(("start", "needle"), [
    ({"model": "other", "prompt": "x"}, "Model mismatch"),
    ({"prompt": "x", "format": "mp4"}, "expected 'm4s'"),
    ({"prompt": "x", "size": "640x384"}, "this server streams 64x64"),
    ({"prompt": ""}, "prompt must be a non-empty string"),
    ({"prompt": "x", "num_frames": 0}, "num_frames must be a positive integer"),
    ({"prompt": "x", "guidance_scale": 5.0}, "unsupported field(s) ['guidance_scale']"),
    ({"prompt": "x", "extra_params": {"steps": 3}}, "extra_params must be an object"),
])  # fmt: skip
def test_bad_session_start_gets_one_error_and_the_connection_closes(server, start, needle):
    run = realtime_session(server.port, start)
    assert [e["type"] for e in run["events"]] == ["error"] and needle in run["events"][0]["message"]


def test_stop_mid_stream_reports_stopped_and_oversize_messages_are_refused(server, tmp_path):
    with connect(f"ws://127.0.0.1:{server.port}/v1/realtime/video", max_size=None) as ws:
        ws.send(json.dumps({"type": "session.start", "prompt": "a fox"}))  # endless
        assert json.loads(ws.recv(timeout=60))["type"] == "video.start"
        ws.send("x" * 70_000)
        chunks, events = [], []
        while not any(e["type"] == "session.done" for e in events):
            msg = ws.recv(timeout=60)
            if isinstance(msg, bytes):
                chunks.append(msg)
                if len(chunks) == 2:
                    ws.send(json.dumps({"type": "session.stop"}))
            else:
                events.append(json.loads(msg))
    errors = [e for e in events if e["type"] == "error"]
    assert len(errors) == 1 and "serve.max_message_bytes=65536" in errors[0]["message"]
    assert events[-1]["stopped"] is True and events[-1]["chunks"] == len(chunks) >= 2
    assert len(decode(b"".join(chunks), tmp_path)) == sum(
        e["num_frames"] for e in events if e["type"] == "video.chunk_metadata"
    )
    server.wait_idle()


def test_encoder_fragments_concatenate_to_the_frames_written(tmp_path):
    rng = np.random.default_rng(0)
    video = [np.full((48, 64, 3), 40 * k, np.uint8) for k in range(6)]
    video = [np.clip(v + rng.integers(0, 8, v.shape), 0, 255).astype(np.uint8) for v in video]

    async def encode() -> list[bytes]:
        enc = FragmentedMP4Encoder(64, 48, 16, crf=10)
        out = [await enc.encode([f.tobytes() for f in video[:1]]),
               await enc.encode([f.tobytes() for f in video[1:]])]  # fmt: skip
        await enc.close()
        return out

    chunks = asyncio.run(encode())
    frames = decode(b"".join(chunks), tmp_path)
    assert len(frames) == 6
    for want, got in zip(
        video, frames, strict=True
    ):  # H.264 at crf 10: close to the input, in order
        assert np.abs(got.astype(int) - want.astype(int)).mean() < 6
