"""The block schedule (``rollout.first_block_frames``): block sizes, start frames, KV cache
sizing, the Session's step accounting and recache, graph pre-capture of every shape, and
one-line errors for impossible schedules."""

from __future__ import annotations

import json

import pytest
import torch

from flashdreams import ConfigError, Session
from flashdreams.build import build_rollout
from flashdreams.config.validate import check_run_config
from flashdreams.rollout import BlockSchedule
from tests.contract import recording
from tests.contract.test_action_world import SEARCH
from tests.unit.test_config import compose_run

TINY = ["device=cpu", "rollout.height=64", "rollout.width=64"]
FIRST_ONE = [*TINY, "rollout.first_block_frames=1"]  # 1 latent frame, then the demo's 3s


def make(*overrides, **kwargs) -> Session:
    return Session(compose_run([*FIRST_ONE, *overrides]), **kwargs)


def test_schedule_sizes_and_starts():
    uniform = BlockSchedule(3)
    assert uniform.uniform and [uniform.start(i) for i in range(4)] == [0, 3, 6, 9]
    assert uniform.total(7) == 21 and uniform.max_frames == 3
    t2v = BlockSchedule(3, 1)
    assert not t2v.uniform and t2v.block_sizes(7) == [1, 3, 3, 3, 3, 3, 3]
    assert [t2v.start(i) for i in range(4)] == [0, 1, 4, 7] and t2v.total(7) == 19
    vsr = BlockSchedule(2, 6)
    assert vsr.block_sizes(4) == [6, 2, 2, 2] and vsr.total(4) == 12 and vsr.max_frames == 6
    assert vsr.as_dict() == {"first_block_frames": 6, "frames_per_block": 2}


def test_finite_session_steps_through_the_schedule_and_sizes_its_cache():
    session = make("cache=full", "rollout.total_blocks=3")
    r = session.rollout
    assert r.cache.capacity_frames == 1 + 3 + 3  # the run's frames, not 3 blocks of 3
    frames, starts = [], []
    for out in session:
        frames.append(out.shape[1])
        starts.append(session.last.output.start_frame)
    assert frames == [1, 12, 12] and starts == [0, 1, 4]  # preview decoder: 1 + 4 (F - 1)
    assert [s.timings()["latent_frames"] for s in [session.last]] == [3]
    assert session.finished and r.cache.valid_tokens == 7 * r.cache_tokens_per_frame()
    with pytest.raises(ConfigError, match="holds 7 latent frames, too few for total_blocks=4"):
        session.reset(total_blocks=4)


def test_endless_session_with_a_first_block_rolls_its_window():
    session = make("cache.window_frames=6", prompt="a fox")
    assert session.total_blocks is None and session.rollout.cache.capacity_frames == 6
    shapes = [session.step().shape[1] for _ in range(4)]  # frames 0 | 1-3 | 4-6 | 7-9
    assert shapes == [1, 12, 12, 12]
    assert session.last.output.start_frame == 7
    assert session._resident_frames() == set(range(4, 10))  # the window's last 6 frames


def test_recache_of_a_schedule_rewrites_the_same_kv():
    session = make("cache.window_frames=12", prompt="a fox")
    for _ in range(3):  # frames 0 | 1-3 | 4-6: nothing evicted yet
        session.step()
    cache = session.rollout.cache
    before = [k.clone() for k in cache.k]
    session.recache()  # replays block 0 (1 frame) then the two 3-frame blocks
    for a, b in zip(before, cache.k, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    session.set_prompt("a burning city")
    session.step()
    assert session.last.recache_ms > 0 and not torch.allclose(cache.k[1], before[1])


def test_uniform_default_is_unchanged():
    a = Session(compose_run(TINY), prompt="a fox", seed=2, total_blocks=3)
    b = Session(compose_run([*TINY, "rollout.first_block_frames=3"]), prompt="a fox", seed=2,
                total_blocks=3)  # fmt: skip
    assert a.rollout.schedule.uniform and a.rollout.first_block_frames == 3
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("schedule", [["rollout.first_block_frames=1"],
                                      ["rollout.first_block_frames=6", "rollout.frames_per_block=2"]])  # fmt: skip
def test_precapture_covers_every_shape_of_a_schedule(schedule):
    """Every (shape key, inputs, shapes) a stepped schedule uses was pre-captured, while the
    cache fills and once it rolls; the first block's own shape is among them."""
    cfg = compose_run([*TINY, SEARCH, "graph=recording", "cache.window_frames=8", *schedule])
    recording.RECORDS.clear()
    session = Session(cfg, total_blocks=None)
    captured = {key for _, key in recording.RECORDS}
    recording.RECORDS.clear()
    for _ in range(6):
        session.step()
    used = {key for _, key in recording.RECORDS}
    assert used and used <= captured
    first = session.rollout.first_block_frames
    assert any(shapes[0][0][2] == first for _, _, shapes in used)  # x of the first block


def test_precapture_covers_an_i2v_prefix_commit(tmp_path):
    """The conditioner's prefix frame is committed before block 0: its forward is pre-captured
    and the blocks after it are keyed at their real KV lengths (prefix included)."""
    from PIL import Image

    from tests.parity.test_framewise_chunkwise import ENCODER
    from tests.parity.test_framewise_chunkwise import TINY as PARITY

    Image.new("RGB", (32, 32), (200, 40, 10)).save(tmp_path / "first.png")
    cfg = compose_run(["recipe=causal_forcing_wan21_i2v_1_3b_framewise", *PARITY, *ENCODER,
                       SEARCH, "graph=recording", f"image={tmp_path / 'first.png'}",
                       "rollout.total_blocks=3"])  # fmt: skip
    recording.RECORDS.clear()
    session = Session(cfg, total_blocks=3)
    captured = {key for _, key in recording.RECORDS}
    recording.RECORDS.clear()
    list(session)
    used = {key for _, key in recording.RECORDS}
    assert used and used <= captured


@pytest.mark.parametrize("override,needle", [
    ("rollout.first_block_frames=0", "rollout.first_block_frames=0 must be an integer >= 1"),
    ("rollout.first_block_frames=-2", "rollout.first_block_frames=-2 must be an integer >= 1"),
    ("rollout.first_block_frames=7 cache.window_frames=6",
     "cache.window_frames=6 is smaller than the first block (7 latent frames); use "
     "cache.window_frames>=7"),
])  # fmt: skip
def test_impossible_schedules_are_one_line_errors(override, needle):
    cfg = compose_run([*TINY, *override.split()])
    with pytest.raises(ConfigError) as info:
        check_run_config(cfg)  # the CLI's check, before anything loads
    assert str(info.value) == needle
    with pytest.raises(ConfigError) as info:  # a Session builds the rollout: the same rule
        build_rollout(cfg)
    assert "\n" not in str(info.value) and ("first_block_frames" in str(info.value)
                                            or "window_frames=6" in str(info.value))  # fmt: skip


def test_a_non_integer_first_block_fails_at_composition():
    with pytest.raises(Exception, match="first_block_frames"):  # the schema types it
        compose_run([*TINY, "rollout.first_block_frames=1.5"])


def test_stats_json_records_the_schedule(tmp_path):
    from tests.unit.test_cli import _run

    _run(["rollout.height=32", "rollout.width=32", "device=cpu", "rollout.total_blocks=3",
          "rollout.first_block_frames=1"], tmp_path)  # fmt: skip
    stats = json.loads(next(tmp_path.glob("outputs/runs/*/*/stats.json")).read_text())
    assert (stats["first_block_frames"], stats["frames_per_block"]) == (1, 3)
    assert [s["latent_frames"] for s in stats["steps"]] == [1, 3, 3]
    assert [s["num_frames"] for s in stats["steps"]] == [1, 12, 12]


def test_server_sizes_a_session_by_the_schedule():
    """The server's size model (bytes per cached frame x the frames a session's cache holds)
    counts the schedule's frames: a 1-frame first block, then 3s."""
    from flashdreams.serve.engine import Engine

    cfg = compose_run([*FIRST_ONE, "cache=full", "rollout.total_blocks=2"])
    session = Session(cfg, total_blocks=2)
    engine = Engine.__new__(Engine)  # the size model only: no server, no shared weights
    engine.cfg, engine.device = cfg, torch.device("cpu")
    engine._measure(session, None)
    assert engine.cache_frames(2) == 4 and engine.cache_frames(5) == 13  # 1 + 3 (n - 1)
    assert engine.frame_bytes * 4 == sum(t.numel() * t.element_size()
                                         for t in session.rollout.cache.k + session.rollout.cache.v)  # fmt: skip
