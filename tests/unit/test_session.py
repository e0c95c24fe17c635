"""flashdreams.Session: stepping, endless iteration, reset, prompt switch (recache), controls."""

import gc
import itertools
import subprocess
import sys
import weakref

import pytest
import torch

from flashdreams import ConfigError, Session
from flashdreams.session import SessionEnded, validate_control
from tests.unit.test_config import compose_run

TINY = ["device=cpu", "rollout.height=64", "rollout.width=64"]


def make(*overrides, **kwargs) -> Session:
    return Session(compose_run([*TINY, *overrides]), **kwargs)


def test_import_flashdreams_stays_torch_free():
    code = "import sys, flashdreams; assert 'torch' not in sys.modules; flashdreams.Session"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_endless_stream_with_rolling_cache():
    session = make("cache.window_frames=6", prompt="a fox", seed=1)
    assert session.total_blocks is None  # rolling cache: endless by default
    frames = list(itertools.islice(session, 5))  # more blocks than the window holds
    assert [f.shape for f in frames] == [(1, 9, 3, 64, 64)] + [(1, 12, 3, 64, 64)] * 4
    assert all(0 <= f.min() and f.max() <= 1 for f in frames)
    assert session.step_index == 5 and not session.finished


def test_finite_stream_ends_and_reset_reproduces():
    session = make(prompt="a fox", seed=3, total_blocks=3)
    first = list(session)
    assert len(first) == 3 and session.finished
    with pytest.raises(SessionEnded):
        session.step()
    session.reset()
    assert all(torch.equal(a, b) for a, b in zip(first, session, strict=True))
    session.reset(seed=4)
    assert not torch.equal(first[0], session.step())


def test_endless_stream_runs_past_the_rope_table():
    """Frame positions past the 1024-row table: the stream goes on, finite, never finished."""
    session = make("cache.window_frames=6")
    for _ in range(2):
        session.step()
    session.rollout.step_index = 400  # absolute frames 1200..1202 (the ring cache maps any frame)
    frames = session.step()
    assert not session.finished and torch.isfinite(frames).all()


def test_full_cache_refuses_endless_and_too_long_streams():
    cfg = compose_run([*TINY, "cache=full", "rollout.total_blocks=2"])
    assert Session(cfg).total_blocks == 2  # default: the recipe's length
    with pytest.raises(ConfigError, match="endless streams need cache=rolling"):
        Session(cfg, total_blocks=None)
    with pytest.raises(ConfigError, match="too few for total_blocks=3"):
        Session(cfg, total_blocks=3)


def test_recache_with_unchanged_prompt_reproduces_the_cache():
    session = make("cache.window_frames=12", prompt="a fox")
    for _ in range(3):
        session.step()
    before = [k.clone() for k in session.rollout.cache.k]
    session.recache()  # replays the 3 committed blocks block-causally, as they were written
    for a, b in zip(before, session.rollout.cache.k, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


class _RecordingCache:
    """Full-sequence reference: records each layer's K and attends to the whole input."""

    def __init__(self):
        self.k = {}

    def update(self, layer, k, v):
        self.k[layer] = k
        return k, v


def test_prompt_switch_recaches_resident_frames_like_a_masked_forward():
    # sink 1 + window 4 with 3-frame blocks: blocks get evicted partially
    session = make("cache.window_frames=4", "cache.sink_frames=1", prompt="a fox", seed=2)
    for _ in range(5):  # frames 0..14
        session.step()
    assert session._resident_frames() == {0, 11, 12, 13, 14}
    assert [start for start, _ in session._blocks] == [0, 9, 12]
    session.set_prompt("a river at night")
    assert session.prompts == ["a river at night"] and session.prompt_version == 0
    r = session.rollout
    r.set_prompts(session.prompts)
    session.recache()

    # reference: one forward over the resident frames, block-causal over the replay chunks
    chunks = [[0], [11], [12, 13, 14]]
    frames = [f for c in chunks for f in c]
    lat = {s + i: b[:, :, i : i + 1] for s, b in session._blocks for i in range(b.shape[2])}
    x = torch.cat([lat[f] for f in frames], dim=2)
    tpf = r.cache.tokens_per_frame
    chunk_of = torch.tensor([i for i, c in enumerate(chunks) for _ in c]).repeat_interleave(tpf)
    mask = chunk_of[None, :] <= chunk_of[:, None]  # (L, L) query sees its chunk and earlier
    ref = _RecordingCache()
    t = torch.zeros(1, len(frames))
    r.model(x, t, r.context(), torch.tensor(frames), ref, mask)
    for layer in range(r.model.num_layers):
        for i, f in enumerate(frames):
            slot = r.cache.frame_slot(f)
            got = r.cache.k[layer][:, slot * tpf : (slot + 1) * tpf]
            torch.testing.assert_close(got, ref.k[layer][:, i * tpf : (i + 1) * tpf],
                                       rtol=1e-4, atol=1e-4)  # fmt: skip


def test_set_prompt_takes_effect_at_the_next_step():
    a = make("cache.window_frames=6", prompt="a fox", seed=5)
    b = make("cache.window_frames=6", prompt="a fox", seed=5)
    for _ in range(3):
        assert torch.equal(a.step(), b.step())
    b.set_prompt("a burning city")
    assert b.rollout.prompts == ["a fox"]  # nothing happens before the next step
    fa, fb = a.step(), b.step()
    assert b.last.prompt_version == 1 and b.last.recache_ms > 0
    assert b.rollout.prompts == ["a burning city"]
    assert not torch.equal(fa, fb)
    assert list(b.rollout.prompt_context.cached) == [("a burning city",)]  # old K/V freed
    b.set_prompt("a burning city")  # same prompt again: no recache
    b.step()
    assert b.last.prompt_version == 1 and b.last.recache_ms == 0


def test_controls_are_validated_recorded_and_passed_to_a_control_encoder():
    session = make(prompt="a fox")
    session.step(control={"keys": ["w", "a"], "yaw": 0.25, "pose": [[1.0, 0.0], [0.0, 1.0]]})
    assert session.last.control["keys"] == ["w", "a"]
    seen = []
    session.rollout.set_control = seen.append
    session.step(control={"jump": True})
    assert seen == [{"jump": True}]
    for bad in (["w"], {"": 1}, {"x": float("nan")}, {"x": {"nested": 1}}, {"x": [0.0] * 300}):
        with pytest.raises(ValueError):
            validate_control(bad)
    with pytest.raises(ValueError, match="must not be empty"):
        session.set_prompt("  ")


def test_dropping_a_session_frees_it():
    session = make(prompt="a fox")
    session.step()
    ref = weakref.ref(session)
    cache_ref = weakref.ref(session.rollout.cache.k[0])
    del session
    gc.collect()
    assert ref() is None and cache_ref() is None


def test_from_overrides_composes_the_run_config():
    session = Session.from_overrides(TINY, prompt="a fox", total_blocks=1)
    assert session.step().shape == (1, 9, 3, 64, 64) and session.finished
