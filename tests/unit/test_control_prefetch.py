"""``rollout.prefetch_control``: the control encodes block n + 1 while block n is denoised (CPU,
tiny OmniDreams, 32x32). The video is the one without it, from a file and from pushed frames;
the next block's frames are read ahead; streamed frames not arrived yet are left to the step
(late frames still steer it); a push into frames encoded ahead drops that encode and the step
encodes them again; the ahead work is timed as ``control_ahead_ms``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.unit.test_hdmap_stream import _block_range, _session, clip  # noqa: F401  (fixture)

BLOCKS = 3


def _run(session, blocks: int = BLOCKS, push=None):
    """Frames of ``blocks`` steps; ``push(step, session)`` runs before each step."""
    session.reset(seed=0, prompt="a road", total_blocks=blocks)
    frames, rows, read = [], [], []
    for step in range(blocks):
        if push is not None:
            push(step, session)
        frames.append(session.step())
        rows.append(session.last.timings())
        read.append(session.rollout.control._file._pos if session.rollout.control._file else None)
    return frames, rows, read


@pytest.fixture(scope="module")
def filed(clip):  # noqa: F811
    return _session(clip, f"control.video={clip['path']}")


@pytest.fixture(scope="module")
def ahead(clip):  # noqa: F811
    return _session(clip, f"control.video={clip['path']}", "rollout.prefetch_control=true")


@pytest.fixture(scope="module")
def reference(filed):
    return _run(filed)


def _same(got, want) -> None:
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_the_file_driven_video_is_unchanged_and_read_one_block_ahead(ahead, reference):
    frames, rows, read = _run(ahead)
    _same(frames, reference[0])
    assert read[:2] == [_block_range(1)[1] - 1, _block_range(2)[1] - 1]  # the next block's
    assert read[:2] > reference[2][:2]
    assert all(row["control_ahead_ms"] > 0 for row in rows[:2])
    assert "control_ahead_ms" not in rows[2]  # the last block has no next one
    assert ahead.last.state == {"hdmap_latent_frames": 2 * BLOCKS,
                                "hdmap_next_frame": _block_range(BLOCKS - 1)[1]}  # fmt: skip


def test_streamed_frames_late_or_early_give_the_file_driven_video(clip, reference):  # noqa: F811
    session = _session(clip, "control.live=true", "rollout.prefetch_control=true")

    def late(step, s):  # each block's frames right before its step: nothing to encode ahead
        s.push_frames(np.stack(clip["frames"][slice(*_block_range(step))]))

    frames, rows, _ = _run(session, push=late)
    _same(frames, reference[0])
    assert all("control_ahead_ms" not in row for row in rows)

    def early(step, s):  # the clip's frames all pushed before the first step
        if step == 0:
            s.push_frames(np.stack(clip["frames"][: _block_range(BLOCKS - 1)[1]]))

    frames, rows, _ = _run(session, push=early)
    _same(frames, reference[0])
    assert all(row["control_ahead_ms"] > 0 for row in rows[:2])


def test_a_push_into_frames_encoded_ahead_is_used(clip, filed, ahead):  # noqa: F811
    other = np.stack(clip["other"][9:13])

    def push(step, s):  # after step 0 (block 1 is encoded ahead then): frames 9..12 change
        if step == 1:
            s.push_frames(other, 9)

    want, _, _ = _run(filed, push=push)
    got, _, _ = _run(ahead, push=push)
    _same(got, want)
    assert (got[1] - _run(filed)[0][1]).abs().max() > 1e-3  # the push steered block 1


def test_the_encode_ahead_beside_the_denoising_gives_the_same_video(clip, reference):  # noqa: F811
    session = _session(clip, f"control.video={clip['path']}", "rollout.prefetch_control=true",
                       "control.ahead_overlap=denoise")  # fmt: skip
    assert session.rollout.control.ahead_beside == "denoise"
    frames, rows, read = _run(session)
    _same(frames, reference[0])
    assert read[:2] == [_block_range(1)[1] - 1, _block_range(2)[1] - 1]
    assert all(row["control_ahead_ms"] > 0 for row in rows[:2])


def test_a_frame_pushed_after_it_was_read_ahead_wins(clip, filed, ahead):  # noqa: F811
    """``ahead_overlap=commit`` reads the next block's file frames while the GPU denoises and
    encodes them at the commit: a push in between replaces the frame read (none is kept)."""
    assert ahead.rollout.control.ahead_beside == "commit"
    other = np.stack(clip["other"][0:4])
    ahead.reset(seed=0, prompt="a road", total_blocks=BLOCKS)
    control = ahead.rollout.control
    control.read_ahead(0, 2)  # block 0's frames, read from the file
    assert set(control._reread) == set(range(_block_range(0)[1]))
    ahead.push_frames(other, 0)
    got = ahead.step()
    assert not control._reread.keys() & set(range(4))  # used or replaced, not kept
    filed.reset(seed=0, prompt="a road", total_blocks=BLOCKS)
    filed.push_frames(other, 0)
    torch.testing.assert_close(got, filed.step(), rtol=0, atol=0)
