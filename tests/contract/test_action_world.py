"""A new model with a new conditioning input, added through files under tests/ and YAML only.

``ActionWanDiT`` takes a per-frame ``action`` vector that no part of ``flashdreams`` knows;
``ActionControl`` gives it from a file and from live control. Both are selected by YAML in
``tests/contract/conf`` on Hydra's search path. This checks that they run through
``flashdreams-run``, a multirun, a ``Session``, and that graph pre-capture covers every forward
shape the real steps use (on CPU, through the graph policy's shape keys).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from flashdreams import ConfigError, Session
from flashdreams.build import build_conditioning
from tests.contract import recording
from tests.unit.test_config import compose_run

ROOT = Path(__file__).resolve().parents[2]
CONF = Path(__file__).resolve().parent / "conf"
SEARCH = f"hydra.searchpath=[file://{CONF}]"
ACTION = [SEARCH, "model=action_tiny", "control=action", "device=cpu", "dtype=float32",
          "rollout.height=32", "rollout.width=32", "rollout.total_blocks=3"]  # fmt: skip


def _cli(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, "-m", "flashdreams.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def test_flashdreams_run_and_a_multirun_take_the_new_model(tmp_path):
    actions = tmp_path / "actions.npy"
    np.save(actions, np.random.default_rng(0).standard_normal((9, 4)).astype(np.float32))
    args = ["--config-dir", str(CONF), *ACTION[1:], f"control.actions={actions}",
            f"paths.root={tmp_path / 'out'}"]  # fmt: skip
    proc = _cli(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run,) = (tmp_path / "out" / "runs").glob("*/*")
    stats = json.loads((run / "stats.json").read_text())
    assert len(stats["steps"]) == 3 and (run / "video.mp4").stat().st_size > 0
    proc = _cli(["-m", *args, "seed=0,1"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    jobs = sorted((tmp_path / "out" / "sweeps").glob("*/*/*/video.mp4"))
    assert len(jobs) == 2


def test_session_steers_the_new_input_and_recaches_with_it():
    session = Session(compose_run(ACTION), total_blocks=3)
    first = session.step(control={"action": [1.0, 0.0, 0.0, 0.0]})
    assert session.last.state == {"action": [1.0, 0.0, 0.0, 0.0]}
    session.reset(seed=0)
    other = session.step(control={"action": [0.0, 0.0, -3.0, 0.0]})
    assert (first - other).abs().max() > 1e-3  # the action reaches the model
    session.reset(seed=0)
    again = session.step(control={"action": [1.0, 0.0, 0.0, 0.0]})
    assert torch.equal(first, again)
    session.set_prompt("another prompt")  # recache replays the commits with the frames' actions
    session.step(control={"action": [0.0, 1.0, 0.0, 0.0]})
    assert session.prompt_version == 1 and session.last.recache_ms > 0


def test_precapture_covers_every_shape_of_the_steps():
    cfg = compose_run([*ACTION, "graph=recording", "rollout.total_blocks=6",
                       "cache.window_frames=9"])  # fmt: skip
    recording.RECORDS.clear()
    session = Session(cfg, total_blocks=None)  # endless: the cache fills, then rolls
    captured = {key for _, key in recording.RECORDS}
    names = {k[1] for k in captured}
    assert names == {(("action",),)}  # the stand-in of the named input, nothing else
    recording.RECORDS.clear()
    for i in range(6):
        session.step(control={"action": [float(i), 0.0, 1.0, 0.0]})
    used = {key for _, key in recording.RECORDS}
    assert used and used <= captured  # no step needs a graph that pre-capture did not make
    # 3, 6, then 9 valid frames (steady); commits (forward_kv) have graphs of their own
    assert {k[0] for k in captured if not isinstance(k[0], tuple)} == {12, 24, 36}
    assert {k[0] for k in captured if isinstance(k[0], tuple)} == {(12, "kv"), (24, "kv"),
                                                                   (36, "kv")}  # fmt: skip


def test_a_recipe_input_the_model_does_not_take_fails_at_build_in_one_line():
    with pytest.raises(ConfigError) as err:
        build_conditioning(compose_run([SEARCH, "control=action"]), torch.device("cpu"))
    message = str(err.value)
    # the option's name under the CLI (Hydra's choices), its class under the compose API
    assert "\n" not in message and message.startswith(("control=action ", "control=ActionControl "))
    assert "'action', which the model (WanDiT) does not accept" in message
    with pytest.raises(ConfigError, match="ActionWanDiT. needs the conditioning input 'action'"):
        build_conditioning(compose_run([SEARCH, "model=action_tiny"]), torch.device("cpu"))
