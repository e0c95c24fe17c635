"""Serving benchmark: frames/s generated vs delivered, and time to the first frame.

Starts ``flashdreams-serve`` as a subprocess on a free loopback port (``serve.realtime=false``,
so it generates as fast as it can), connects one WebSocket client, and runs:

1. a warm-up stream (``--warmup-blocks`` blocks: compilation, graph capture, allocator);
2. ``--starts`` starts of the server's default stream (what the web page sends) on the warm
   server, timing ``start`` -> first frame, each stopped after it;
3. one endless stream for ``--seconds``, reading every frame as it arrives.

Generated frames/s is the step's frames over its block period (the ``step`` messages'
``period_ms``, device time: what the model makes); delivered frames/s is what the client
receives per second of wall clock over the steady part of the stream. The JSON (stdout, and
``--out``) holds both, their ratio, the per-start times to the first frame and the frames the
server dropped for this client.

Examples::

    python scripts/bench_serve.py -- recipe=demo device=cpu rollout.height=64 rollout.width=64
    python scripts/bench_serve.py --seconds 30 --out benchmarks/serve_h200.json -- \\
        recipe=self_forcing_wan21_t2v_1_3b_taehv model.checkpoint=null text_encoder=random \\
        vae.checkpoint=null device=cuda
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from websockets.sync.client import connect

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flashdreams.serve.protocol import unpack_frame  # noqa: E402


def start_server(overrides: list[str], tmp: Path, timeout: float) -> tuple[subprocess.Popen, int]:
    """``flashdreams-serve`` on a free port; returns the process and its port."""
    port_file = tmp / "port"
    args = [sys.executable, "-m", "flashdreams.serve.cli", *overrides, "serve.port=0",
            f"serve.port_file={port_file}", "serve.realtime=false", "serve.queue_frames=4096",
            f"hydra.run.dir={tmp / 'run'}"]  # fmt: skip
    log = open(tmp / "server.log", "w")  # noqa: SIM115  (closed with the process)
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    deadline = time.monotonic() + timeout
    while not port_file.is_file() or not port_file.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("server did not start:\n" + (tmp / "server.log").read_text()[-4000:])
        time.sleep(0.1)
    return proc, int(port_file.read_text())


def recv_until(ws, kind: str, timeout: float = 600.0) -> dict:
    """Read (and drop) messages until a JSON message of ``kind``."""
    deadline = time.monotonic() + timeout
    while True:
        msg = ws.recv(timeout=max(0.01, deadline - time.monotonic()))
        if isinstance(msg, str):
            data = json.loads(msg)
            if data["type"] == kind:
                return data
            if data["type"] == "error" and data["code"] != "no_session":  # a stop after the end
                raise SystemExit(f"server error: {data}")


def time_to_first_frame(ws, blocks: int | None = None) -> float:
    """Seconds from sending ``start`` to the first frame (``blocks`` None: the server's default
    stream, as the web page starts it, then stopped; else read to its end)."""
    start = {"type": "start"} if blocks is None else {"type": "start", "total_blocks": blocks}
    t0 = time.perf_counter()
    ws.send(json.dumps(start))
    while not isinstance(ws.recv(timeout=600), bytes):
        pass
    ttff = time.perf_counter() - t0
    if blocks is None:  # (a finite default that ends first answers the stop with no_session)
        ws.send(json.dumps({"type": "stop"}))
    recv_until(ws, "stopped")
    return ttff


def endless(ws, seconds: float) -> dict:
    """One endless stream for ``seconds``: arrival times, step periods, drops."""
    ws.send(json.dumps({"type": "start", "total_blocks": None}))
    arrivals, periods, frames_per_step, dropped = [], [], [], 0
    t_end = None
    while True:
        msg = ws.recv(timeout=600)
        now = time.perf_counter()
        if isinstance(msg, bytes):
            info, _ = unpack_frame(msg)
            if info.batch_index == 0:
                arrivals.append(now)
            dropped = info.dropped
        else:
            data = json.loads(msg)
            if data["type"] == "step" and data["frames"]:
                periods.append(data["period_ms"])
                frames_per_step.append(data["frames"])
            elif data["type"] == "stopped":
                return {"arrivals": arrivals, "periods": periods, "frames": frames_per_step,
                        "dropped": dropped, "stopped": data}  # fmt: skip
        if t_end is None and arrivals:
            t_end = arrivals[0] + seconds
        if t_end is not None and now >= t_end:
            ws.send(json.dumps({"type": "stop"}))
            t_end = float("inf")


def summarize(run: dict, hello: dict, ttff: list[float]) -> dict:
    arrivals, periods, frames = run["arrivals"], run["periods"], run["frames"]
    steady_p = periods[2:] or periods  # steps 0-1 warm the stream's own buffers
    steady_f = frames[2:] or frames
    generated = sum(steady_f) / (sum(steady_p) / 1000.0) if steady_p else None
    skip = min(len(arrivals) - 2, frames[0] if frames else 0)  # from the second block on
    span = arrivals[-1] - arrivals[skip] if len(arrivals) > skip + 1 else 0.0
    delivered = (len(arrivals) - 1 - skip) / span if span > 0 else None
    return {
        "run_name": hello["run_name"], "height": hello["height"], "width": hello["width"],
        "fps": hello["fps"], "frames_per_block": hello["frames_per_block"],
        "batch_size": hello["batch_size"], "steps": len(periods),
        "frames_received": len(arrivals), "frames_dropped": run["dropped"],
        "median_period_ms": statistics.median(steady_p) if steady_p else None,
        "generated_fps": generated, "delivered_fps": delivered,
        "delivered_over_generated": delivered / generated if generated and delivered else None,
        "time_to_first_frame_s": ttff,
        "median_time_to_first_frame_s": statistics.median(ttff) if ttff else None,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="endless stream length")
    parser.add_argument("--starts", type=int, default=3, help="warm starts timed to 1st frame")
    parser.add_argument("--warmup-blocks", type=int, default=3)
    parser.add_argument("--start-timeout", type=float, default=1800.0, help="server load (s)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("overrides", nargs="*", help="flashdreams-serve overrides (after --)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        proc, port = start_server(args.overrides, Path(tmp), args.start_timeout)
        try:
            with connect(f"ws://127.0.0.1:{port}/ws", max_size=None, open_timeout=60) as ws:
                hello = json.loads(ws.recv(timeout=60))
                time_to_first_frame(ws, args.warmup_blocks)  # warm the server
                ttff = [time_to_first_frame(ws) for _ in range(args.starts)]
                result = summarize(endless(ws, args.seconds), hello, ttff)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    result["overrides"] = args.overrides
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
