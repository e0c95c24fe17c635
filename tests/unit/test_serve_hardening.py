"""`flashdreams-serve` under hostile and careless clients (issue 21), against a live server."""

import asyncio
import contextlib
import json
import random
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest
from omegaconf import OmegaConf
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from flashdreams.serve import protocol
from flashdreams.serve.app import OutQueue
from flashdreams.serve.stream import Stream
from tests.unit.test_serve_protocol import SERVE, TINY, ServerProcess, recv_frames, recv_json, send

ERROR_CODES = {"bad_json", "bad_message", "unknown_type", "too_large", "binary"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # the fuzz test's 300 request / reply round trips outrun the default message rate (100/s
    # past a burst of 200): a burst of 1000 keeps them all parsed (rate limits: test_serve_protocol)
    srv = ServerProcess(tmp_path_factory.mktemp("harden"), "serve.realtime=false",
                        "serve.queue_frames=64", "serve.message_burst=1000")  # fmt: skip
    yield srv
    srv.close()


def log_text(server) -> str:
    server.log.flush()
    return open(server.log.name).read()


def rss_bytes(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@contextlib.contextmanager
def started(server):
    """A client with a running endless stream."""
    with server.ws(max_size=None) as ws:
        recv_json(ws, "hello")
        send(ws, type="start", prompt="a fox")
        recv_json(ws, "started")
        recv_frames(ws, 3)
        yield ws


def test_deeply_nested_json_gets_bad_json_and_the_stream_goes_on(server):
    with started(server) as ws:
        ws.send("[" * 1000 + "]" * 1000)
        assert recv_json(ws, "error")["code"] == "bad_json"
        ws.send('{"type": "control", "keys": ' + "[" * 5000 + "]" * 5000 + "}")
        assert recv_json(ws, "error")["code"] in ("bad_json", "bad_message")
        before = recv_frames(ws, 1)[0][0].frame
        assert recv_frames(ws, 12)[-1][0].frame > before
        send(ws, type="stop")
        recv_json(ws, "stopped")
    assert "RecursionError" not in log_text(server)


@pytest.mark.parametrize("size", [70_000, 2**20, 5 * 2**20])
def test_oversize_messages_of_any_size_get_too_large_and_the_stream_goes_on(server, size):
    with started(server) as ws:
        ws.send("x" * size)
        error = recv_json(ws, "error")
        assert error["code"] == "too_large" and "serve.max_message_bytes=65536" in error["message"]
        ws.send(b"\0" * size)
        assert recv_json(ws, "error")["code"] == "too_large"
        send(ws, type="control", keys=["w"])  # a fine message right after is understood
        step = recv_json(ws, "step")
        while step["control"] is None:
            step = recv_json(ws, "step")
        send(ws, type="stop")
        recv_json(ws, "stopped")


def test_oversize_messages_are_dropped_unread(server):
    """The server's memory does not grow with the size of a message past the limit."""
    with started(server) as ws:
        ws.send("x" * 2**20)  # warm the server's buffers
        recv_json(ws, "error")
        base = rss_bytes(server.proc.pid)
        ws.send("x" * (96 * 2**20))
        assert recv_json(ws, "error", timeout=60)["code"] == "too_large"
        grown = rss_bytes(server.proc.pid) - base
        send(ws, type="stop")
        recv_json(ws, "stopped")
    assert grown < 32 * 2**20, f"the server grew by {grown / 2**20:.0f} MiB for a 96 MiB message"


def raw_handshake(port: int, host: str, origin: str | None) -> int:
    """HTTP status of a WebSocket upgrade with these ``Host`` / ``Origin`` headers."""
    lines = ["GET /ws HTTP/1.1", f"Host: {host}", "Upgrade: websocket", "Connection: Upgrade",
             "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13"]  # fmt: skip
    if origin is not None:
        lines.append(f"Origin: {origin}")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        return int(sock.recv(4096).split(b" ", 2)[1])


def test_other_sites_and_rebinding_hosts_are_refused_before_the_upgrade(server):
    port = server.port
    here = f"127.0.0.1:{port}"
    assert raw_handshake(port, here, None) == 101  # non-browser clients send no Origin
    assert raw_handshake(port, here, f"http://{here}") == 101  # the page this server served
    assert raw_handshake(port, f"localhost:{port}", f"http://localhost:{port}") == 101
    assert raw_handshake(port, f"[::1]:{port}", None) == 101
    for origin in ("http://evil.example", "null", f"http://evil.example:{port}",
                   f"http://localhost:{port + 1}"):  # fmt: skip
        assert raw_handshake(port, here, origin) == 403, origin
    assert raw_handshake(port, f"attacker.example:{port}", None) == 403  # DNS rebinding
    with pytest.raises(InvalidStatus, match="403"):
        connect(f"ws://127.0.0.1:{port}/ws", origin="http://evil.example", open_timeout=10)
    request = urllib.request.Request(server.url + "/status", headers={"Host": "attacker.example"})
    with pytest.raises(urllib.error.HTTPError, match="403"):
        urllib.request.urlopen(request, timeout=10)
    server.wait_idle()


def test_abrupt_disconnects_log_one_line_at_most(server):
    server.wait_idle()
    before = len(log_text(server).splitlines())
    for _ in range(3):
        with started(server) as ws:
            linger = b"\1\0\0\0\0\0\0\0"  # on, 0 s: close() sends a reset
            ws.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            ws.socket.close()
        server.wait_idle()
    time.sleep(0.3)
    new = log_text(server).splitlines()[before:]
    assert "Traceback" not in "\n".join(new) and len(new) <= 3, new


def fuzz_messages(rng: random.Random, count: int) -> list:
    """Malformed client messages, each of which must get exactly one ``error``."""
    junk = [None, True, -1, 1.5, 2**64, "", "x" * 300, [], {}, [[["deep"]]], {"a": {"b": 1}}]
    out = []
    for _ in range(count):
        kind = rng.randrange(12)
        if kind == 0:
            out.append(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))))
        elif kind == 1:
            n = rng.randrange(1, 30000)
            out.append(rng.choice("[{") * n + "]" * rng.randrange(n + 1))
        elif kind == 2:
            text = json.dumps({"type": "start", "prompt": "a fox", "seed": 3})
            out.append(text[: rng.randrange(len(text) - 1)])  # truncated
        elif kind == 3:
            out.append(json.dumps({"type": rng.choice(junk[:-2] + ["fly", "START", " start"])}))
        elif kind == 4:
            key = rng.choice(["seed", "total_blocks"])
            out.append(json.dumps({"type": "start", key: rng.choice([-1, 1.5, 2**64, "3", [1],
                                                                     True, {"a": 1}])}))  # fmt: skip
        elif kind == 5:
            out.append(json.dumps({"type": "start", rng.choice(["colour", "Seed", ""]): 1}))
        elif kind == 6:
            out.append(json.dumps({"type": "prompt", "text": rng.choice(junk[:7] + ["   "])}))
        elif kind == 7:
            bad = rng.choice([None, {"a": 1}, float("nan"), "x" * 300, [[[["deep"]]]]])
            out.append(json.dumps({"type": "control", rng.choice(["keys", "yaw"]): bad}))
        elif kind == 8:
            out.append(json.dumps({"type": "control", "": 1}))
        elif kind == 9:
            out.append(rng.choice(["", " ", "null", "42", '"start"', "[1, 2]", "NaN", "\ud800"]))
        elif kind == 10:
            out.append(json.dumps({"type": rng.choice(["pause", "stop", "resume"]), "now": 1}))
        else:
            out.append("x" * rng.randrange(65537, 200000))
    return out


def test_protocol_fuzz_against_a_live_stream(server):
    """A few hundred malformed messages: one ``error`` each, the stream streams on."""
    rng = random.Random(21)
    messages = fuzz_messages(rng, 300)
    deadline = time.monotonic() + 90
    with started(server) as ws:
        for raw in messages:
            if isinstance(raw, str) and "\ud800" in raw:
                raw = raw.encode("utf-8", "surrogatepass")  # not UTF-8: sent as binary
            ws.send(raw)
            error = recv_json(ws, "error")
            assert error["code"] in ERROR_CODES, (raw[:60], error)
            assert time.monotonic() < deadline
        send(ws, type="control", keys=["d"])
        step = recv_json(ws, "step")
        while step["control"] != {"keys": ["d"]}:
            step = recv_json(ws, "step")
        assert len(recv_frames(ws, 12)) == 12
        send(ws, type="stop")
        assert recv_json(ws, "stopped")["reason"] == "client"
    server.wait_idle()
    assert "Traceback" not in log_text(server)


def test_a_port_in_use_is_a_one_line_error_before_the_model_is_built(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        proc = subprocess.run([*SERVE, *TINY, f"serve.port={port}", f"hydra.run.dir={tmp_path}"],
                              capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"flashdreams: error: serve.port={port}: cannot listen"), last
    assert "RANDOM WEIGHTS" not in proc.stdout + proc.stderr  # no model was built


class _FailingEngine:
    """Just enough engine for a ``Stream`` whose session cannot be built."""

    max_sessions, max_session_bytes = 1, 2**40
    executor = None

    def __init__(self, error: Exception) -> None:
        self.error, self.released = error, 0

    def try_acquire(self) -> bool:
        return True

    def release(self) -> None:
        self.released += 1

    def check_session_size(self, total_blocks) -> None:
        pass

    def new_session(self, *args):
        raise self.error


def test_internal_errors_send_a_short_message_and_log_the_details(caplog):
    cfg = OmegaConf.create({"prompt": "a fox", "seed": 0, "fps": 16, "serve": {
        "realtime": False, "lead_s": 1.0, "total_blocks": None, "max_message_bytes": 65536,
        "max_prompt_chars": 100, "jpeg_quality": 80}})  # fmt: skip
    raw = ("CUDA out of memory. Tried to allocate 3.20 GiB. GPU 0 has a total capacity of "
           "79.11 GiB of which 1.2 GiB is free. Of the allocated memory 70 GiB is allocated by "
           "PyTorch, and 2 GiB is reserved but unallocated (PYTORCH_CUDA_ALLOC_CONF)")  # fmt: skip
    engine = _FailingEngine(RuntimeError(raw))

    async def run():
        out = OutQueue(8)
        await Stream(engine, cfg, out).handle(json.dumps({"type": "start"}))
        return json.loads(await out.get())

    error = asyncio.run(run())
    assert error["code"] == "internal" and engine.released == 1
    assert "GiB" not in error["message"] and "allocate" not in error["message"]
    assert len(error["message"]) < 80 and "server log" in error["message"]
    assert "Tried to allocate 3.20 GiB" in caplog.text  # the details are in the log


def test_recursion_in_parse_message_is_bad_json():
    with pytest.raises(protocol.ProtocolError) as err:
        protocol.parse_message("[" * 100_000 + "]" * 100_000, 10**6, 100)
    assert err.value.code == "bad_json"


def first_frames(server, count: int) -> list[bytes]:
    with server.ws() as ws:
        send(ws, type="start", prompt="a fox", seed=7)
        recv_json(ws, "started")
        status = server.status()
        assert status["spare_sessions"] == 0 and status["live_sessions"] == 1, status
        jpegs = [jpeg for _, jpeg in recv_frames(ws, count)]
        send(ws, type="stop")
        recv_json(ws, "stopped")
    return jpegs


def test_a_warm_spare_serves_the_next_start_reset_to_its_seed(server):
    """The default stream starts on a session kept warm (no build); it is reset in full."""
    assert server.wait_idle()["spare_sessions"] == 1
    first = first_frames(server, 21)  # on the spare built at startup
    assert server.wait_idle()["spare_sessions"] == 1  # the ended session is the spare again
    assert first_frames(server, 21) == first  # the same stream: nothing of the last one left
    server.wait_idle()


def test_a_control_frame_for_a_recipe_without_streamed_control_is_one_error(server):
    """An ``FDM1`` frame (HDMap) to a recipe whose control takes none: one ``binary`` error
    naming why, read no further than ``serve.max_message_bytes``; the stream goes on."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buf, format="PNG")
    with started(server) as ws:
        ws.send(protocol.pack_control_frame(buf.getvalue(), 0))
        error = recv_json(ws, "error")
        assert error["code"] == "binary" and "hello.control_frames=0" in error["message"]
        assert "\n" not in error["message"]
        ws.send(protocol.pack_control_frame(b"\0" * 100_000))  # past serve.max_message_bytes
        error = recv_json(ws, "error")
        assert error["code"] == "too_large" and "serve.max_message_bytes=65536" in error["message"]
        before = recv_frames(ws, 1)[0][0].frame
        assert recv_frames(ws, 3)[-1][0].frame > before
        send(ws, type="stop")
        assert recv_json(ws, "stopped")["reason"] == "client"
    assert "Traceback" not in log_text(server)
