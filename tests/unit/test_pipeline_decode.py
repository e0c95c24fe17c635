"""rollout.pipeline_decode: block n decoded beside block n + 1, frames handed out one step late.

On the CPU the decode runs in place but the hand-out is the pipelined one, so the frames must
equal the default path's bit for bit, one step later; the CUDA streams are tested in
``tests/gpu/test_overlap_gpu.py``.
"""

import pytest
import torch

from flashdreams import ConfigError
from flashdreams.build import build_rollout
from flashdreams.rollout.decode import Lagged, check_pipeline
from flashdreams.session import Session
from tests.unit.test_config import compose_run
from tests.unit.test_flashvsr_chain import GEN, _frames, _vsr

TINY = ["device=cpu", "rollout.height=64", "rollout.width=64", "vae=taehv",
        "vae.channels=[16,8,8,8]", "cache.window_frames=6"]  # fmt: skip


def test_lagged_hands_items_out_in_order_one_push_late():
    lag = Lagged()
    assert lag.push(0) == [] and lag.push(1) == [0] and lag.push(2) == [1]
    assert lag.push(3, last=True) == [2, 3] and len(lag) == 0  # the last push: all left
    assert lag.push(4) == [] and lag.drain() == [4] and lag.drain() == []
    assert Lagged().push(5, last=True) == [5]  # a one-block run


def _steps(overrides, blocks):
    rollout = build_rollout(compose_run(TINY + [f"rollout.total_blocks={blocks}", *overrides]))
    rollout.start(["a prompt"])
    return rollout, [rollout.step() for _ in range(blocks)]


def test_frames_come_one_step_late_and_equal_the_default_path():
    _, ref = _steps([], 3)
    rollout, got = _steps(["rollout.pipeline_decode=true"], 3)
    assert rollout.pipeline_decode and not rollout.overlap_decode
    assert got[0].frames is None and got[0].timer.num_frames == 0
    assert torch.equal(got[1].frames, ref[0].frames)  # step 1 hands out block 0
    assert torch.equal(got[2].frames, torch.cat([ref[1].frames, ref[2].frames], dim=1))
    for a, b in zip(ref, got, strict=True):  # the latents are not delayed
        assert torch.equal(a.latents, b.latents)
    rows = [o.timer.resolve() for o in got]
    assert [r["num_frames"] for r in rows] == [0, ref[0].frames.shape[1],
                                               ref[1].frames.shape[1] + ref[2].frames.shape[1]]  # fmt: skip
    assert all(r["decode_ms"] > 0 and r["period_ms"] > 0 for r in rows)
    assert all(o.timer.done() for o in got)


def test_an_endless_stream_flushes_its_last_block_and_a_new_clip_drops_it():
    _, ref = _steps([], 3)
    rollout = build_rollout(compose_run(TINY + ["rollout.total_blocks=null",
                                                "rollout.pipeline_decode=true"]))  # fmt: skip
    rollout.start(["a prompt"])
    outs = [rollout.step().frames for _ in range(3)]
    assert outs[0] is None and torch.equal(outs[2], ref[1].frames)
    assert torch.equal(rollout.flush(), ref[2].frames) and rollout.flush() is None
    rollout.step()
    rollout.start(["a prompt"])  # the pending decode of the old clip is dropped
    assert rollout.step().frames is None and rollout.flush().shape == ref[0].frames.shape


def test_chained_stream_with_pipelined_decodes_equals_the_plain_one(tmp_path):
    """Both rollouts pipelined: the decoder's named inputs (FlashVSR's LR frames) are gathered
    before the decode is queued, and the chain's end flushes the upscaler's last chunk."""
    prompt = tmp_path / "posi_prompt.pth"
    torch.save(torch.randn(1, 4, 16), prompt)

    def chained(extra: list[str]) -> torch.Tensor:
        quoted = ",".join(f'"{o}"' for o in [*_vsr(prompt), *extra])
        session = Session.from_overrides([*GEN, *extra, "postprocess=flashvsr_v1_1_tiny",
                                          f"postprocess.overrides=[{quoted}]"], total_blocks=2)  # fmt: skip
        return _frames(list(session))

    ref = chained([])
    got = chained(["rollout.pipeline_decode=true"])
    assert got.shape == ref.shape and torch.equal(got, ref)


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_a_bad_setting_is_one_line(bad):
    with pytest.raises(ConfigError, match="rollout.pipeline_decode"):
        check_pipeline(bad, torch.device("cpu"))
