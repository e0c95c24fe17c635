"""Tests of the sweep report: collect rows, print a table, write csv and png, CLI errors."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from flashdreams.io.plot import median_over_steady_steps, plot_latency
from flashdreams.report import collect, main, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _stats(step_ms: float, status: str = "completed") -> dict:
    """A small stats.json payload with 4 steps whose steady steps take ``step_ms``."""
    steps = []
    for i in range(4):
        diffuse = step_ms - 5.0 + (20.0 if i < 2 else 0.0)  # steps 0 and 1 are slow warm-up
        step = {"step": i, "encode_ms": 1.0, "diffuse_ms": diffuse, "decode_ms": 4.0}
        step |= {"commit_ms": 7.5, "step_ms": diffuse + 5.0, "period_ms": diffuse + 12.5}
        steps.append(step | {"num_frames": 9})
    summary = {"num_steps": 4, "median_step_ms": step_ms, "median_period_ms": step_ms + 7.5}
    summary |= {"warmup_s": 0.4, "peak_memory_bytes": 3 * 2**20, "fps": 210.0, "total_s": 0.9}
    return {"run_name": "demo", "status": status, "config_hash": "abc", "device": "cpu",
            "dtype": "bfloat16", "steps": steps, "summary": summary}  # fmt: skip


def _job(sweep: Path, num: int, overrides: list[str], stats: dict) -> Path:
    """Write a Hydra-like multirun job dir: .hydra/overrides.yaml, .hydra/config.yaml, stats."""
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (job / ".hydra" / "config.yaml").write_text("run_name: demo\n")
    (job / "stats.json").write_text(json.dumps(stats))
    return job


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    sweep = tmp_path / "sweeps" / "demo" / "2025-01-01_00-00-00"
    _job(sweep, 0, ["cache=full", "graph=eager"], _stats(35.0))
    _job(sweep, 1, ["cache=rolling", "graph=cuda_graph"], _stats(20.0, status="interrupted"))
    return sweep


def test_collect_rows(sweep: Path) -> None:
    rows = collect(sweep)
    assert [row["job"] for row in rows] == ["0", "1"]
    assert rows[0]["overrides"] == "cache=full graph=eager"
    assert rows[1]["overrides"] == "cache=rolling graph=cuda_graph"
    assert rows[0]["median_step_ms"] == 35.0 and rows[0]["median_period_ms"] == 42.5
    assert rows[1]["median_step_ms"] == 20.0 and rows[1]["status"] == "interrupted"
    assert rows[0]["peak_memory_mb"] == pytest.approx(3.0)
    assert rows[0]["cache_hit_pct"] is None  # no step cache


def test_step_cache_hit_rate_column(tmp_path: Path) -> None:
    stats = _stats(30.0)
    stats["summary"]["step_cache_hit_rate"] = 0.25  # written by step_cache=dbcache runs
    _job(tmp_path, 0, ["step_cache=dbcache"], stats)
    assert collect(tmp_path)[0]["cache_hit_pct"] == pytest.approx(25.0)


def test_collect_natural_order_and_bad_stats(tmp_path: Path) -> None:
    for num in (10, 2):
        _job(tmp_path, num, [f"seed={num}"], _stats(30.0))
    (tmp_path / "3").mkdir()
    (tmp_path / "3" / "stats.json").write_text("{not json")  # e.g. killed while writing
    rows = collect(tmp_path)
    assert [row["job"] for row in rows] == ["2", "3", "10"]
    assert rows[1]["status"] == "unreadable" and rows[1]["median_step_ms"] is None


def test_write_report(sweep: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv_path = write_report(sweep)
    assert csv_path == sweep / "report.csv"
    with csv_path.open() as file:
        rows = list(csv.DictReader(file))
    assert [row["overrides"] for row in rows] == [
        "cache=full graph=eager",
        "cache=rolling graph=cuda_graph",
    ]
    assert [float(row["median_step_ms"]) for row in rows] == [35.0, 20.0]
    assert [float(row["median_period_ms"]) for row in rows] == [42.5, 27.5]
    assert [row["status"] for row in rows] == ["completed", "interrupted"]
    assert (sweep / "report.png").read_bytes().startswith(PNG_MAGIC)
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["job", "overrides", "median_step_ms", "median_period_ms",
                                "peak_memory_mb", "cache_hit_pct", "status"]  # fmt: skip
    assert "cache=rolling graph=cuda_graph" in table[3] and "20.0" in table[3]
    col = table[0].index("status")  # columns are aligned
    assert table[2][col:] == "completed" and table[3][col:] == "interrupted"


def test_main_ok(sweep: Path) -> None:
    assert main([str(sweep)]) == 0
    assert (sweep / "report.csv").is_file()


def test_main_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "missing")]) == 2
    assert main([str(tmp_path)]) == 2  # exists but holds no stats.json
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("flashdreams-report: error:") for line in err)


def test_cli_bad_dir_exit_status(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "flashdreams.report", str(tmp_path / "missing")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_plot_latency(tmp_path: Path) -> None:
    path = plot_latency(_stats(30.0), tmp_path / "plots" / "latency.png")
    assert path.read_bytes().startswith(PNG_MAGIC)
    stats = _stats(30.0)
    del stats["summary"]  # medians are then computed from the steps
    assert plot_latency(stats, tmp_path / "no_summary.png").is_file()
    two_clips = stats["steps"] + [dict(step, clip=1, commit_ms=None) for step in stats["steps"]]
    assert plot_latency({"steps": two_clips}, tmp_path / "clips.png").is_file()


def test_median_over_steady_steps() -> None:
    assert median_over_steady_steps([100.0, 90.0, 10.0, 12.0, 11.0]) == 11.0
    assert median_over_steady_steps([100.0, 10.0]) == 55.0
    assert median_over_steady_steps([]) is None
