"""Matrix-Game 2.0 keyboard / mouse control: per-video-frame actions -> the DiT's action windows.

Matrix-Game's actions are per **video** frame: a keyboard vector (multi-hot, or one-hot for
Temple Run) and, for variants with a mouse, a camera delta ``[pitch, yaw]`` (up and right
positive; the release's camera keys move 0.1 per frame). The model reads, for latent frame
``f``, the window of video frames ``[tf * (f - window), tf * f)`` (12 frames; frames before 0
repeat frame 0): ``inputs(start, num)`` gives ``keyboard`` (B, num, 12, keyboard_dim) and
``mouse`` (B, num, 12, 2).

Actions come from a file, from live control, or both (live control overrides the file from the
step it is given on). A step's live control holds for the video frames of its block: frames
``4 * start - 3 .. 4 * (start + num - 1)`` (block 0: frames 0 .. 4 * (num - 1)), as the release's
streaming inference writes them. A step without live control keeps the file's actions, or idles
(no key, no mouse; Temple Run: its ``nomove`` key) past the file or without one.

Live control: ``{"keys": ["w", "a"], "mouse": [dx, dy]}``; ``keys`` are the variant's keys
(``KEYMAPS``); ``mouse`` is the camera delta of each video frame in **camera units**, the
release's: 0.1 (``CAM``, its ``CAM_VALUE``) is one camera step, the turn a camera key makes per
frame, and every action the release feeds the model (its benchmark generators, its interactive
and web demos) moves each axis by -0.1, 0 or +0.1 per frame. dx > 0 turns right (yaw +), dy > 0
looks down (pitch -): screen axes, as pointer-lock ``movementX/Y``. Camera keys (``i/j/k/l``,
arrows; GTA drive: ``a/d`` steer) add their fixed +-0.1. A frame's camera delta (keys + mouse) is
clamped per axis to ``mouse_max_steps`` camera steps (default 2: +-0.2, twice the release's
range), so a flick or a hostile value never reaches the model unbounded; NaN / inf is a one-line
``ConfigError``.

Pointer pixels are the page's business: the server's ``hello`` announces ``mouse_per_px`` (camera
units per pointer pixel per video frame, 0.1 / ``mouse_pixels_per_step``: 20 px of movement per
video frame turn one camera step by default), and the page sends ``mouse`` = pixels x that.

Action files (per video frame; a clip of T latent frames reads frames up to 4 (T - 1)):

* the release's tensors: ``.pt`` / ``.pth`` (``torch.save``), ``.npz`` or ``.safetensors``
  holding ``keyboard_condition`` (N, keyboard_dim) and, with a mouse, ``mouse_condition``
  (N, 2) (a leading batch dim of 1 is accepted);
* ``.npy``: (N, keyboard_dim + mouse dims) floats, keyboard columns first;
* ``.json``: ``{"actions": [{"keys": ["w"], "mouse": [dx, dy], "frames": 12}, ...]}`` (or the
  bare list): each entry holds its keys / camera delta (the live control's camera units,
  clamped the same way) for ``frames`` video frames (default 4).

The release's tensors and ``.npy`` are the model's inputs as they are: a mouse value beyond
``mouse_max_steps`` camera steps is a one-line ``ConfigError`` (the release's own are +-0.1).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flashdreams import ConfigError
from flashdreams.control.base import ControlEncoder
from flashdreams.model.base import ConditionInput

CAM = 0.1  # the release's camera step per video frame (its CAM_VALUE)


@dataclass(frozen=True)
class Keymap:
    """A released variant's actions.

    Attributes:
        keys: key name -> keyboard dim it sets.
        keyboard_dim: keyboard dims per video frame.
        mouse: whether the variant has a mouse input.
        camera_keys: key name -> fixed [pitch, yaw] per video frame.
        idle: keyboard dim set when no key is pressed (Temple Run's ``nomove``), or None.
        exclusive: at most one key at a time (one-hot keyboard).
    """

    keys: dict[str, int]
    keyboard_dim: int
    mouse: bool
    camera_keys: dict[str, tuple[float, float]] = field(default_factory=dict)
    idle: int | None = None
    exclusive: bool = False


_LOOK = {"i": (CAM, 0.0), "k": (-CAM, 0.0), "j": (0.0, -CAM), "l": (0.0, CAM),
         "arrowup": (CAM, 0.0), "arrowdown": (-CAM, 0.0), "arrowleft": (0.0, -CAM),
         "arrowright": (0.0, CAM)}  # fmt: skip
_STEER = {"a": (0.0, -CAM), "d": (0.0, CAM), "arrowleft": (0.0, -CAM), "arrowright": (0.0, CAM)}
KEYMAPS: dict[str, Keymap] = {
    # forward, back, left, right (multi-hot); mouse = camera
    "universal": Keymap({"w": 0, "s": 1, "a": 2, "d": 3}, 4, True, _LOOK),
    # throttle, brake; A/D steer through the mouse yaw (the release's interactive mapping)
    "gta_drive": Keymap({"w": 0, "s": 1}, 2, True, _STEER),
    # one-hot: nomove, jump, slide, turn left, turn right, left side, right side
    "templerun": Keymap(
        {"w": 1, "space": 1, " ": 1, "s": 2, "z": 3, "c": 4, "a": 5, "d": 6},
        7,
        False,
        idle=0,
        exclusive=True,
    ),
}


class KeyboardMouseControl(ControlEncoder):
    """Keyboard (and mouse) action windows of Matrix-Game 2.0 (``control=keyboard_mouse``).

    Args:
        variant: ``universal``, ``gta_drive`` or ``templerun`` (``KEYMAPS``); must match the
            model's keyboard / mouse dims.
        actions: an action file (see the module doc), or None (live control, else idle).
        mouse_pixels_per_step: pointer pixels per video frame that make one camera step (0.1);
            the page converts pointer movement with the ``mouse_per_px`` the server announces.
        mouse_max_steps: a video frame's camera delta (keys + mouse) is clamped per axis to this
            many camera steps (>= 1, a camera key's step).
        temporal_factor: video frames per latent frame (4).
        window: latent frames of actions per window (3: 12 video frames).
    """

    def __init__(self, variant: str = "universal", actions: str | None = None,
                 mouse_pixels_per_step: float = 20.0, mouse_max_steps: float = 2.0,
                 temporal_factor: int = 4, window: int = 3) -> None:  # fmt: skip
        super().__init__()
        if variant not in KEYMAPS:
            raise ConfigError(f"control.variant={variant!r} is not one of "
                              f"{', '.join(KEYMAPS)}")  # fmt: skip
        if temporal_factor < 1 or window < 1:
            raise ConfigError(f"control.temporal_factor={temporal_factor} and "
                              f"control.window={window} must be >= 1")  # fmt: skip
        if not (math.isfinite(mouse_pixels_per_step) and mouse_pixels_per_step > 0):
            raise ConfigError(f"control.mouse_pixels_per_step={mouse_pixels_per_step} must be a "
                              "positive number (pointer pixels per video frame per camera step)")  # fmt: skip
        if not (math.isfinite(mouse_max_steps) and mouse_max_steps >= 1):
            raise ConfigError(f"control.mouse_max_steps={mouse_max_steps} must be a number >= 1 "
                              "(camera steps of 0.1 per video frame; a camera key moves 1)")  # fmt: skip
        self.variant, self.keymap = variant, KEYMAPS[variant]
        self.mouse_per_px = CAM / float(mouse_pixels_per_step)
        self.mouse_max = CAM * float(mouse_max_steps)  # per axis, camera units per video frame
        self.tf = temporal_factor
        self.window_frames = window * temporal_factor
        self.actions_path = actions
        self.file = load_actions(actions, self) if actions else None  # (N, K + M) or None
        self._pending: tuple[torch.Tensor, dict[str, Any]] | None = None
        self._frontier = 0
        self._state: dict[str, Any] | None = None
        self.timeline = torch.zeros(0, self.width)

    @property
    def width(self) -> int:
        """Dims of one video frame's action row: keyboard, then mouse (if any)."""
        return self.keymap.keyboard_dim + (2 if self.keymap.mouse else 0)

    def provides(self) -> dict[str, ConditionInput]:
        w, k = self.window_frames, self.keymap.keyboard_dim
        out = {"keyboard": ConditionInput("keyboard", lambda b, f, hw: (b, f, w, k))}
        if self.keymap.mouse:
            out["mouse"] = ConditionInput("mouse", lambda b, f, hw: (b, f, w, 2))
        return out

    # ------------------------------------------------------------------ clip
    def check_frames(self, num_frames: int) -> None:
        """One-line error when the action file is shorter than ``num_frames`` latent frames
        (4 (T - 1) + 1 video frames, the release's clip length)."""
        if self.file is None:
            return
        need = self.tf * (num_frames - 1) + 1
        if self.file.shape[0] < need:
            raise ConfigError(f"control.actions={self.actions_path!r} has {self.file.shape[0]} "
                              f"video frames of actions, the run needs {need} ({num_frames} "
                              "latent frames); pass a longer file or fewer "
                              "rollout.total_blocks")  # fmt: skip

    def prepare(self, batch, *, height, width, num_frames, device) -> None:
        self.batch, self.device = batch, device
        self.timeline = self.file.clone() if self.file is not None else torch.zeros(0, self.width)
        self._pending, self._state = None, None
        self._frontier = 0  # latent frames generated so far (a replay asks for fewer)

    def idle_row(self) -> torch.Tensor:
        """The action row of a video frame without keys or mouse."""
        row = torch.zeros(self.width)
        if self.keymap.idle is not None:
            row[self.keymap.idle] = 1.0
        return row

    # ------------------------------------------------------------------ live control
    def live_control(self) -> dict[str, Any]:
        """The keys the page may send; with a mouse, ``mouse_per_px`` (camera units per pointer
        pixel per video frame: the page sends pixels x this) and ``mouse_max`` (the per-axis
        bound a frame's camera delta is clamped to)."""
        km = self.keymap
        out: dict[str, Any] = {"keys": sorted({*km.keys, *km.camera_keys}), "mouse": km.mouse}
        if km.mouse:
            out.update(mouse_per_px=self.mouse_per_px, mouse_max=self.mouse_max)
        return out

    def validate(self, control: dict[str, Any]) -> None:
        """One-line ``ConfigError`` unless ``control`` is a valid live control of the variant
        (for a server to reject a message before the step that would use it)."""
        self.parse(control)

    def parse(self, control: dict[str, Any], where: str = "control") -> torch.Tensor:
        """One video frame's action row of a live control dict (``{"keys", "mouse"}``).

        Raises:
            ConfigError: one line naming the offending key or field.
        """
        km = self.keymap
        unknown = set(control) - {"keys", "mouse"}
        if unknown:
            raise ConfigError(f"{where}: unknown field {sorted(unknown)[0]!r} (a keyboard/mouse "
                              "control has 'keys' and 'mouse')")  # fmt: skip
        keys = control.get("keys", [])
        if isinstance(keys, str):
            keys = [keys]
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise ConfigError(f"{where}.keys must be a list of key names, got {keys!r}")
        row = torch.zeros(self.width)
        look = torch.zeros(2)
        pressed = []
        for key in (k.lower() for k in keys):
            if key in km.keys:
                pressed.append(key)
                row[km.keys[key]] = 1.0
            elif key in km.camera_keys:
                look += torch.tensor(km.camera_keys[key])
            else:
                names = ", ".join(k for k in [*km.keys, *km.camera_keys] if k.strip())
                raise ConfigError(f"{where}.keys: {key!r} is not an action of the "
                                  f"{self.variant} variant (keys: {names})")  # fmt: skip
        if km.exclusive and len({km.keys[k] for k in pressed}) > 1:
            raise ConfigError(f"{where}.keys: {self.variant} takes one key at a time, got "
                              f"{pressed}")  # fmt: skip
        if km.idle is not None and not pressed:
            row[km.idle] = 1.0
        mouse = control.get("mouse")
        if mouse is not None:
            if not km.mouse:
                raise ConfigError(f"{where}.mouse: the {self.variant} variant has no mouse input")
            ok = isinstance(mouse, list) and len(mouse) == 2
            if not ok or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                 for v in mouse):  # fmt: skip
                raise ConfigError(f"{where}.mouse must be [dx, dy] numbers, got {mouse!r}")
            try:
                dx, dy = (float(v) for v in mouse)
            except OverflowError:  # an int beyond float range
                dx = dy = math.inf
            if not (math.isfinite(dx) and math.isfinite(dy)):
                raise ConfigError(f"{where}.mouse must be finite numbers, got {mouse!r}"[:200])
            dx, dy = (max(-self.mouse_max, min(self.mouse_max, v)) for v in (dx, dy))
            look += torch.tensor([-dy, dx])  # screen dy down -> pitch up positive
        if km.mouse:
            row[km.keyboard_dim :] = look.clamp(-self.mouse_max, self.mouse_max)
        elif look.abs().sum() > 0:  # camera keys only exist where there is a mouse
            raise ConfigError(f"{where}: the {self.variant} variant has no camera")
        return row

    def set_control(self, control: dict[str, Any] | None) -> None:
        """The next step's live control (``{"keys": [...], "mouse": [dx, dy]}``), or None.

        Raises:
            ConfigError: a key or mouse input the variant does not have (one line).
        """
        if control is None:
            self._pending = None
            return
        self._pending = (self.parse(control), dict(control))

    def _grow(self, frames: int) -> None:
        """Extend the timeline to ``frames`` video frames with idle rows."""
        have = self.timeline.shape[0]
        if have < frames:
            self.timeline = torch.cat([self.timeline, self.idle_row().expand(frames - have, -1)])

    def inputs(self, start: int, num: int) -> dict[str, torch.Tensor]:
        """``keyboard`` (B, num, 12, K) and ``mouse`` (B, num, 12, 2) of latent frames
        [start, start + num)."""
        tf = self.tf
        last = tf * (start + num - 1)  # the block's last video frame
        self._grow(last + 1)
        if self._pending is not None and start >= self._frontier:
            # the first forward of a new block takes the step's control (a recache replaying
            # committed blocks before it reads their recorded actions)
            row, control = self._pending
            self.timeline[max(0, tf * start - (tf - 1)) : last + 1] = row
            self._pending = None
            self._state = {"keys": control.get("keys", []), "mouse": control.get("mouse")}
        self._frontier = max(self._frontier, start + num)
        frames = torch.arange(start, start + num)[:, None] * tf
        idx = (frames - self.window_frames + torch.arange(self.window_frames)[None]).clamp(min=0)
        win = self.timeline[idx]  # (num, 12, K + M)
        # an asynchronous copy: a blocking one waits for the GPU's queue every forward (a host
        # sync per denoising step); pageable memory is staged before the call returns
        win = win[None].expand(self.batch, -1, -1, -1).to(self.device, non_blocking=True)
        k = self.keymap.keyboard_dim
        out = {"keyboard": win[..., :k]}
        if self.keymap.mouse:
            out["mouse"] = win[..., k:]
        return out

    def state(self) -> dict[str, Any] | None:
        """The live control applied last (``keys``, ``mouse``), or None."""
        return self._state


def _rows_from_json(obj: Any, enc: KeyboardMouseControl, where: str) -> torch.Tensor:
    entries = obj.get("actions") if isinstance(obj, dict) else obj
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{where}: expected {{'actions': [{{'keys': [...], 'mouse': [dx, dy], "
                          "'frames': n}, ...]}} with at least one entry")  # fmt: skip
    rows = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: actions[{i}] must be an object")
        entry = dict(entry)
        frames = entry.pop("frames", enc.tf)
        if not isinstance(frames, int) or isinstance(frames, bool) or frames < 1:
            raise ConfigError(f"{where}: actions[{i}].frames must be a positive integer")
        rows.append(enc.parse(entry, f"{where}: actions[{i}]").expand(frames, -1))
    return torch.cat(rows)


def _release_rows(obj: Any, enc: KeyboardMouseControl, where: str) -> torch.Tensor:
    """Rows from the release's ``keyboard_condition`` / ``mouse_condition`` tensors."""
    if not isinstance(obj, dict) or "keyboard_condition" not in obj:
        raise ConfigError(f"{where}: expected 'keyboard_condition' (and, with a mouse, "
                          "'mouse_condition') per video frame")  # fmt: skip
    km = enc.keymap
    parts = [("keyboard_condition", km.keyboard_dim)]
    if km.mouse:
        if "mouse_condition" not in obj:
            raise ConfigError(f"{where}: the {enc.variant} variant needs 'mouse_condition'")
        parts.append(("mouse_condition", 2))
    elif "mouse_condition" in obj:
        raise ConfigError(f"{where}: has 'mouse_condition', but the {enc.variant} variant has "
                          "no mouse input")  # fmt: skip
    cols = []
    for name, dims in parts:
        t = torch.as_tensor(np.asarray(obj[name], dtype=np.float32))
        t = t[0] if t.ndim == 3 and t.shape[0] == 1 else t
        if t.ndim != 2 or t.shape[1] != dims:
            raise ConfigError(f"{where}: {name} has shape {list(t.shape)}, the {enc.variant} "
                              f"variant needs [frames, {dims}]")  # fmt: skip
        cols.append(t)
    if cols[-1].shape[0] != cols[0].shape[0]:
        raise ConfigError(f"{where}: keyboard_condition and mouse_condition differ in length")
    return torch.cat(cols, dim=1)


def load_actions(path: str, enc: KeyboardMouseControl) -> torch.Tensor:
    """(N, keyboard_dim [+ 2]) per-video-frame action rows of an action file, validated.

    Raises:
        ConfigError: one line naming ``control.actions``: missing file, unknown format, wrong
            shape or key, NaN / inf.
    """
    where = f"control.actions={path!r}"
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{where} does not exist")
    suffix = p.suffix.lower()
    try:
        if suffix == ".json":
            rows = _rows_from_json(json.loads(p.read_text()), enc, where)
        elif suffix == ".npy":
            arr = np.load(p, allow_pickle=False)
            if arr.ndim != 2 or arr.shape[1] != enc.width or arr.dtype.kind not in "fiub":
                raise ConfigError(f"{where}: expected [frames, {enc.width}] numbers (keyboard "
                                  f"then mouse columns), got {list(arr.shape)} ({arr.dtype})")  # fmt: skip
            rows = torch.from_numpy(arr.astype(np.float32))
        elif suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                rows = _release_rows(dict(z), enc, where)
        elif suffix == ".safetensors":
            from safetensors.torch import load_file

            rows = _release_rows(load_file(p), enc, where)
        elif suffix in (".pt", ".pth"):
            rows = _release_rows(torch.load(p, map_location="cpu", weights_only=True), enc, where)
        else:
            raise ConfigError(f"{where}: unknown format {suffix!r} (use .json, .npy, .npz, "
                              ".pt/.pth or .safetensors)")  # fmt: skip
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001  (json / numpy / torch raise many types)
        first = str(err).splitlines()[0] if str(err) else ""
        raise ConfigError(f"{where} cannot be read ({type(err).__name__}: {first})") from None
    if rows.shape[0] < 1:
        raise ConfigError(f"{where} holds no video frame of actions")
    if not torch.isfinite(rows).all():
        raise ConfigError(f"{where} holds NaN or inf")
    k = enc.keymap.keyboard_dim
    if enc.keymap.mouse and rows.shape[1] > k:
        peak = rows[:, k:].abs().amax(dim=1)
        beyond = torch.nonzero(peak > enc.mouse_max + 1e-6)  # JSON entries are clamped when parsed
        if len(beyond):
            frame = int(beyond[0, 0])
            raise ConfigError(f"{where}: video frame {frame} moves the camera by "
                              f"{float(peak[frame]):.3g} per frame, beyond control.mouse_max_steps "
                              f"({enc.mouse_max:.3g}; the release's camera step is {CAM}); scale "
                              "the mouse values or raise control.mouse_max_steps")  # fmt: skip
    return rows.float()
