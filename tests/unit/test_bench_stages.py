"""``flashdreams-bench``'s per-block stage medians (steps >= 2; the ``control`` stage defaults to 0
for stats written before it existed) and the per-block line it prints (HDMap encode, DiT,
decode, commit, total)."""

from __future__ import annotations

import time

import pytest
import torch

from flashdreams.bench import _print, stage_medians
from flashdreams.stats import Mark, StepTimer


def _steps():
    rows = []
    for i, control in enumerate((50.0, 40.0, 20.0, 22.0, 24.0)):
        rows.append({"step": i, "encode_ms": 1.0, "control_ms": control, "diffuse_ms": 80.0 + i,
                     "decode_ms": 6.0, "commit_ms": 30.0, "step_ms": 87.0 + control + i,
                     "period_ms": 117.0 + control + i})  # fmt: skip
    return rows


def test_stage_medians_skip_warmup_and_default_control():
    got = stage_medians(_steps())
    assert got == {"encode": 1.0, "control": 22.0, "diffuse": 83.0, "decode": 6.0,
                   "commit": 30.0, "step": 112.0, "period": 142.0}  # fmt: skip
    old = [{k: v for k, v in row.items() if k != "control_ms"} for row in _steps()]
    assert stage_medians(old)["control"] == 0.0


def test_bench_prints_the_per_block_stages(capsys):
    summary = {"median_step_ms": 112.0, "median_period_ms": 142.0, "warmup_s": 3.0,
               "peak_memory_bytes": 2**30}  # fmt: skip
    result = {"stats": {"summary": summary}, "stages_ms": stage_medians(_steps()),
              "config": {"graph": "flashdreams.graph.eager.EagerPolicy",
                         "attention": {"backend": "sdpa"}}}  # fmt: skip
    _print(result)
    line = [ln for ln in capsys.readouterr().out.splitlines() if "per block" in ln][0]
    assert "control (HDMap encode) 22.0 | DiT 83.0 | decode 6.0 | commit 30.0 | total 142.0" in line


def test_parts_inside_a_stage_give_its_own_time_and_parts_beside_do_not():
    """A control's parts: one inside ``diffuse`` (an LR projector) gives ``dit_ms`` = diffuse
    without it; one beside the stages (an encode ahead on a side stream) subtracts nothing."""
    cpu = torch.device("cpu")
    timer = StepTimer(3, cpu)
    timer.start("diffuse")
    begin = Mark(cpu)
    time.sleep(0.02)
    projector = (begin, Mark(cpu))
    time.sleep(0.03)
    timer.stop()
    ahead = (Mark(cpu), Mark(cpu))
    timer.add_parts({"projector": [projector], "control_ahead": [ahead]}, {"projector": "diffuse"})
    row = timer.resolve()
    assert row["projector_ms"] >= 20 and row["diffuse_ms"] >= 50
    assert row["dit_ms"] == pytest.approx(row["diffuse_ms"] - row["projector_ms"])
    assert "control_ahead_ms" in row and not any(k.endswith("_own_ms") for k in row)
    beside = StepTimer(3, cpu)
    beside.start("diffuse")
    beside.stop()
    beside.add_parts({"control_ahead": [ahead]})
    assert "dit_ms" not in beside.resolve()
    with pytest.raises(ValueError, match="unknown stage"):
        beside.add_parts({}, {"projector": "denoise"})
