"""The CLI under careless input: misspelled keys, bad values, Ctrl-C, honest labels (issue 21)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from flashdreams.report import collect
from tests.unit.test_cli import RUN, _run

TINY = ["rollout.height=32", "rollout.width=32", "device=cpu"]


def _one_line_error(proc) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("flashdreams: error: "), lines
    return lines[-1].removeprefix("flashdreams: error: ")


@pytest.mark.parametrize(
    "args,expected",
    [
        (["rollout.totl_blocks=3"], "rollout.totl_blocks: unknown key; closest: rollout.total_blocks"),
        (["+rollout.totl_blocks=3"], "+rollout.totl_blocks: unknown key; closest: rollout.total_blocks"),
        (["sed=3"], "sed: unknown key; closest: seed"),
        (["recipe=self_forcing_wan21_t2v_1_3b", "vae.chekpoint=x"], "vae.chekpoint: unknown key; closest: vae.checkpoint"),
        (["-m", "cache.windw_frames=3,6"], "cache.windw_frames: unknown key; closest: cache.window_frames"),
    ],
)  # fmt: skip
def test_misspelled_key_is_one_line_naming_the_closest_keys(tmp_path, args, expected):
    line = _one_line_error(_run(args, tmp_path, check=False))
    assert line.startswith(expected), line
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize(
    "args,expected",
    [
        (["fps=0"], "fps=0 must be a frame rate in (0, 1000]"),
        (["rollout.batch_size=0"], "rollout.batch_size=0 must be an integer >= 1"),
        (["seed=18446744073709551616"], "seed=18446744073709551616 must be an integer in [0, 2**63)"),
        (["seed=-1"], "seed=-1 must be an integer in [0, 2**63)"),
        (["prompt_file=/does/not/exist"], "prompt_file='/does/not/exist' does not exist"),
        (["model.checkpoint=/no/dit.pt"], "model.checkpoint='/no/dit.pt': no such file or directory"),
        (["cache.window_frames=1"], "cache.window_frames=1 is smaller than one block (3 latent frames); use cache.window_frames>=3"),
        (["graph=compile", "++graph.inductor.triton.multi_kernal=1"], "graph.inductor.triton.multi_kernal: not an Inductor option (see torch._inductor.config)"),
    ],
)  # fmt: skip
def test_bad_values_are_one_line_and_leave_no_run_dir(tmp_path, args, expected):
    line = _one_line_error(_run([*TINY, *args], tmp_path, check=False))
    assert line == expected
    assert not list(tmp_path.glob("outputs/runs/*/*")), "an empty run dir was left behind"


@pytest.mark.parametrize("delay", [0.5, 1.5, 4.0])  # importing, building, stepping
def test_ctrl_c_while_starting_is_one_line(tmp_path, delay):
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([*RUN, *TINY, "rollout.total_blocks=500"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-2000:]
    assert proc.returncode == 130, err
    lines = [line for line in err.replace("\r", "\n").splitlines() if "flashdreams: error" in line]
    assert len(lines) == 1 and lines[0].startswith("flashdreams: error: interrupted"), err


def test_short_run_labels_tell_the_truth_and_multirun_says_where(tmp_path):
    proc = _run(["-m", *TINY, "rollout.total_blocks=2", "seed=0"], tmp_path)  # a one-job sweep
    sweeps = list(tmp_path.glob("outputs/sweeps/demo/*"))
    assert len(sweeps) == 1
    assert f"sweep written to {sweeps[0]}" in proc.stderr
    stats = json.loads((sweeps[0] / "0" / "stats.json").read_text())
    assert stats["precision"] == "fp32"  # precision=bf16 on a float32 CPU run computes in fp32
    assert stats["summary"]["medians_over"] == "all steps"
    assert "(steps>=2)" not in proc.stdout and "median step latency (all steps)" in proc.stdout


def test_report_says_killed_for_a_running_run_whose_process_is_gone(tmp_path):
    import socket

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for name, pid in (("gone", dead.pid), ("alive", os.getpid())):
        (tmp_path / name).mkdir()
        stats = {"status": "running", "host": socket.gethostname(), "pid": pid, "summary": {}}
        (tmp_path / name / "stats.json").write_text(json.dumps(stats))
    assert {r["job"]: r["status"] for r in collect(tmp_path)} == {"alive": "running",
                                                                 "gone": "killed"}  # fmt: skip


def test_interrupted_run_reports_no_warmup(tmp_path, monkeypatch):
    from flashdreams.job import run_job
    from flashdreams.rollout import Rollout
    from tests.unit.test_config import compose_run

    real_step = Rollout.step

    def step(self, sync=False):
        if self.step_index == 1:
            raise KeyboardInterrupt
        return real_step(self, sync)

    monkeypatch.setattr(Rollout, "step", step)
    with pytest.raises(KeyboardInterrupt):
        run_job(compose_run([*TINY, f"paths.root={tmp_path}"]))
    stats = json.loads(next(tmp_path.glob("runs/demo/*/stats.json")).read_text())
    assert stats["status"] == "interrupted" and stats["summary"]["warmup_s"] is None
