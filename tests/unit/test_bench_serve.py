"""scripts/bench_serve.py on the tiny demo: generated vs delivered frames/s, time to 1st frame."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_serve.py"


def test_bench_serve_reports_rates_and_time_to_first_frame(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_serve", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "serve.json"
    assert bench.main(["--seconds", "1", "--starts", "2", "--warmup-blocks", "1",
                       "--out", str(out), "device=cpu", "rollout.height=32",
                       "rollout.width=32"]) == 0  # fmt: skip
    result = json.loads(out.read_text())
    assert result == json.loads(capsys.readouterr().out)
    assert (result["height"], result["width"], result["frames_per_block"]) == (32, 32, 3)
    assert result["generated_fps"] > 0 and result["delivered_fps"] > 0
    assert result["frames_received"] > 9 and result["frames_dropped"] == 0
    assert len(result["time_to_first_frame_s"]) == 2
    assert 0 < result["median_time_to_first_frame_s"] < 30


def test_bench_serve_compares_backends_per_frame():
    spec = importlib.util.spec_from_file_location("bench_serve", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    local = {"median_period_ms": 100.0, "delivered_fps": 20.0, "median_time_to_first_frame_s": 1}
    ray = {"median_period_ms": 103.0, "delivered_fps": 16.0, "median_time_to_first_frame_s": None}
    out = bench.compare(local, ray)
    assert out["median_period_ms"] == 1.03 and out["delivered_fps"] == 0.8
    assert out["overhead_per_frame_ms"] == 1000 / 16 - 1000 / 20
    assert out["median_time_to_first_frame_s"] is None
