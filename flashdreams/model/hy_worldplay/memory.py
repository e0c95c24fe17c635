"""HY-WorldPlay's memory: which history frames a block re-runs (``select_mem_frames_wan``).

A block of ``block`` frames starting at frame ``start`` attends to ``context`` history frames:
all earlier frames while there are at most ``context`` of them, then the ``recent`` latest ones
plus the historical ``block``-frame clips whose cameras see most of what the block's cameras
see. A clip starting at frame ``h`` (``h`` = 0, 4, 8, ... before the recent frames) is scored
by the mean over the block's frames ``q`` of ``1 - overlap(q, h)`` and ``1 - overlap(q, h + 2)``
averaged; clips are taken in order of increasing score (ties: the earlier clip) until
``context - recent`` frames are chosen; the selection is returned sorted.

``overlap(q, h)`` is a Monte-Carlo field-of-view overlap: points drawn uniformly in a ball of
radius ``radius`` around camera ``q`` (a seeded draw, the same for every pair), the share of
those inside q's frustum (|azimuth| < fov_h / 2, |elevation| < fov_v / 2 around its viewing
direction) that are also inside h's frustum and closer than ``radius`` to h's centre, with h
expressed in q's camera frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MemoryConfig:
    """Knobs of the selection (the release's values as defaults)."""

    context: int = 16  # history frames a block attends to (memory_frames)
    recent: int = 12  # latest frames always kept (temporal_context_size)
    block: int = 4  # frames per block and per historical clip (pred_latent_size)
    points: int = 50_000  # Monte-Carlo points
    radius: float = 8.0  # radius of the sampled ball and of h's visibility
    fov_deg: tuple[float, float] = (60.0, 35.0)  # horizontal, vertical field of view
    seed: int = 0  # seed of the point draw


def sphere_points(n: int, radius: float, seed: int) -> torch.Tensor:
    """(n, 3) fp32 CPU points uniform in a ball: radius r * u^(1/3), azimuth 2 pi v, polar
    acos(1 - 2 w), with u, v, w drawn in that order from a CPU generator seeded ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    u, v, w = (torch.rand(n, generator=gen) for _ in range(3))
    r = radius * u.pow(1.0 / 3.0)
    phi = 2 * math.pi * v
    theta = torch.acos(1 - 2 * w)
    return torch.stack(
        [r * theta.sin() * phi.cos(), r * theta.sin() * phi.sin(), r * theta.cos()], dim=1
    )


def _angles(vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Azimuth atan2(x, z) and elevation atan2(y, |(x, z)|) in degrees."""
    x, y, z = vectors.unbind(-1)
    return torch.rad2deg(torch.atan2(x, z)), torch.rad2deg(torch.atan2(y, torch.hypot(x, z)))


def _wrap(deg: torch.Tensor) -> torch.Tensor:
    return torch.remainder(deg + 180.0, 360.0) - 180.0


def fov_overlap(w2c_query: torch.Tensor, w2c_hist: torch.Tensor, points: torch.Tensor,
                cfg: MemoryConfig, chunk: int = 64) -> torch.Tensor:  # fmt: skip
    """Overlap share for pairs: (N, 4, 4) query and history world-to-camera -> (N,) fp32
    (``chunk`` pairs at a time: N x points x 3 floats would not stay small)."""
    if w2c_query.shape[0] > chunk:
        parts = [fov_overlap(w2c_query[i : i + chunk], w2c_hist[i : i + chunk], points, cfg)
                 for i in range(0, w2c_query.shape[0], chunk)]  # fmt: skip
        return torch.cat(parts)
    rel = w2c_hist.float() @ torch.linalg.inv(w2c_query.float())  # h's w2c in q's camera frame
    rot, trans = rel[:, :3, :3], rel[:, :3, 3]
    centre = -(rot.transpose(1, 2) @ trans[..., None]).squeeze(-1)  # (N, 3)
    view_az, view_el = _angles(rot[:, 2, :])  # h's viewing direction (row 3 of its rotation)
    half_h, half_v = cfg.fov_deg[0] / 2.0, cfg.fov_deg[1] / 2.0
    az, el = _angles(points)  # q sits at the origin looking down +z
    in_query = (_wrap(az).abs() < half_h) & (_wrap(el).abs() < half_v)  # (P,)
    vec = points[None] - centre[:, None]  # (N, P, 3)
    az_h, el_h = _angles(vec)
    in_hist = (_wrap(az_h - view_az[:, None]).abs() < half_h) & (
        _wrap(el_h - view_el[:, None]).abs() < half_v
    )
    in_hist &= vec.norm(dim=-1) < cfg.radius
    seen = in_query.sum().float().clamp_min(1.0)  # no point in view: overlap 0
    return (in_hist & in_query[None]).sum(1).float() / seen


def select_memory(w2c: torch.Tensor, start: int, cfg: MemoryConfig,
                  points: torch.Tensor) -> list[int]:  # fmt: skip
    """History frames of the block at ``start`` (sorted), from world-to-camera matrices
    ``w2c`` (T, 4, 4) of frames [0, T), T > start (the block's own frames included)."""
    if start <= cfg.context:
        return list(range(start))
    recent = list(range(max(0, start - cfg.recent), start))
    clips = list(range(0, start - cfg.recent, cfg.block))
    queries = list(range(start, min(start + cfg.block, w2c.shape[0])))
    if not queries:
        raise IndexError(f"no camera for frame {start} (the trajectory has {w2c.shape[0]})")
    pairs_q = [q for h in clips for _ in (0, 2) for q in queries]
    pairs_h = [h + o for h in clips for o in (0, 2) for _ in queries]
    overlap = fov_overlap(w2c[pairs_q], w2c[pairs_h], points, cfg)
    dist = (1.0 - overlap.double()).view(len(clips), 2, len(queries))
    scores = (dist.mean(1).sum(1) / len(queries)).tolist()  # one host read
    order = sorted(range(len(clips)), key=lambda i: scores[i])  # stable: ties keep order
    memory: list[int] = []
    for i in order:
        if len(memory) >= cfg.context - cfg.recent:
            break
        memory.extend(range(clips[i], clips[i] + cfg.block))
    return sorted(set(recent) | set(memory))
