"""scripts/bench_serve.py on the tiny demo: generated vs delivered frames/s, time to 1st frame."""

import argparse
import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_serve.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_serve", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_bench_serve_reports_rates_and_time_to_first_frame(tmp_path, capsys):
    bench = load_bench()
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
    bench = load_bench()
    local = {"median_period_ms": 100.0, "delivered_fps": 20.0, "median_time_to_first_frame_s": 1}
    ray = {"median_period_ms": 103.0, "delivered_fps": 16.0, "median_time_to_first_frame_s": None}
    out = bench.compare(local, ray)
    assert out["median_period_ms"] == 1.03 and out["delivered_fps"] == 0.8
    assert out["overhead_per_frame_ms"] == 1000 / 16 - 1000 / 20
    assert out["median_time_to_first_frame_s"] is None


def test_bench_serve_compares_each_session_count_and_prints_a_table():
    bench = load_bench()

    def row(n, fps, step):
        return {"sessions": n, "median_step_ms": step, "delivered_fps_per_session": fps,
                "delivered_fps_total": n * fps, "delivered_over_generated": 0.99,
                "frames_dropped": 0}  # fmt: skip

    local = {"median_step_ms": 300.0, "delivered_fps": 40.0, "delivered_over_generated": 1.0,
             "median_time_to_first_frame_s": 0.5, "frames_dropped": 0,
             "concurrent": [row(1, 40.0, 300.0), row(4, 10.0, 1200.0)]}  # fmt: skip
    ray = {**local, "median_step_ms": 309.0, "delivered_fps": 25.0,
           "concurrent": [row(1, 25.0, 309.0), row(2, 20.0, 600.0), row(4, 8.0, 1236.0)]}  # fmt: skip
    out = bench.compare(local, ray)
    assert out["median_step_ms"] == pytest.approx(1.03)
    assert [c["sessions"] for c in out["concurrent"]] == [1, 4]  # 2: local did not run it
    four = out["concurrent"][1]
    assert four["overhead_per_frame_ms"] == pytest.approx(1000 / 8 - 1000 / 10)
    assert four["median_step_ms"] == pytest.approx(1.03)
    assert four["delivered_fps_total"] == pytest.approx(0.8)
    text = bench.table({"local": local, "ray": ray}, out)
    assert "| ray | 2 | 600.0 | 20.0 | 40.0 | 0.990 | 0 |" in text
    assert "| 4 | 1.030 | 0.800 | 25.00 |" in text
    assert "ray: median time to first frame (warm server) 0.500 s" in text


@pytest.mark.parametrize("text", ["0,2", "1,1", "a", ""])
def test_bench_serve_rejects_bad_session_counts(text):
    with pytest.raises(argparse.ArgumentTypeError, match=f"--sessions={text} must be"):
        load_bench().session_counts(text)


def test_bench_serve_pools_serialized_streams_against_what_the_device_made():
    # two streams the server steps in turn: each block of 12 takes 100 ms of device time, so a
    # stream receives 12 frames every 200 ms (60 fps) and the device makes 120 fps
    run = {"frames": [9, 12, 12, 12, 12], "periods": [100.0] * 5, "steps_ms": [90.0] * 5,
           "arrivals": [i / 60 for i in range(57)], "dropped": 0}  # fmt: skip
    out = load_bench().pooled([run, {**run, "dropped": 2}])
    assert out["generated_fps"] == pytest.approx(120.0)
    assert out["delivered_fps_per_session"] == pytest.approx(60.0)
    assert out["delivered_over_generated"] == pytest.approx(1.0)
    assert (out["sessions"], out["frames_dropped"], out["median_step_ms"]) == (2, 2, 90.0)


def test_bench_serve_keeps_the_local_run_when_the_ray_server_fails(tmp_path, capsys):
    bench = load_bench()
    local = {"median_step_ms": 300.0, "delivered_fps": 40.0, "delivered_over_generated": 1.0,
             "median_time_to_first_frame_s": 0.5, "frames_dropped": 0}  # fmt: skip

    def fake(args, overrides):
        if "serve.backend=ray" in overrides:
            raise SystemExit("server did not start:\nModuleNotFoundError: No module named 'ray'")
        return local

    bench.bench = fake
    out = tmp_path / "both.json"
    assert bench.main(["--backend", "both", "--out", str(out), "device=cpu"]) == 1
    result = json.loads(out.read_text())
    assert result["local"] == local and "ray_over_local" not in result
    assert "No module named 'ray'" in result["ray"]["error"]
    err = capsys.readouterr().err
    assert "| local | 1 | 300.0 | 40.0 | 40.0 | 1.000 | 0 |" in err
    assert "ray backend failed: server did not start" in err
