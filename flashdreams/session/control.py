"""Validation of control messages (keys pressed, camera poses, actions)."""

from __future__ import annotations

import math
from typing import Any

MAX_CONTROL_KEYS = 32
MAX_CONTROL_SCALARS = 256
MAX_TEXT_CHARS = 256


def validate_control(control: Any) -> dict[str, Any]:
    """Check a control and return it.

    A control is a flat dict: non-empty string keys; values that are bools, finite numbers,
    short strings or lists (up to 3 levels deep) of those, ``MAX_CONTROL_SCALARS`` scalars at
    most in all.

    Raises:
        ValueError: the control is not of that form.
    """
    if not isinstance(control, dict):
        raise ValueError(f"control must be an object, got {type(control).__name__}")
    if len(control) > MAX_CONTROL_KEYS:
        raise ValueError(f"control has {len(control)} keys (max {MAX_CONTROL_KEYS})")
    count = 0

    def check(value: Any, where: str, depth: int) -> None:
        nonlocal count
        if isinstance(value, list) and depth < 3:
            for i, item in enumerate(value):
                check(item, f"{where}[{i}]", depth + 1)
            return
        count += 1
        ok = isinstance(value, (bool, int)) or (isinstance(value, float) and math.isfinite(value))
        ok = ok or (isinstance(value, str) and len(value) <= MAX_TEXT_CHARS)
        if not ok or count > MAX_CONTROL_SCALARS:
            raise ValueError(f"control value {where} must be a bool, finite number, short string "
                             f"or list of those ({MAX_CONTROL_SCALARS} scalars at most)")  # fmt: skip

    for key, value in control.items():
        if not isinstance(key, str) or not key or len(key) > 64:
            raise ValueError(f"control key {key!r} must be a non-empty string of <= 64 chars")
        check(value, key, 0)
    return control
