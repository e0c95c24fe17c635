"""Camera geometry of LingBot-World conditioning: resampling, relative poses, ray maps, keys.

Conventions: poses are camera-to-world (c2w) 4 x 4 matrices in the OpenCV camera convention
(x right, y down, z forward); intrinsics are pinhole ``(fx, fy, cx, cy)`` in pixels. All math
runs in float64 on the CPU (a few poses per block), ray maps are returned in float32.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

# ---------------------------------------------------------------------- rotations


def rotation_to_quaternion(rot: torch.Tensor) -> torch.Tensor:
    """(N, 3, 3) rotation matrices -> (N, 4) unit quaternions (w, x, y, z), w >= 0."""
    m = rot.double()
    # the four candidate squared components; the largest gives a stable branch per matrix
    trace = m[:, 0, 0] + m[:, 1, 1] + m[:, 2, 2]
    cands = torch.stack([1 + trace, 1 + m[:, 0, 0] - m[:, 1, 1] - m[:, 2, 2],
                         1 - m[:, 0, 0] + m[:, 1, 1] - m[:, 2, 2],
                         1 - m[:, 0, 0] - m[:, 1, 1] + m[:, 2, 2]], dim=1)  # fmt: skip
    best = cands.argmax(dim=1)
    out = torch.empty(m.shape[0], 4, dtype=torch.float64)
    for i in range(m.shape[0]):
        r, k = m[i], int(best[i])
        s = 2.0 * math.sqrt(max(float(cands[i, k]), 1e-300))
        if k == 0:
            q = [s / 4, (r[2, 1] - r[1, 2]) / s, (r[0, 2] - r[2, 0]) / s, (r[1, 0] - r[0, 1]) / s]
        elif k == 1:
            q = [(r[2, 1] - r[1, 2]) / s, s / 4, (r[0, 1] + r[1, 0]) / s, (r[0, 2] + r[2, 0]) / s]
        elif k == 2:
            q = [(r[0, 2] - r[2, 0]) / s, (r[0, 1] + r[1, 0]) / s, s / 4, (r[1, 2] + r[2, 1]) / s]
        else:
            q = [(r[1, 0] - r[0, 1]) / s, (r[0, 2] + r[2, 0]) / s, (r[1, 2] + r[2, 1]) / s, s / 4]
        out[i] = torch.tensor([float(v) for v in q], dtype=torch.float64)
    out = out / out.norm(dim=1, keepdim=True)
    return torch.where(out[:, :1] < 0, -out, out)


def quaternion_to_rotation(q: torch.Tensor) -> torch.Tensor:
    """(N, 4) quaternions (w, x, y, z) -> (N, 3, 3) rotation matrices."""
    w, x, y, z = (q / q.norm(dim=1, keepdim=True)).double().unbind(1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], dim=1).view(-1, 3, 3)  # fmt: skip


def _slerp(q0: torch.Tensor, q1: torch.Tensor, t: float) -> torch.Tensor:
    dot = float((q0 * q1).sum())
    if dot > 0.9995:  # nearly parallel: normalized lerp
        q = q0 + t * (q1 - q0)
        return q / q.norm()
    theta = math.acos(max(-1.0, min(1.0, dot)))
    return (math.sin((1 - t) * theta) * q0 + math.sin(t * theta) * q1) / math.sin(theta)


def resample_poses(c2w: torch.Tensor, targets: Iterable[float]) -> torch.Tensor:
    """Poses at fractional source-frame indices: slerp of rotations, lerp of translations.

    As the LingBot-World reference (``interpolate_camera_poses``): quaternion signs are made
    continuous first, so consecutive rotations interpolate along the short arc.

    Args:
        c2w: (T, 4, 4) source poses, one per source frame 0..T-1.
        targets: indices in [0, T - 1].

    Returns:
        (N, 4, 4) float64 poses.
    """
    c2w = c2w.double()
    quats = rotation_to_quaternion(c2w[:, :3, :3])
    for i in range(1, len(quats)):
        if float((quats[i] * quats[i - 1]).sum()) < 0:
            quats[i] = -quats[i]
    out = []
    last = c2w.shape[0] - 1
    for target in targets:
        i0 = min(int(math.floor(target)), max(last - 1, 0))
        i1, frac = min(i0 + 1, last), float(target) - i0
        pose = torch.eye(4, dtype=torch.float64)
        q = _slerp(quats[i0], quats[i1], frac) if i1 != i0 else quats[i0]
        pose[:3, :3] = quaternion_to_rotation(q[None])[0]
        pose[:3, 3] = (1 - frac) * c2w[i0, :3, 3] + frac * c2w[i1, :3, 3]
        out.append(pose)
    return torch.stack(out)


# ---------------------------------------------------------------------- relative poses


def invert_pose(pose: torch.Tensor) -> torch.Tensor:
    """Inverse of rigid (..., 4, 4) transforms."""
    inv = torch.zeros_like(pose)
    rot_t = pose[..., :3, :3].transpose(-1, -2)
    inv[..., :3, :3] = rot_t
    inv[..., :3, 3:] = -rot_t @ pose[..., :3, 3:]
    inv[..., 3, 3] = 1
    return inv


def framewise_relative(c2w: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
    """Each pose relative to the one before it: ``inv(c2w[k-1]) @ c2w[k]``.

    The first pose is relative to ``previous`` (the last pose of the previous block), or the
    identity at the start of a clip, as LingBot-World's ``compute_relative_poses(framewise=True)``.

    Args:
        c2w: (N, 4, 4) absolute poses.
        previous: (4, 4) pose before ``c2w[0]``, or None.

    Returns:
        (N, 4, 4) float64 relative poses.
    """
    c2w = c2w.double()
    before = torch.cat([c2w[:1] if previous is None else previous.double()[None], c2w[:-1]])
    return invert_pose(before) @ c2w


def translation_scale(c2w: torch.Tensor) -> float:
    """The reference's normalization: the largest framewise translation of a trajectory (1 if
    the camera does not move)."""
    norms = framewise_relative(c2w)[:, :3, 3].norm(dim=-1)
    top = float(norms.max()) if norms.numel() else 0.0
    return top if top > 0 else 1.0


# ---------------------------------------------------------------------- rays


def scale_intrinsics(k: torch.Tensor, src_hw: tuple[int, int], dst_hw: tuple[int, int]):
    """(..., 4) ``fx, fy, cx, cy`` given at ``src_hw`` pixels, rescaled to ``dst_hw`` (no crop)."""
    sy, sx = dst_hw[0] / src_hw[0], dst_hw[1] / src_hw[1]
    return k.double() * torch.tensor([sx, sy, sx, sy], dtype=torch.float64)


def ray_maps(rel: torch.Tensor, k: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Per-pixel ``[origin, direction]`` of each camera (the reference's Plücker-style rays).

    Pixel centres ``(u + 0.5, v + 0.5)`` are back-projected to unit directions in the camera
    frame and rotated by the pose; the origin is the pose's translation.

    Args:
        rel: (N, 4, 4) poses (relative, as fed to the model).
        k: (4,) or (N, 4) intrinsics at (height, width).
        height: pixel rows.
        width: pixel columns.

    Returns:
        (N, 6, height, width) float32.
    """
    n = rel.shape[0]
    k = k.double().expand(n, 4)
    v, u = torch.meshgrid(torch.arange(height, dtype=torch.float64) + 0.5,
                          torch.arange(width, dtype=torch.float64) + 0.5, indexing="ij")  # fmt: skip
    fx, fy, cx, cy = (c[:, None, None] for c in k.unbind(1))
    dirs = torch.stack([(u - cx) / fx, (v - cy) / fy, torch.ones_like(u).expand(n, -1, -1)], -1)
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)  # (N, H, W, 3) camera frame
    dirs = torch.einsum("nij,nhwj->nihw", rel.double()[:, :3, :3], dirs)
    origin = rel.double()[:, :3, 3, None, None].expand(n, 3, height, width)
    return torch.cat([origin, dirs], dim=1).float()


def fold_rays(rays: torch.Tensor, factor: int) -> torch.Tensor:
    """(N, C, H, W) pixel rays -> (C * factor^2, N, H / factor, W / factor), channels (c, dy, dx).

    LingBot-World folds each ``factor x factor`` pixel tile of a frame into channels
    (``f (h c1) (w c2) c -> f h w (c c1 c2)``); one latent frame takes one pose.
    """
    n, c, h, w = rays.shape
    x = rays.reshape(n, c, h // factor, factor, w // factor, factor)
    x = x.permute(1, 3, 5, 0, 2, 4)  # (C, dy, dx, N, h, w)
    return x.reshape(c * factor * factor, n, h // factor, w // factor)


# ---------------------------------------------------------------------- live keys


def _axis_rotation(axis: int, angle: float) -> torch.Tensor:
    c, s = math.cos(angle), math.sin(angle)
    i, j = [a for a in range(3) if a != axis]
    rot = torch.eye(3, dtype=torch.float64)
    rot[i, i], rot[i, j], rot[j, i], rot[j, j] = c, -s, s, c
    if axis == 1:  # rotation about y keeps the right-handed sign (z -> x for positive angles)
        rot[i, j], rot[j, i] = s, -s
    return rot


class PoseIntegrator:
    """Integrates held keys into the next camera pose, one latent frame at a time.

    Keys: ``w``/``s`` move forward/back along the camera's heading on the ground plane,
    ``q``/``e`` strafe left/right, ``a``/``d`` yaw left/right about the world vertical,
    ``i``/``k`` pitch up/down about the camera's x axis (clamped to +-``max_pitch_deg``). As in
    LingBot-World's keyboard-to-trajectory helper: yaw is applied in the world frame, pitch in
    the camera frame, translation stays horizontal. OpenCV frame: y is down, so "up" is -y.

    Args:
        move: translation per latent frame (the reference normalizes translations to unit max).
        turn_deg: rotation per latent frame in degrees.
        max_pitch_deg: pitch limit.
    """

    KEYS = frozenset("wsqeadik")

    def __init__(self, move: float = 1.0, turn_deg: float = 8.0, max_pitch_deg: float = 85.0):
        self.move, self.turn = move, math.radians(turn_deg)
        self.max_pitch = math.radians(max_pitch_deg)
        self.pitch = 0.0

    def step(self, pose: torch.Tensor, keys: Iterable[str]) -> torch.Tensor:
        """The (4, 4) pose one latent frame after ``pose`` with ``keys`` held."""
        keys = {str(k).lower() for k in keys} & self.KEYS
        rot, pos = pose.double()[:3, :3], pose.double()[:3, 3]
        pitch = self.turn * (("i" in keys) - ("k" in keys))
        if abs(self.pitch + pitch) > self.max_pitch:
            pitch = 0.0
        self.pitch += pitch
        yaw = self.turn * (("d" in keys) - ("a" in keys))
        rot = _axis_rotation(1, yaw) @ rot @ _axis_rotation(0, pitch)
        forward = torch.tensor([rot[0, 2], 0.0, rot[2, 2]], dtype=torch.float64)
        right = torch.tensor([rot[0, 0], 0.0, rot[2, 0]], dtype=torch.float64)
        forward, right = (v / v.norm() if v.norm() > 1e-9 else v for v in (forward, right))
        step = forward * (("w" in keys) - ("s" in keys)) + right * (("e" in keys) - ("q" in keys))
        if step.norm() > 0:
            step = step / step.norm() * self.move
        out = torch.eye(4, dtype=torch.float64)
        out[:3, :3], out[:3, 3] = rot, pos + step
        return out
