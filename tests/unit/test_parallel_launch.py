"""``torchrun -m flashdreams.cli`` on CPU (gloo, 2 ranks): one output dir, rank-named failures.

A failing rank (an exception) or a stuck rank (past ``parallel.timeout_s``) must end the whole
job within a bounded time with a line naming a rank, never hang.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ["device=cpu", "rollout.height=32", "rollout.width=32", "rollout.total_blocks=2"]

# Runs the real CLI; rank 1 raises (or stalls) at the start of AR step 1.
DRIVER = """
import os, time
from flashdreams import rollout

step = rollout.Rollout.step

def failing_step(self, sync=False):
    if self.step_index == 1 and os.environ["RANK"] == "1":
        if os.environ["FD_FAIL"] == "raise":
            raise RuntimeError("injected failure")
        time.sleep(600)
    return step(self, sync)

rollout.Rollout.step = failing_step
from flashdreams.cli import run_main

run_main()
"""


def torchrun(args: list[str], tmp_path: Path, env: dict | None = None, limit: float = 120):
    """Run ``torchrun --nproc_per_node=2 args`` in the repo root; (returncode, output, seconds)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           *args, f"paths.root={tmp_path / 'out'}"]  # fmt: skip
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=limit)  # fmt: skip
    return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - start


def test_ranks_share_one_output_dir_and_only_rank_0_writes(tmp_path):
    rc, out, _ = torchrun(["-m", "flashdreams.cli", *TINY, "parallel=ring"], tmp_path)
    assert rc == 0, out
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["runs"]  # no stray rank dir
    (run_dir,) = (tmp_path / "out" / "runs" / "demo").iterdir()
    assert {"video.mp4", "stats.json", "config.yaml"} <= {p.name for p in run_dir.iterdir()}
    stats = json.loads((run_dir / "stats.json").read_text())
    assert stats["parallel"] == "ring x2" and stats["status"] == "completed"
    assert out.count("median step latency") == 1  # the summary is printed by rank 0 only


@pytest.mark.parametrize("mode", ["raise", "hang"])
def test_a_failing_rank_ends_the_job_naming_a_rank(tmp_path, mode):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    args = [str(driver), *TINY, "vae=none", "parallel=ulysses", "parallel.timeout_s=3"]
    rc, out, seconds = torchrun(args, tmp_path, env={"FD_FAIL": mode})
    assert rc != 0
    assert seconds < 60, f"the job took {seconds:.0f} s to end"
    if mode == "raise":  # the failing rank names itself; torchrun names it as root cause
        assert "flashdreams: error: rank 1/2: RuntimeError: injected failure" in out, out
    else:  # rank 0 gives up after parallel.timeout_s, naming itself; rank 1 is then stopped
        assert "flashdreams: error: rank 0/2: RuntimeError:" in out, out
        assert "Timed out" in out, out
