"""The CLI end to end, as a user runs it: default run, overrides, errors, multirun + report."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flashdreams.io.video import read_video_frames

RUN = [sys.executable, "-m", "flashdreams.cli"]


def _run(args, cwd, check=True):
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([*RUN, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _only(pattern, root):
    found = sorted(Path(root).glob(pattern))
    assert len(found) == 1, found
    return found[0]


def test_default_run_writes_video_stats_config_plot(tmp_path):
    proc = _run([], tmp_path)
    run_dir = _only("outputs/runs/demo/*", tmp_path)
    assert read_video_frames(run_dir / "video.mp4") == 81  # 7 blocks x 3 latent frames
    stats = json.loads((run_dir / "stats.json").read_text())
    assert [s["step"] for s in stats["steps"]] == list(range(7))
    assert stats["status"] == "completed"
    assert stats["summary"]["median_step_ms"] > 0
    assert (run_dir / "config.yaml").is_file() and (run_dir / "latency.png").is_file()
    assert "RANDOM WEIGHTS" in proc.stderr + proc.stdout
    assert "median step latency" in proc.stdout


def test_overrides_change_the_run(tmp_path):
    _run(["rollout.total_blocks=2", "cache=rolling", "cache.window_frames=6", "seed=3",
          "cache.sink_frames=3", "logger=jsonl"], tmp_path)  # fmt: skip
    run_dir = _only("outputs/runs/demo/*", tmp_path)
    assert read_video_frames(run_dir / "video.mp4") == 1 + 4 * 5
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) >= 4


def test_cfg_job_prints_config_without_running(tmp_path):
    proc = _run(["--cfg", "job", "seed=5"], tmp_path)
    assert "seed: 5" in proc.stdout
    assert not (tmp_path / "outputs").exists()


def test_help_lists_groups():
    proc = _run(["--help"], ".")
    for group in ("cache", "model", "recipe", "scheduler", "vae"):
        assert group in proc.stdout
    assert "cache: context, full, none, rolling\n" in proc.stdout  # options, not the base_* schemas
    assert "control/encoder: lightvae, taehv, wan21\n" in proc.stdout  # a group inside an option
    assert "base_" not in proc.stdout.split("== Config ==")[0]


@pytest.mark.parametrize(
    "args,needle",
    [
        (["rollout.height=100"], "rollout.height=100"),
        (["rollout.total_blocks=0"], "rollout.total_blocks=0"),
        (["cache.window_frames=1"], "cache.window_frames=1"),
        (["cache=nope"], "cache=nope: unknown option; allowed: context, full, none, rolling"),
        (
            ["recipe=omnidreams_single_view_fast", "control/encoder=nope"],
            "control/encoder=nope: unknown option; allowed: lightvae, taehv, wan21",
        ),  # nested group
        (["prompt_file=/does/not/exist"], "prompt_file="),
    ],
)
def test_bad_input_is_one_line_error(tmp_path, args, needle):
    proc = _run(args, tmp_path, check=False)
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr
    assert needle in err[-1] and err[-1].startswith("flashdreams: error:")


def test_multirun_two_points_and_report(tmp_path):
    _run(["-m", "rollout.total_blocks=2", "cache.window_frames=3,6"], tmp_path)
    sweep = _only("outputs/sweeps/demo/*", tmp_path)
    jobs = sorted(p for p in sweep.iterdir() if (p / "stats.json").is_file())
    assert len(jobs) == 2
    proc = subprocess.run([sys.executable, "-c", "from flashdreams.cli import report_main; "
                           f"report_main([{str(sweep)!r}])"], capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "cache.window_frames=3" in proc.stdout and "cache.window_frames=6" in proc.stdout
    assert (sweep / "report.csv").read_text().count("\n") == 3
    assert (sweep / "report.png").is_file()


def test_out_of_memory_is_one_line_with_what_to_change():
    import torch

    from flashdreams.cli import user_error

    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore detail")
    try:
        try:
            raise oom
        except torch.OutOfMemoryError as err:
            raise RuntimeError("while building the KV cache") from err  # e.g. wrapped by a part
    except RuntimeError as wrapped:
        message = user_error(wrapped)
    assert message.startswith("out of GPU memory (CUDA out of memory")
    assert "\n" not in message and "precision.kv_cache=fp8" in message
    assert user_error(RuntimeError("a bug")) is None  # real bugs keep their traceback
