"""Serving benchmark: frames/s generated vs delivered, and time to the first frame.

Starts ``flashdreams-serve`` as a subprocess on a free loopback port (``serve.realtime=false``,
so it generates as fast as it can), connects one WebSocket client, and runs:

1. a warm-up stream (``--warmup-blocks`` blocks: compilation, graph capture, allocator);
2. ``--starts`` starts of the server's default stream (what the web page sends) on the warm
   server, timing ``start`` -> first frame, each stopped after it;
3. one endless stream for ``--seconds``, reading every frame as it arrives.

4. with ``--sessions 1,2,4``: that many concurrent endless streams on one replica for
   ``--seconds`` each (throughput with several sessions per replica; count 1 is stream 3).

Generated frames/s is the step's frames over its block period (the ``step`` messages'
``period_ms``, device time: what the model makes); delivered frames/s is what the client
receives per second of wall clock over the steady part of the stream. The JSON (stdout, and
``--out``) holds both, their ratio, the per-start times to the first frame and the frames the
server dropped for this client. ``--backend ray`` measures the same through Ray Serve (one
generator replica, ``serve.backend=ray``); ``--backend both`` runs local then ray and adds
``ray_over_local``: the ratios of step latency and delivered frames/s and the overhead per
frame in ms (the Ray backend's per-frame delivery period minus the local one's), for the one
stream and per session count. A Markdown table of the same numbers goes to stderr.

Issue 27's measurement on one GPU (both backends, 1 / 2 / 4 sessions, ~5 min on an H200)::

    python scripts/bench_serve.py --backend both --sessions 1,2,4 --seconds 15 --starts 2 \\
        --warmup-blocks 2 --out serve_local_vs_ray.json -- \\
        recipe=self_forcing_wan21_t2v_1_3b_taehv model.checkpoint=null text_encoder=random \\
        vae.checkpoint=null device=cuda

Examples::

    python scripts/bench_serve.py -- recipe=demo device=cpu rollout.height=64 rollout.width=64
    python scripts/bench_serve.py --backend both --sessions 1,2,4 -- recipe=demo device=cpu
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
from concurrent.futures import ThreadPoolExecutor
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
    arrivals, periods, frames_per_step, dropped, steps_ms = [], [], [], 0, []
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
                steps_ms.append(data["step_ms"])
                frames_per_step.append(data["frames"])
            elif data["type"] == "stopped":
                return {"arrivals": arrivals, "periods": periods, "frames": frames_per_step,
                        "dropped": dropped, "stopped": data, "steps_ms": steps_ms}  # fmt: skip
        if t_end is None and arrivals:
            t_end = arrivals[0] + seconds
        if t_end is not None and now >= t_end:
            ws.send(json.dumps({"type": "stop"}))
            t_end = float("inf")


def rates(run: dict) -> tuple[float | None, float | None]:
    """Generated and delivered frames/s of one stream's steady part (from its step 2 / its
    second block on): the steps' frames over their periods, the client's arrivals over wall
    clock."""
    arrivals, periods, frames = run["arrivals"], run["periods"], run["frames"]
    steady_p = periods[2:] or periods  # steps 0-1 warm the stream's own buffers
    steady_f = frames[2:] or frames
    generated = sum(steady_f) / (sum(steady_p) / 1000.0) if steady_p and sum(steady_p) else None
    skip = min(len(arrivals) - 2, frames[0] if frames else 0)  # from the second block on
    span = arrivals[-1] - arrivals[skip] if len(arrivals) > skip + 1 else 0.0
    delivered = (len(arrivals) - 1 - skip) / span if span > 0 else None
    return generated, delivered


def summarize(run: dict, hello: dict, ttff: list[float]) -> dict:
    periods = run["periods"]
    steady_p = periods[2:] or periods
    generated, delivered = rates(run)
    return {
        "run_name": hello["run_name"], "height": hello["height"], "width": hello["width"],
        "fps": hello["fps"], "frames_per_block": hello["frames_per_block"],
        "batch_size": hello["batch_size"], "steps": len(periods),
        "frames_received": len(run["arrivals"]), "frames_dropped": run["dropped"],
        "median_period_ms": statistics.median(steady_p) if steady_p else None,
        "median_step_ms": statistics.median(run["steps_ms"][2:] or run["steps_ms"] or [0.0]),
        "generated_fps": generated, "delivered_fps": delivered,
        "delivered_over_generated": delivered / generated if generated and delivered else None,
        "time_to_first_frame_s": ttff,
        "median_time_to_first_frame_s": statistics.median(ttff) if ttff else None,
    }  # fmt: skip


def concurrent(port: int, sessions: int, seconds: float) -> dict:
    """``sessions`` endless streams at once for ``seconds``: frames/s summed over them."""

    def one(_) -> dict:
        with connect(f"ws://127.0.0.1:{port}/ws", max_size=None, open_timeout=60) as ws:
            json.loads(ws.recv(timeout=60))
            return endless(ws, seconds)

    with ThreadPoolExecutor(sessions) as pool:
        return pooled(list(pool.map(one, range(sessions))))


def pooled(runs: list[dict]) -> dict:
    """Streams that ran at once: delivered frames/s summed and per stream, medians over all
    their steady steps. The server steps one stream at a time (one device thread), so what it
    generates is all steady frames over all steady periods; delivered / generated compares the
    summed delivery with that."""
    delivered, frames, periods, steps = [], 0, [], []
    for run in runs:
        delivered.append(rates(run)[1] or 0.0)
        frames += sum(run["frames"][2:] or run["frames"])
        periods += run["periods"][2:] or run["periods"]
        steps += run["steps_ms"][2:]
    generated = frames / (sum(periods) / 1000.0) if sum(periods) else None
    return {
        "sessions": len(runs), "delivered_fps_total": sum(delivered),
        "delivered_fps_per_session": statistics.mean(delivered), "generated_fps": generated,
        "delivered_over_generated": sum(delivered) / generated if generated else None,
        "median_period_ms": statistics.median(periods) if periods else None,
        "median_step_ms": statistics.median(steps) if steps else None,
        "frames_dropped": sum(run["dropped"] for run in runs),
    }  # fmt: skip


def bench(args, overrides: list[str]) -> dict:
    """One server (its backend named in ``overrides``): warm-up, starts, one stream, sessions.
    The one stream also stands for ``--sessions``' count 1 (the same stream on a warm server)."""
    ray = "serve.backend=ray" in overrides
    sessions = args.sessions or [1]
    extra = [f"serve.max_sessions={max(sessions)}"]
    if ray:
        extra += ["serve.replicas=1"]
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        proc, port = start_server([*overrides, *extra], Path(tmp), args.start_timeout)
        try:
            with connect(f"ws://127.0.0.1:{port}/ws", max_size=None, open_timeout=60) as ws:
                hello = json.loads(ws.recv(timeout=60))
                time_to_first_frame(ws, args.warmup_blocks)  # warm the server
                ttff = [time_to_first_frame(ws) for _ in range(args.starts)]
                one = endless(ws, args.seconds)
                result = summarize(one, hello, ttff)
            if args.sessions:
                result["concurrent"] = [
                    pooled([one]) if n == 1 else concurrent(port, n, args.seconds)
                    for n in sessions
                ]  # fmt: skip
        finally:
            proc.terminate()
            proc.wait(timeout=120)
    result["backend"] = "ray" if ray else "local"
    result["overrides"] = overrides
    return result


def per_frame_ms(local_fps: float | None, ray_fps: float | None) -> float | None:
    """Ray's delivery period per frame minus the local one's (ms)."""
    return 1000.0 / ray_fps - 1000.0 / local_fps if local_fps and ray_fps else None


def compare(local: dict, ray: dict) -> dict:
    """Ray over local: step latency and delivery ratios, the overhead per frame (ms), for the
    one stream and for each count of concurrent sessions both ran."""

    def ratio(a: dict, b: dict, key: str):
        return b[key] / a[key] if a.get(key) and b.get(key) else None

    out = {
        "median_step_ms": ratio(local, ray, "median_step_ms"),
        "median_period_ms": ratio(local, ray, "median_period_ms"),
        "delivered_fps": ratio(local, ray, "delivered_fps"),
        "median_time_to_first_frame_s": ratio(local, ray, "median_time_to_first_frame_s"),
        "overhead_per_frame_ms": per_frame_ms(local.get("delivered_fps"), ray.get("delivered_fps")),
    }  # fmt: skip
    by_count = {c["sessions"]: c for c in local.get("concurrent", [])}
    sessions = []
    for r in ray.get("concurrent", []):
        lo = by_count.get(r["sessions"])
        if lo is not None:
            sessions.append({
                "sessions": r["sessions"], "median_step_ms": ratio(lo, r, "median_step_ms"),
                "delivered_fps_per_session": ratio(lo, r, "delivered_fps_per_session"),
                "delivered_fps_total": ratio(lo, r, "delivered_fps_total"),
                "overhead_per_frame_ms": per_frame_ms(lo["delivered_fps_per_session"],
                                                      r["delivered_fps_per_session"]),
            })  # fmt: skip
    if sessions:
        out["concurrent"] = sessions
    return out


def _cell(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(results: dict[str, dict], ratios: dict | None) -> str:
    """The JSON's numbers as Markdown: per backend and session count, per-stream step latency,
    delivered frames/s, delivered (all streams) / generated; with both backends, Ray over
    local."""
    header = ("| backend | sessions | step ms (median, per stream) | delivered fps per stream "
              "| delivered fps total | delivered total / generated | dropped |")  # fmt: skip
    lines = [header, "|---" * 7 + "|"]
    for name, res in results.items():
        rows = res.get("concurrent") or [pooled_row(res)]
        for c in rows:
            lines.append(
                f"| {name} | {c['sessions']} | {_cell(c['median_step_ms'])} | "
                f"{_cell(c['delivered_fps_per_session'])} | {_cell(c['delivered_fps_total'])} | "
                f"{_cell(c['delivered_over_generated'], 3)} | {c['frames_dropped']} |"
            )
    lines.append("")
    for name, res in results.items():
        ttff = _cell(res["median_time_to_first_frame_s"], 3)
        lines.append(f"{name}: median time to first frame (warm server) {ttff} s")
    if ratios:
        lines += ["", "| sessions | step ms, ray / local | delivered fps per stream, ray / local "
                  "| overhead per frame (ms, ray - local) |", "|---" * 4 + "|"]  # fmt: skip
        one = {"sessions": 1, "delivered_fps_per_session": ratios["delivered_fps"], **ratios}
        for c in ratios.get("concurrent") or [one]:
            lines.append(f"| {c['sessions']} | {_cell(c['median_step_ms'], 3)} | "
                         f"{_cell(c['delivered_fps_per_session'], 3)} | "
                         f"{_cell(c['overhead_per_frame_ms'], 2)} |")  # fmt: skip
    return "\n".join(lines)


def pooled_row(res: dict) -> dict:
    """The one-stream summary in the shape of a ``concurrent`` row."""
    return {"sessions": 1, "median_step_ms": res["median_step_ms"],
            "delivered_fps_per_session": res["delivered_fps"],
            "delivered_fps_total": res["delivered_fps"],
            "delivered_over_generated": res["delivered_over_generated"],
            "frames_dropped": res["frames_dropped"]}  # fmt: skip


def session_counts(text: str) -> list[int]:
    """``--sessions 1,2,4``: distinct counts >= 1."""
    try:
        counts = [int(n) for n in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1 or len(set(counts)) != len(counts):
        raise argparse.ArgumentTypeError(
            f"--sessions={text} must be distinct counts >= 1, e.g. 1,2,4"
        )
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="endless stream length")
    parser.add_argument("--starts", type=int, default=3, help="warm starts timed to 1st frame")
    parser.add_argument("--warmup-blocks", type=int, default=3)
    parser.add_argument("--start-timeout", type=float, default=1800.0, help="server load (s)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument(
        "--backend",
        choices=("local", "ray", "both"),
        default="local",
        help="serve.backend to measure (both: local, then ray, compared)",
    )
    parser.add_argument(
        "--sessions",
        type=session_counts,
        default=None,
        help="concurrent sessions per replica, e.g. 1,2,4",
    )
    parser.add_argument("overrides", nargs="*", help="flashdreams-serve overrides (after --)")
    args = parser.parse_args(argv)
    backends = ["local", "ray"] if args.backend == "both" else [args.backend]
    results, failed = {}, {}
    for b in backends:
        try:
            results[b] = bench(
                args, [*args.overrides, *(["serve.backend=ray"] if b == "ray" else [])]
            )
        except SystemExit as exc:  # its server failed (start, error): keep the other run
            if len(backends) == 1:
                raise
            failed[b] = str(exc)
        if args.out and b != backends[-1]:  # a time limit keeps the finished backend's run
            args.out.write_text(json.dumps({**results, "partial": True}, indent=1) + "\n")
    if len(backends) == 1:
        result = results[backends[0]]
    elif failed:
        result = {**results, **{b: {"backend": b, "error": e} for b, e in failed.items()}}
    else:
        result = {**results, "ray_over_local": compare(results["local"], results["ray"])}
    text = json.dumps(result, indent=1)
    print(text)
    print(table(results, result.get("ray_over_local")), file=sys.stderr)
    for b, e in failed.items():
        print(f"{b} backend failed: {e[-2000:]}", file=sys.stderr)
    if args.out:
        args.out.write_text(text + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
