"""HY-WorldPlay's memory selection on hand-built trajectories (``select_mem_frames_wan``).

Cameras are OpenCV-style world-to-camera matrices (z forward). A block of 4 frames at ``start``
keeps the 12 latest frames and one historical 4-frame clip (starts 0, 4, ... before them),
the one whose cameras (its frames 0 and 2) see most of what the block's cameras see.
"""

from __future__ import annotations

import math

import torch

from flashdreams.model.hy_worldplay.memory import (
    MemoryConfig,
    fov_overlap,
    select_memory,
    sphere_points,
)

CFG = MemoryConfig(points=20_000)  # fewer points than the release's 50 k: the picks are clear
POINTS = sphere_points(CFG.points, CFG.radius, CFG.seed)


def camera(x: float = 0.0, z: float = 0.0, yaw_deg: float = 0.0) -> torch.Tensor:
    """w2c of a camera at (x, 0, z) turned ``yaw_deg`` about y (0: looking down +z)."""
    a = math.radians(yaw_deg)
    c2w = torch.eye(4)
    c2w[0, 0], c2w[0, 2], c2w[2, 0], c2w[2, 2] = math.cos(a), math.sin(a), -math.sin(a), math.cos(a)
    c2w[0, 3], c2w[2, 3] = x, z
    return torch.linalg.inv(c2w)


def test_overlap_of_the_same_and_the_opposite_view():
    same = fov_overlap(camera()[None], camera()[None], POINTS, CFG)
    behind = fov_overlap(camera()[None], camera(yaw_deg=180)[None], POINTS, CFG)
    far = fov_overlap(camera()[None], camera(x=100.0)[None], POINTS, CFG)
    assert float(same) == 1.0 and float(behind) == 0.0 and float(far) == 0.0


def test_the_draw_is_seeded():
    assert torch.equal(sphere_points(100, 8.0, 3), sphere_points(100, 8.0, 3))
    assert not torch.equal(sphere_points(100, 8.0, 3), sphere_points(100, 8.0, 4))
    inside = sphere_points(5000, 8.0, 0).norm(dim=1)
    assert inside.max() <= 8.0 and inside.mean() > 5.5  # uniform in the ball: mean r = 6


def test_all_earlier_frames_until_the_memory_is_full():
    w2c = torch.stack([camera(z=0.1 * i) for i in range(24)])
    assert select_memory(w2c, 4, CFG, POINTS) == [0, 1, 2, 3]
    assert select_memory(w2c, 16, CFG, POINTS) == list(range(16))


def test_straight_line_keeps_the_nearest_clip():
    # walking forward 0.3 a frame: at frame 20 the clip [4, 8) is 4.8 behind, [0, 4) 6 behind;
    # the nearer one sees more of the same view
    w2c = torch.stack([camera(z=0.3 * i) for i in range(24)])
    assert select_memory(w2c, 20, CFG, POINTS) == list(range(4, 20))


def test_a_turn_back_keeps_the_clip_that_looked_that_way():
    # frames 0-3 look back (yaw 180), 4-19 forward, the block turns back to 180: clip [0, 4)
    # shares its view, clip [4, 8) looks the opposite way
    yaws = [180] * 4 + [0] * 16 + [180] * 4
    w2c = torch.stack([camera(yaw_deg=y) for y in yaws])
    assert select_memory(w2c, 20, CFG, POINTS) == [0, 1, 2, 3, *range(8, 20)]


def test_loop_back_to_the_start_recalls_the_first_clip():
    # a square loop of side 20: out along +z, across, back, home; frames 28-31 stand where
    # frames 0-3 stood, looking the same way; every other clip is far away or turned
    path = [(0.0, 0.0, 0)] * 4
    path += [(0.0, 5.0 * k, 0) for k in range(1, 5)]  # 4-7: up to z = 20
    path += [(5.0 * k, 20.0, 90) for k in range(1, 5)]  # 8-11: across to x = 20
    path += [(20.0, 20.0 - 5.0 * k, 180) for k in range(1, 5)]  # 12-15: down to z = 0
    path += [(20.0 - 5.0 * k, 0.0, 270) for k in range(1, 5)]  # 16-19: home
    path += [(0.0, 0.0, 270)] * 8 + [(0.0, 0.0, 0)] * 4  # 20-27 turning home, 28-31 the start
    w2c = torch.stack([camera(x, z, y) for x, z, y in path])
    assert select_memory(w2c, 28, CFG, POINTS) == [0, 1, 2, 3, *range(16, 28)]


def test_ties_keep_the_earlier_clip():
    # every historical clip is far away: all score 1, the first one is taken
    w2c = torch.stack([camera(x=100.0 * (i < 20)) for i in range(24)])
    assert select_memory(w2c, 20, CFG, POINTS) == list(range(4)) + list(range(8, 20))


def test_warm_up_pays_the_first_selection_so_no_step_does(monkeypatch):
    """``Rollout.precapture`` runs the model's ``warm_up`` (every graph policy, once per
    rollout): the points are drawn and one selection scores clips before the first step (on
    CUDA that loads the linear-algebra library block 5 used to pay for); the steps draw no
    points, and the first real selection (block 5: 20 frames of history) is the warm-up's
    shape, not a first call."""
    from flashdreams import Session
    from flashdreams.model.hy_worldplay import memory
    from flashdreams.model.hy_worldplay import model as hy
    from tests.unit.test_config import compose_run
    from tests.unit.test_hy_worldplay_recipe import TINY

    draws, scored = [], []
    draw, overlap = hy.sphere_points, memory.fov_overlap

    def counted_draw(*args):
        draws.append(args)
        return draw(*args)

    def counted_overlap(w2c_query, *args, **kw):
        scored.append(w2c_query.shape[0])
        return overlap(w2c_query, *args, **kw)

    monkeypatch.setattr(hy, "sphere_points", counted_draw)
    monkeypatch.setattr(memory, "fov_overlap", counted_overlap)
    session = Session(compose_run([*TINY, "pose=w-23"]), total_blocks=6)
    assert len(draws) == 1 and scored == [16]  # 2 clips x frames 0, 2 x 4 block cameras
    session.rollout.precapture()  # a later clip's warm-up: nothing again
    assert len(draws) == 1 and scored == [16]
    for _ in range(6):
        session.step()
    assert len(draws) == 1  # no lazy draw inside a step
    assert scored == [16, 16]  # block 5 (frames 20-23): the warm-up's shape
