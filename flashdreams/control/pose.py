"""HY-WorldPlay camera control: a pose string, a trajectory file or live keys -> per-frame
camera matrices, intrinsics and discrete action labels (the DiT's ``viewmats``, ``intrinsics``
and ``action`` inputs).

One camera pose per latent frame, frame 0 the identity (strings and live control) or the file's
first pose. The pose string is the release's grammar: comma-separated ``action-count`` commands
(``w-31``, ``w-20, right-10, d-30, up-36``), each adding ``count`` latent frames of one motion:
``w``/``s`` forward/back and ``a``/``d`` left/right by ``move`` (0.08) along the camera's axes,
``up``/``down`` pitch and ``left``/``right`` yaw by ``turn_deg`` (3 degrees). A trajectory file
is the release's JSON (``{"0": {"extrinsic": c2w 4x4, "K": 3x3 in pixels}, ...}``) or a ``.npy``
of [T, 4, 4] camera-to-world matrices (intrinsics from ``control.intrinsics``).

The model receives world-to-camera matrices, intrinsics normalized as the release does
(``fx / (2 cx)``, ``fy / (2 cy)``) and, per frame, the label ``trans * 9 + rotate`` of the move
from the previous frame (each a 9-way code of forward/back x right/left and yaw right/left x
pitch up/down; frame 0: 0). Past the string or file's frames the live keys continue the path:
W/S/A/D move, arrows turn, the pointer (``mouse: [dx, dy]`` per video frame) turns by
``mouse_deg`` per pixel; no key: the camera stands still.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flashdreams import ConfigError
from flashdreams.control.base import ControlEncoder
from flashdreams.model.base import ConditionInput

ACTIONS = ("w", "s", "a", "d", "up", "down", "left", "right")
LIVE_KEYS = ("w", "s", "a", "d", "arrowup", "arrowdown", "arrowleft", "arrowright")
# (forward, back, right, left) or (yaw right, yaw left, pitch up, pitch down) -> 9-way code
_CODES = {(0, 0, 0, 0): 0, (1, 0, 0, 0): 1, (0, 1, 0, 0): 2, (0, 0, 1, 0): 3, (0, 0, 0, 1): 4,
          (1, 0, 1, 0): 5, (1, 0, 0, 1): 6, (0, 1, 1, 0): 7, (0, 1, 0, 1): 8}  # fmt: skip
MOVE_EPS, TURN_EPS_DEG = 1e-4, 5e-2  # the release's thresholds of a move and of a turn


def parse_pose_string(text: str, move: float, turn_deg: float, setting: str = "pose"):
    """Motions (one dict per latent frame) of a pose string; one-line ``ConfigError`` naming
    ``setting`` and the offending command."""
    motions = []
    turn = math.radians(turn_deg)
    effect = {"w": ("forward", move), "s": ("forward", -move), "a": ("right", -move),
              "d": ("right", move), "up": ("pitch", turn), "down": ("pitch", -turn),
              "left": ("yaw", -turn), "right": ("yaw", turn)}  # fmt: skip
    for command in (c.strip() for c in text.split(",")):
        if not command:
            continue
        parts = command.split("-")
        if len(parts) != 2:
            raise ConfigError(f"{setting}: {command!r} is not 'action-count' (e.g. 'w-31')")
        action, count = parts[0].strip(), parts[1].strip()
        if action not in effect:
            raise ConfigError(f"{setting}: {command!r} has the unknown action {action!r} "
                              f"(actions: {', '.join(ACTIONS)})")  # fmt: skip
        try:
            frames = int(float(count))
        except ValueError:
            raise ConfigError(f"{setting}: {command!r} has the count {count!r}, not a "
                              "number") from None  # fmt: skip
        key, value = effect[action]
        motions += [{key: value} for _ in range(frames)]
    if not motions:
        raise ConfigError(f"{setting}={text!r} holds no motion (e.g. 'w-31')")
    return motions


def _axis(axis: int, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    i, j = [(1, 2), (0, 2), (0, 1)][axis]
    r = np.eye(3)
    r[i, i], r[j, j] = c, c
    r[i, j], r[j, i] = (-s, s) if axis != 1 else (s, -s)
    return r


def step_pose(c2w: np.ndarray, motion: dict[str, float]) -> np.ndarray:
    """The next c2w: yaw, then pitch (about the camera's own axes), then forward and right
    moves along the turned camera's z and x axes."""
    out = c2w.copy()
    if motion.get("yaw"):
        out[:3, :3] = out[:3, :3] @ _axis(1, motion["yaw"])
    if motion.get("pitch"):
        out[:3, :3] = out[:3, :3] @ _axis(0, motion["pitch"])
    for key, local in (("forward", 2), ("right", 0)):
        if motion.get(key):
            out[:3, 3] += out[:3, :3][:, local] * motion[key]
    return out


def action_label(prev: np.ndarray, cur: np.ndarray) -> int:
    """``trans * 9 + rotate`` of the move from c2w ``prev`` to c2w ``cur``."""
    rel = np.linalg.inv(prev) @ cur
    trans, rot = [0, 0, 0, 0], [0, 0, 0, 0]
    norm = float(np.linalg.norm(rel[:3, 3]))
    if norm > MOVE_EPS:
        deg = np.degrees(np.arccos(np.clip(rel[:3, 3] / norm, -1.0, 1.0)))
        trans[0], trans[1] = int(deg[2] < 60), int(deg[2] > 120)  # forward / back
        trans[2], trans[3] = int(deg[0] < 60), int(deg[0] > 120)  # right / left
    r = rel[:3, :3]  # extrinsic x-y-z Euler angles: R = Rz Ry Rx
    pitch = math.degrees(math.atan2(r[2, 1], r[2, 2]))
    yaw = math.degrees(math.asin(float(np.clip(-r[2, 0], -1.0, 1.0))))
    rot[0], rot[1] = int(yaw > TURN_EPS_DEG), int(yaw < -TURN_EPS_DEG)
    rot[2], rot[3] = int(pitch > TURN_EPS_DEG), int(pitch < -TURN_EPS_DEG)
    return _CODES[tuple(trans)] * 9 + _CODES[tuple(rot)]


def _rigid(c2w: np.ndarray, where: str) -> np.ndarray:
    if c2w.shape != (4, 4) or not np.isfinite(c2w).all():
        raise ConfigError(f"{where} is not a finite 4x4 matrix")
    rot = c2w[:3, :3]
    if np.abs(rot.T @ rot - np.eye(3)).max() > 1e-3 or abs(np.linalg.det(rot) - 1) > 1e-3:
        raise ConfigError(f"{where} is not a rigid camera-to-world pose")
    return c2w


def load_trajectory(path: str, default_k: np.ndarray, setting: str = "pose"):
    """(c2w list, K list in pixels) of a release JSON or a [T, 4, 4] ``.npy``."""
    if not Path(path).is_file():
        raise ConfigError(f"{setting}={path!r} does not exist")
    if path.endswith(".npy"):
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as err:  # noqa: BLE001  (numpy raises several types)
            raise ConfigError(f"{setting}={path!r} is not a .npy array ({err})") from None
        if arr.ndim != 3 or arr.shape[1:] != (4, 4) or not len(arr):
            raise ConfigError(f"{setting}={path!r}: expected camera-to-world [T, 4, 4], got "
                              f"{list(arr.shape)}")  # fmt: skip
        c2w = [_rigid(a.astype(np.float64), f"{setting}={path!r}: pose {i}")
               for i, a in enumerate(arr)]  # fmt: skip
        return c2w, [default_k] * len(c2w)
    try:
        data = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{setting}={path!r} is not JSON ({err})") from None
    if not isinstance(data, dict) or not data:
        raise ConfigError(f'{setting}={path!r}: expected {{"0": {{"extrinsic", "K"}}, ...}}')
    c2w, ks = [], []
    for key, entry in data.items():
        where = f"{setting}={path!r}: entry {key!r}"
        try:
            pose = np.asarray(entry["extrinsic"], dtype=np.float64)
            k = np.asarray(entry.get("K", default_k), dtype=np.float64)
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"{where} needs 'extrinsic' (4x4) and 'K' (3x3)") from None
        if k.shape != (3, 3) or k[0, 2] <= 0 or k[1, 2] <= 0 or k[0, 0] <= 0 or k[1, 1] <= 0:
            raise ConfigError(f"{where}: 'K' must be 3x3 with positive fx, fy, cx, cy")
        c2w.append(_rigid(pose, where))
        ks.append(k)
    return c2w, ks


class PoseControl(ControlEncoder):
    """Camera poses, intrinsics and action labels per latent frame (HY-WorldPlay).

    Args:
        pose: a pose string (``w-20, right-10``), a ``.json`` / ``.npy`` trajectory, or None
            (live keys only).
        intrinsics: [fx, fy, cx, cy] in pixels for strings, ``.npy`` files and live frames.
        move: translation per latent frame of ``w/s/a/d``.
        turn_deg: rotation per latent frame of ``up/down/left/right`` and the arrow keys.
        mouse_deg: rotation per pixel of pointer movement per video frame.
        temporal_factor: video frames per latent frame.
    """

    def __init__(self, pose: str | None = None, intrinsics=(969.6969696969696, 969.6969696969696,
                 960.0, 540.0), move: float = 0.08, turn_deg: float = 3.0, mouse_deg: float = 0.1,
                 temporal_factor: int = 4) -> None:  # fmt: skip
        super().__init__()
        if len(intrinsics) != 4 or min(intrinsics) <= 0:
            raise ConfigError(f"control.intrinsics={list(intrinsics)} must be 4 positive "
                              "numbers: fx, fy, cx, cy in pixels")  # fmt: skip
        fx, fy, cx, cy = (float(v) for v in intrinsics)
        self.k = np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1.0]])
        self.move, self.turn_deg, self.mouse_deg, self.tf = (
            move,
            turn_deg,
            mouse_deg,
            temporal_factor,
        )
        self.pose_setting = pose
        c2w, ks = [np.eye(4)], [self.k]
        if pose is not None and str(pose).endswith((".json", ".npy")):
            c2w, ks = load_trajectory(str(pose), self.k)
        elif pose is not None:
            for motion in parse_pose_string(str(pose), move, turn_deg):
                c2w.append(step_pose(c2w[-1], motion))
                ks.append(self.k)
        self.script = (c2w, ks)
        self.live: dict[str, float] = {}
        self.batch, self.device = 1, torch.device("cpu")

    def provides(self) -> dict[str, ConditionInput]:
        return {"action": ConditionInput.per_frame("action", 0),
                "viewmats": ConditionInput("viewmats", lambda b, f, hw: (b, f, 4, 4)),
                "intrinsics": ConditionInput("intrinsics", lambda b, f, hw: (b, f, 3, 3))}  # fmt: skip

    def check_frames(self, num_frames: int) -> None:
        have = len(self.script[0])
        if self.pose_setting is not None and have < num_frames:
            raise ConfigError(f"pose={str(self.pose_setting)!r} gives {have} latent frames, the run "
                              f"needs {num_frames}; add moves (a count of {num_frames - 1} in all) "
                              "or lower rollout.total_blocks")  # fmt: skip

    def prepare(self, batch, *, height, width, num_frames, device) -> None:
        self.batch, self.device = batch, device
        if num_frames is not None:
            self.check_frames(num_frames)
        self.c2w, self.ks = list(self.script[0]), list(self.script[1])
        self.labels = [0] + [
            action_label(a, b) for a, b in zip(self.c2w, self.c2w[1:], strict=False)
        ]
        self.live, self._last = {}, None

    # ------------------------------------------------------------------ live control
    def live_control(self) -> dict[str, Any]:
        return {"keys": list(LIVE_KEYS), "mouse": True}

    def validate(self, control: dict[str, Any]) -> None:
        keys = control.get("keys", [])
        if not isinstance(keys, list):
            raise ConfigError("control.keys must be a list of key names")
        bad = [k for k in (str(k).lower() for k in keys) if k not in LIVE_KEYS]
        if bad:
            raise ConfigError(f"control.keys: {bad[0]!r} is not a key of the pose control "
                              f"(keys: {', '.join(LIVE_KEYS)})")  # fmt: skip

    def set_control(self, control: dict[str, Any] | None) -> None:
        """Keys held and pointer movement for the frames generated next (``{"keys": [...],
        "mouse": [dx, dy]}``); one-line ``ConfigError`` for an unknown key."""
        control = control or {}
        self.validate(control)
        keys = [str(k).lower() for k in control.get("keys", [])]
        turn = math.radians(self.turn_deg)
        motion = {"forward": self.move * (("w" in keys) - ("s" in keys)),
                  "right": self.move * (("d" in keys) - ("a" in keys)),
                  "yaw": turn * (("arrowright" in keys) - ("arrowleft" in keys)),
                  "pitch": turn * (("arrowup" in keys) - ("arrowdown" in keys))}  # fmt: skip
        mouse = control.get("mouse")
        if isinstance(mouse, list) and len(mouse) == 2:
            per_frame = math.radians(self.mouse_deg) * self.tf  # pointer px per video frame
            motion["yaw"] += float(mouse[0]) * per_frame
            motion["pitch"] -= float(mouse[1]) * per_frame  # screen y down -> pitch down
        self.live = {k: v for k, v in motion.items() if v}

    # ------------------------------------------------------------------ inputs
    def _grow(self, frames: int) -> None:
        while len(self.c2w) < frames:
            self.c2w.append(step_pose(self.c2w[-1], self.live))
            self.ks.append(self.k)
            self.labels.append(action_label(self.c2w[-2], self.c2w[-1]))

    def inputs(self, start: int, num: int) -> dict[str, torch.Tensor]:
        """``action`` (B, num), ``viewmats`` (B, num, 4, 4) world-to-camera and ``intrinsics``
        (B, num, 3, 3) normalized, of latent frames [start, start + num)."""
        self._grow(start + num)
        sl = slice(start, start + num)
        w2c = torch.from_numpy(np.linalg.inv(np.stack(self.c2w[sl]))).float()
        ks = np.stack(self.ks[sl]).copy()
        ks[:, 0, 0] /= 2 * ks[:, 0, 2]
        ks[:, 1, 1] /= 2 * ks[:, 1, 2]
        ks[:, 0, 2] = ks[:, 1, 2] = 0.5
        out = {"action": torch.tensor(self.labels[sl], dtype=torch.float32),
               "viewmats": w2c, "intrinsics": torch.from_numpy(ks).float()}  # fmt: skip
        self._last = start + num - 1
        return {k: v[None].expand(self.batch, *v.shape).to(self.device) for k, v in out.items()}

    def state(self) -> dict[str, Any] | None:
        """Position, yaw and pitch (degrees) and action label of the last frame given."""
        if self._last is None:
            return None
        pose = self.c2w[self._last]
        fwd = pose[:3, 2]
        return {"frame": self._last, "position": [round(float(v), 4) for v in pose[:3, 3]],
                "yaw_deg": round(math.degrees(math.atan2(fwd[0], fwd[2])), 3),
                "pitch_deg": round(math.degrees(math.atan2(-fwd[1], math.hypot(fwd[0], fwd[2]))), 3),
                "action": self.labels[self._last]}  # fmt: skip
