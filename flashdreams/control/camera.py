"""LingBot-World camera control: per-frame camera ray maps from a pose file and/or live keys."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flashdreams import ConfigError
from flashdreams.conditioner.camera_geometry import (
    PoseIntegrator,
    fold_rays,
    framewise_relative,
    ray_maps,
    resample_poses,
    scale_intrinsics,
    translation_scale,
)
from flashdreams.control.base import ControlEncoder
from flashdreams.model.base import ConditionInput

RIGID_TOL = 1e-3  # max |R^T R - I| and |det R - 1| of an accepted rotation


def _load_npy(path: str, setting: str) -> np.ndarray:
    if not Path(path).is_file():
        raise ConfigError(f"{setting}={path!r} does not exist")
    try:
        return np.load(path, allow_pickle=False)
    except Exception as err:  # noqa: BLE001  (numpy raises several types for bad files)
        raise ConfigError(f"{setting}={path!r} is not a .npy array "
                          f"({type(err).__name__}: {str(err).splitlines()[0]})") from None  # fmt: skip


def load_poses(path: str, setting: str = "poses") -> torch.Tensor:
    """(T, 4, 4) float64 camera-to-world poses (OpenCV) from a ``.npy`` file, validated.

    Raises:
        ConfigError: one line naming ``setting``: wrong shape, NaN/inf, non-rigid rotation.
    """
    arr = _load_npy(path, setting)
    if arr.ndim != 3 or arr.shape[1:] != (4, 4) or arr.shape[0] < 1 or arr.dtype.kind not in "fiu":
        raise ConfigError(f"{setting}={path!r}: expected camera-to-world poses of shape "
                          f"[T, 4, 4], got {list(arr.shape)} ({arr.dtype})")  # fmt: skip
    poses = torch.from_numpy(arr.astype(np.float64))
    bad = (~torch.isfinite(poses)).flatten(1).any(1).nonzero()
    if len(bad):
        raise ConfigError(f"{setting}={path!r}: pose {int(bad[0])} holds NaN or inf")
    bottom = (poses[:, 3] - torch.tensor([0.0, 0.0, 0.0, 1.0])).abs().amax(1)
    rot = poses[:, :3, :3]
    ortho = (rot.transpose(1, 2) @ rot - torch.eye(3, dtype=torch.float64)).abs().flatten(1)
    det = torch.linalg.det(rot)
    for i in range(poses.shape[0]):
        if bottom[i] > RIGID_TOL:
            raise ConfigError(f"{setting}={path!r}: pose {i} has last row "
                              f"{poses[i, 3].tolist()}, not [0, 0, 0, 1]")  # fmt: skip
        if ortho[i].max() > RIGID_TOL or abs(det[i] - 1) > RIGID_TOL:
            raise ConfigError(f"{setting}={path!r}: pose {i} is not rigid (rotation with "
                              f"|R^T R - I| = {ortho[i].max():.3g}, det {det[i]:.3g})")  # fmt: skip
    return poses


def load_intrinsics(path: str, setting: str = "intrinsics") -> torch.Tensor:
    """(T, 4) float64 ``fx, fy, cx, cy`` in pixels from a ``.npy`` file ([4] is one frame)."""
    arr = _load_npy(path, setting)
    arr = arr[None] if arr.ndim == 1 else arr
    if arr.ndim != 2 or arr.shape[1] != 4 or arr.shape[0] < 1 or arr.dtype.kind not in "fiu":
        raise ConfigError(f"{setting}={path!r}: expected intrinsics of shape [T, 4] "
                          f"(fx, fy, cx, cy), got {list(arr.shape)} ({arr.dtype})")  # fmt: skip
    k = torch.from_numpy(arr.astype(np.float64))
    if not torch.isfinite(k).all() or (k[:, :2] <= 0).any():
        raise ConfigError(f"{setting}={path!r}: intrinsics must be finite with fx, fy > 0")
    return k


class CameraControl(ControlEncoder):
    """LingBot-World: camera ray maps of every latent frame, the DiT's ``camera`` input.

    The camera trajectory is a list of absolute c2w poses at the latent cadence (latent frame
    ``n`` takes video frame ``tf * n``, ``tf`` the VAE's temporal factor): from ``poses`` (video
    frames resampled as the reference does), continued live by held keys
    (``set_control({"keys": [...]})``, see ``PoseIntegrator``) past its end, or from the keys
    alone. Each latent frame's pose is made relative to the frame before it (the first frame of
    a block to the previous block's last frame; frame 0 is the identity). Translations from the
    file are divided by its largest such step over the frames of the clip (the reference cuts
    the file to the clip first, then normalizes; an endless stream uses the whole file); live
    steps are unit length. The rays of every video pixel are folded ``fold x fold`` into
    channels: ``inputs(start, num)["camera"]`` is (B, 6 * fold^2, num, h, w).

    Args:
        poses: path of a [T, 4, 4] ``.npy`` of c2w poses per video frame, or None.
        intrinsics: path of a [T, 4] ``.npy`` (fx, fy, cx, cy; the first row is used), or None
            (fx = fy = the larger side, centred).
        intrinsics_size: (height, width) in pixels the intrinsics refer to; rescaled to the run.
        fold: pixels per latent pixel along each axis (the VAE's spatial factor).
        temporal_factor: video frames per latent frame.
        move: live translation per latent frame.
        turn_deg: live rotation per latent frame.
    """

    def __init__(self, poses: str | None = None, intrinsics: str | None = None,
                 intrinsics_size=(480, 832), fold: int = 8, temporal_factor: int = 4,
                 move: float = 1.0, turn_deg: float = 8.0) -> None:  # fmt: skip
        super().__init__()
        self.fold, self.tf = fold, temporal_factor
        self.channels = 6 * fold * fold
        self.file_poses = load_poses(poses) if poses else None
        self.poses_path = poses
        self.file_k = load_intrinsics(intrinsics)[0] if intrinsics else None
        self.intrinsics_size = tuple(intrinsics_size)
        self.move, self.turn_deg = move, turn_deg
        self.keys: list[str] = []
        self._cached = None

    def provides(self) -> dict[str, ConditionInput]:
        return {"camera": ConditionInput.per_latent_pixel("camera", self.channels)}

    # ------------------------------------------------------------------ clip
    def prepare(self, batch, *, height, width, num_frames, device) -> None:
        """Start a clip of ``num_frames`` latent frames (None: an endless stream)."""
        self.batch = batch
        self.size, self.device = (height, width), device
        self.latent_hw = (height // self.fold, width // self.fold)
        if self.file_k is None:
            side = float(max(height, width))
            self.k = torch.tensor([side, side, width / 2, height / 2], dtype=torch.float64)
        else:
            self.k = scale_intrinsics(self.file_k, self.intrinsics_size, (height, width))
        self.poses = self._file_trajectory(num_frames)
        self.num_file_frames = len(self.poses) if self.file_poses is not None else 0
        self.scale = translation_scale(torch.stack(self.poses)) if self.num_file_frames else 1.0
        self.integrator = PoseIntegrator(self.move, self.turn_deg)
        self.keys, self._cached, self._last = [], None, None

    def _file_trajectory(self, num_frames: int | None) -> list[torch.Tensor]:
        """Latent-cadence poses of the file, cut to the clip (all of them when endless)."""
        if self.file_poses is None:
            return [torch.eye(4, dtype=torch.float64)]
        usable = self.check_frames(num_frames or 1)
        if num_frames is not None:  # the reference cuts the trajectory to the clip first
            usable = min(usable, (num_frames - 1) * self.tf + 1)
        targets = [self.tf * n for n in range((usable - 1) // self.tf + 1)]
        return list(resample_poses(self.file_poses[:usable], targets))

    def check_frames(self, num_frames: int) -> int:
        """Fail in one line when the pose file is too short for ``num_frames`` latent frames.

        Returns:
            The usable video frames of the file (4n + 1), 0 without a file.
        """
        if self.file_poses is None:
            return 0
        usable = (self.file_poses.shape[0] - 1) // self.tf * self.tf + 1  # 4n + 1 video frames
        latent = (usable - 1) // self.tf + 1
        if latent < num_frames:
            raise ConfigError(
                f"poses={self.poses_path!r}: {self.file_poses.shape[0]} poses cover {latent} "
                f"latent frames, the run needs {num_frames} ({(num_frames - 1) * self.tf + 1} "
                f"video frames); pass a longer trajectory or fewer rollout.total_blocks"
            )
        return usable

    # ------------------------------------------------------------------ camera
    def live_control(self) -> dict[str, Any]:
        return {"keys": sorted(PoseIntegrator.KEYS), "mouse": False}

    def set_control(self, control: dict[str, Any] | None) -> None:
        """Keys held for the frames generated next (``{"keys": ["w", "d"]}``; None: none)."""
        keys = (control or {}).get("keys", [])
        self.keys = [k for k in keys if isinstance(k, str)] if isinstance(keys, list) else []

    def relative_poses(self, start: int, num: int) -> torch.Tensor:
        """(num, 4, 4) poses of frames [start, start + num) as the model receives them."""
        while len(self.poses) < start + num:
            self.poses.append(self.integrator.step(self.poses[-1], self.keys))
        previous = self.poses[start - 1] if start > 0 else None
        rel = framewise_relative(torch.stack(self.poses[start : start + num]), previous)
        from_file = torch.arange(start, start + num) < self.num_file_frames
        rel[from_file, :3, 3] /= self.scale
        return rel

    def inputs(self, start: int, num: int) -> dict[str, torch.Tensor]:
        """``camera``: (B, 6 * fold^2, num, h, w) folded rays of frames [start, start + num)."""
        if self._cached is not None and self._cached[0] == (start, num):
            return {"camera": self._cached[1]}
        rel = self.relative_poses(start, num)
        rays = fold_rays(ray_maps(rel, self.k, *self.size), self.fold)  # (C, num, h, w)
        feats = rays[None].expand(self.batch, -1, -1, -1, -1).to(self.device)
        self._cached, self._last = ((start, num), feats), start + num - 1
        return {"camera": feats}

    def state(self) -> dict[str, Any] | None:
        """Absolute pose of the last frame given to the model: position, yaw, pitch (degrees)."""
        if self._last is None:
            return None
        pose = self.poses[self._last]
        fwd = pose[:3, 2]
        yaw = math.degrees(math.atan2(float(fwd[0]), float(fwd[2])))
        pitch = math.degrees(math.atan2(-float(fwd[1]), math.hypot(float(fwd[0]), float(fwd[2]))))
        return {"frame": self._last, "position": [round(float(v), 4) for v in pose[:3, 3]],
                "yaw_deg": round(yaw, 3), "pitch_deg": round(pitch, 3)}  # fmt: skip
