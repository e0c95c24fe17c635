"""rollout.overlap_decode and vae.compile (TAEHV): their CPU fallbacks, settings and timing.

On CPU both knobs fall back (sequential decode/commit, eager TAEHV) with one log line, so the
outputs must equal the default path bit for bit. The CUDA paths are tested in
``tests/gpu/test_overlap_gpu.py``.
"""

import logging

import pytest
import torch

import flashdreams.rollout.decode
import flashdreams.vae.taehv
from flashdreams import ConfigError
from flashdreams.build import build_rollout
from flashdreams.stats import StepTimer
from flashdreams.vae.taehv import TAEHVDecoder
from tests.unit.test_config import compose_run

TINY = ["device=cpu", "rollout.height=64", "rollout.width=64", "rollout.total_blocks=3",
        "vae=taehv", "vae.channels=[16,8,8,8]", "cache.window_frames=6"]  # fmt: skip


def _run(overrides):
    rollout = build_rollout(compose_run(TINY + overrides))
    rollout.start(["a prompt"])
    outs = [rollout.step() for _ in range(3)]
    return rollout, outs


def test_config_composes_with_both_knobs():
    cfg = compose_run(["recipe=self_forcing_wan21_t2v_1_3b_taehv",
                       "rollout.overlap_decode=true", "vae.compile=true"])  # fmt: skip
    assert cfg.rollout.overlap_decode is True and cfg.vae.compile is True
    cfg = compose_run(["recipe=self_forcing_wan21_t2v_1_3b_taehv"])
    assert cfg.rollout.overlap_decode is False and cfg.vae.compile is True  # the recipe's speed
    assert compose_run(["vae=taehv"]).vae.compile is False  # the decoder's own default


def test_overlap_on_cpu_is_sequential_and_bit_identical(monkeypatch, caplog):
    monkeypatch.setattr(flashdreams.rollout.decode, "_logged_cpu", set())
    _, ref = _run([])
    with caplog.at_level(logging.INFO, logger="flashdreams.rollout.decode"):
        rollout, got = _run(["rollout.overlap_decode=true"])
        _run(["rollout.overlap_decode=true"])  # a second rollout (a server session) logs none
    lines = [r for r in caplog.records if "overlap_decode" in r.getMessage()]
    assert len(lines) == 1 and "cpu" in lines[0].getMessage()
    assert rollout.overlap_decode is False
    for a, b in zip(got, ref, strict=True):
        assert torch.equal(a.latents, b.latents)
        assert a.frames is not None and torch.equal(a.frames, b.frames)
        assert "period" not in a.timer.marks  # the sequential timing: period = stage sum
        assert a.timer.marks.keys() == b.timer.marks.keys()
    assert "commit" in got[0].timer.marks and "commit" not in got[-1].timer.marks


def test_taehv_compile_on_cpu_stays_eager_with_one_line(monkeypatch, caplog):
    monkeypatch.setattr(flashdreams.vae.taehv, "_logged_cpu_fallback", False)
    eager = TAEHVDecoder(channels=(16, 8, 8, 4), seed=0)
    compiled = TAEHVDecoder(channels=(16, 8, 8, 4), seed=0, compile=True)
    latents = torch.randn(1, 16, 6, 3, 4, generator=torch.Generator().manual_seed(0))
    with caplog.at_level(logging.INFO, logger="flashdreams.vae.taehv"):
        got = [compiled.decode_step(b) for b in latents.split(3, dim=2)]
    ref = [eager.decode_step(b) for b in latents.split(3, dim=2)]
    assert compiled._compiled is None
    assert len([r for r in caplog.records if "vae.compile" in r.getMessage()]) == 1
    assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))


def test_taehv_stack_traces_as_one_graph_and_matches():
    """The stateless decode ``compile`` compiles: one graph (fullgraph), static shapes, equal
    frames and memories over a clip start and a steady block. Dynamo with the eager backend
    keeps this fast on CPU; Inductor itself runs in the GPU test."""
    torch._dynamo.reset()
    dec = TAEHVDecoder(channels=(16, 8, 8, 4), seed=2)
    ref = TAEHVDecoder(channels=(16, 8, 8, 4), seed=2)
    dec._compiled = torch.compile(dec._stack, backend="eager", dynamic=False, fullgraph=True)
    dec._stack_for = lambda x: dec._compiled  # what compile=True picks on CUDA
    latents = torch.randn(1, 16, 9, 3, 4, generator=torch.Generator().manual_seed(1))  # B = 1
    with torch._dynamo.config.patch(error_on_recompile=True):  # the clip start's graph is reused
        for block in latents.split(3, dim=2):
            assert torch.equal(dec.decode_step(block), ref.decode_step(block))
    assert dec._memory.keys() == ref._memory.keys() and len(dec._memory) == 9
    assert all(torch.equal(dec._memory[k], ref._memory[k]) for k in ref._memory)


@pytest.mark.parametrize("bad", ["yes", 1])
def test_bad_settings_are_config_errors(bad):
    with pytest.raises(ConfigError, match="vae.compile"):
        TAEHVDecoder(channels=(16, 8, 8, 4), compile=bad)
    with pytest.raises(ConfigError, match="rollout.overlap_decode"):
        flashdreams.rollout.decode.check_overlap(bad, torch.device("cpu"))


def test_close_period_spans_from_step_start_to_the_last_mark():
    """Overlapped stages: the period is the span to the closing mark, not the stage sum."""
    timer = StepTimer(0, torch.device("cpu"))
    for stage in ("encode", "diffuse", "decode", "commit"):
        timer.start(stage)
        timer.stop()
    for (name, (begin, end)), t in zip(timer.marks.items(), (0.0, 1.0, 3.0, 3.0), strict=True):
        begin.host, end.host = t, t + {"decode": 0.004, "commit": 0.006}.get(name, 0.001)
    assert timer.resolve()["period_ms"] == pytest.approx(1 + 1 + 4 + 6)
    timer.close_period()
    timer.marks["period"][1].host = 3.0065  # both done 0.5 ms after the commit's own end
    row = timer.resolve()
    assert row["step_ms"] == pytest.approx(1 + 1 + 4)
    assert row["period_ms"] == pytest.approx(3006.5)
