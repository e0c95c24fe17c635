"""The OmniDreams closed loop through ``Session`` (CPU, tiny random weights, 32x32): HDMap frames
streamed in with ``Session.push_frames`` give exactly the video of the file-driven run on the
same frames; frames nobody pushed come from the file or repeat the last one; late and
far-ahead frames are refused in one line and the stream goes on; the file is read block by
block (never the whole clip); a prompt switch (recache) finds the HDMap latents of the cached
frames; the ``control`` stage (the HDMap encode) is timed apart from ``diffuse``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flashdreams.conditioner.cosmos_video import read_last_frames
from flashdreams.session import Session
from tests.unit.test_omnidreams_cli import SIZE, TINY, _hdmap, _image

BLOCKS = 2  # AR steps of a session (2 latent frames, 5 then 8 video frames)
FRAMES = 21  # video frames of the clips (3 blocks: the recache test's run)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    root = tmp_path_factory.mktemp("hdmap")
    path = _hdmap(root / "clip_hdmap.mp4", FRAMES)
    decoded = [np.asarray(f) for f in read_last_frames(str(path), FRAMES)]  # as ffmpeg reads it
    other = np.random.default_rng(1).integers(0, 255, (FRAMES, SIZE, SIZE, 3), np.uint8)
    return {"path": path, "frames": decoded, "other": list(other),
            "image": _image(root / "first.png")}  # fmt: skip


def _block_range(step: int) -> tuple[int, int]:
    return (0, 5) if step == 0 else (5 + 8 * (step - 1), 5 + 8 * step)


def _session(clip, *extra) -> Session:
    return Session.from_overrides([*TINY, "graph=eager", f"image={clip['image']}", *extra],
                                  prompt="a road", seed=0, total_blocks=BLOCKS)  # fmt: skip


@pytest.fixture(scope="module")
def filed(clip):
    """A file-driven session (frames may be pushed over the file's); reset by each test."""
    return _session(clip, f"control.video={clip['path']}", "control.history_frames=2")


@pytest.fixture(scope="module")
def live(clip):
    """A live session without a file; reset by each test."""
    return _session(clip, "control.live=true", "control.max_ahead_frames=8")


def _fresh(session: Session, blocks: int = BLOCKS) -> Session:
    session.reset(seed=0, prompt="a road", total_blocks=blocks)
    return session


@pytest.fixture(scope="module")
def file_run(filed):
    """The file-driven run: its frames, stage times and how far the file was read per step."""
    session = _fresh(filed)
    reader = session.rollout.control._file
    out = {"frames": [], "rows": [], "read": [reader._pos]}
    for _ in range(BLOCKS):
        out["frames"].append(session.step())
        out["rows"].append(session.last.timings())
        out["read"].append(reader._pos)
    return out


def test_streamed_frames_give_the_file_driven_video(clip, live, file_run):
    session = _fresh(live)
    assert session.waiting_for_frames
    for step in range(BLOCKS):
        lo, hi = _block_range(step)
        assert session.push_frames(np.stack(clip["frames"][lo:hi])) == lo
        assert not session.waiting_for_frames
        torch.testing.assert_close(session.step(), file_run["frames"][step], rtol=0, atol=0)
    assert session.last.state == {"hdmap_latent_frames": 2 * BLOCKS, "hdmap_next_frame": hi}


def test_pushed_frames_replace_the_files_missing_ones_come_from_it(clip, filed, live, file_run):
    mixed = clip["other"][5:9] + clip["frames"][9:13]  # block 1: 4 other frames, 4 of the file
    session = _fresh(live)
    session.push_frames(np.stack(clip["frames"][:5]))
    session.step()
    session.push_frames(np.stack(mixed))
    want = session.step()
    session = _fresh(filed)
    torch.testing.assert_close(session.step(), file_run["frames"][0], rtol=0, atol=0)
    session.push_frames(np.stack(clip["other"][5:9]), 5)  # frames 9..12: nobody pushed them
    got = session.step()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert (got - file_run["frames"][1]).abs().max() > 1e-3  # the pushed frames steered it


def test_without_input_the_last_frame_repeats(clip, live):
    session = _fresh(live)
    assert session.pending_frames == 0
    session.push_frames(np.stack(clip["frames"][:5]))
    assert session.pending_frames == 5  # what a server counts against max_ahead_frames
    session.step()
    assert session.pending_frames == 0
    skipped = session.step()  # frames 5..12: nobody pushed them, no file
    session = _fresh(live)
    session.push_frames(np.stack(clip["frames"][:5]))
    session.step()
    session.push_frames(np.stack([clip["frames"][4]] * 8))
    torch.testing.assert_close(session.step(), skipped, rtol=0, atol=0)


def test_late_and_far_ahead_frames_are_refused_and_the_stream_goes_on(clip, live):
    session = _fresh(live)
    frame = np.stack(clip["frames"][:1])
    with pytest.raises(ValueError, match="too far ahead") as err:
        session.push_frames(np.repeat(frame, 9, axis=0), 0)
    assert "control.max_ahead_frames=8" in str(err.value) and "\n" not in str(err.value)
    session.push_frames(frame, 0)
    session.step()
    with pytest.raises(ValueError, match="too late"):
        session.push_frames(frame, 4)
    with pytest.raises(ValueError, match="aspect ratio"):
        session.push_frames(np.zeros((1, SIZE, 2 * SIZE, 3), np.uint8), 5)
    with pytest.raises(ValueError, match=r"\(T, H, W, 3\) uint8"):
        session.push_frames(np.zeros((1, SIZE, SIZE, 3), np.float32), 5)
    session.push_frames(np.zeros((1, 2 * SIZE, 2 * SIZE, 3), np.uint8), 5)  # resized to the run
    assert session.step().shape[1] == 8


def test_the_file_is_read_block_by_block(file_run):
    # nothing decoded before the first step, then only as far as each block needs
    assert file_run["read"] == [-1, *(_block_range(i)[1] - 1 for i in range(BLOCKS))]


def test_prompt_switch_recaches_with_the_hdmap_latents_it_kept(filed):
    session = _fresh(filed, blocks=3)
    session.step()
    session.step()
    session.set_prompt("a road at night")
    frames = session.step()  # replays frames 0..3 (kept: the first 2 and the last 2)
    assert frames.shape[1] == 8 and session.prompt_version == 1
    assert sorted(session.rollout.control._latents) == [0, 1, 4, 5]


def test_the_hdmap_encode_is_its_own_stage(file_run):
    for row in file_run["rows"]:
        assert row["control_ms"] > 0 and row["step_ms"] == pytest.approx(
            row["encode_ms"] + row["control_ms"] + row["diffuse_ms"] + row["decode_ms"]
        )
