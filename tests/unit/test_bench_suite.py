"""scripts/bench_suite.py: every command composes; a tiny run collects the DESIGN.md metrics."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
SUITE = ROOT / "scripts" / "bench_suite.py"


def _suite(*args, timeout=600):
    return subprocess.run([sys.executable, str(SUITE), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def test_list_names_every_run_with_its_command():
    proc = _suite("--list", "--set", "all")
    assert proc.returncode == 0, proc.stderr
    for name in ("sf_bf16", "sf_fp8", "wan21_i2v_14b", "causal_wan22", "lingbot_w63", "cp_14b"):
        assert name in proc.stdout
    assert "recipe=self_forcing_wan21_t2v_1_3b_taehv" in proc.stdout


def test_unknown_run_is_one_line_error():
    proc = _suite("--only", "sf_bogus", "--out", "unused")
    assert proc.returncode == 2 and "unknown run(s) sf_bogus" in proc.stderr


def test_tiny_suite_records_the_metrics(tmp_path):
    out = tmp_path / "suite"
    runs = ["sf_bf16", "lingbot_w15", "cp_14b"]
    if not torch.cuda.is_available():  # on a GPU machine tests/gpu would really run: not here
        runs.append("gpu_tests")
    proc = _suite("--tiny", "--only", ",".join(runs), "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    suite = json.loads((out / "suite.json").read_text())
    assert set(suite) == set(runs)
    if "gpu_tests" in suite:
        assert "skipped" in suite["gpu_tests"]["summary"]["result"]  # every GPU test skips
    for name in ("sf_bf16", "lingbot_w15"):
        assert suite[name]["rc"] == 0, suite[name]
        summary = suite[name]["summary"]
        assert summary["num_steps"] == 3 and summary["median_step_ms"] > 0
        assert (out / name / "stats.json").is_file() and (out / name / "bench.json").is_file()
    policies = suite["cp_14b"]["summary"]
    assert set(policies) == {"single", "ulysses", "ring"}
    assert policies["ring"]["rel_l2_vs_single"] <= 1e-5
