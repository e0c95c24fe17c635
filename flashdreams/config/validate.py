"""Checks of user-supplied values shared by the CLI, ``flashdreams.Session`` and the server.

One rule per value everywhere it can be given: a seed is an integer in [0, 2**63) (torch's
generator takes any such seed; -1 would silently become 2**64-1), a stream length
(``total_blocks``) a positive integer or ``None``. Each check raises ``ConfigError`` with one
line naming the setting. No torch import here (the CLI runs these before building anything).
"""

from __future__ import annotations

from typing import Any

from flashdreams import ConfigError

SEED_LIMIT = 2**63  # seeds are integers in [0, SEED_LIMIT)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_seed(value: Any, name: str = "seed") -> int:
    """``value`` as a seed; raises ``ConfigError`` unless it is an integer in [0, 2**63)."""
    if not _is_int(value) or not 0 <= value < SEED_LIMIT:
        raise ConfigError(f"{name}={value!r} must be an integer in [0, 2**63)")
    return value


def check_total_blocks(value: Any, name: str = "total_blocks") -> int | None:
    """``value`` as a stream length: a positive integer, or ``None`` (endless)."""
    if value is not None and (not _is_int(value) or value < 1):
        raise ConfigError(f"{name}={value!r} must be a positive integer or null (endless)")
    return value


def check_positive_int(value: Any, name: str) -> int:
    """``value`` as an integer >= 1."""
    if not _is_int(value) or value < 1:
        raise ConfigError(f"{name}={value!r} must be an integer >= 1")
    return value


def check_run_config(cfg) -> None:
    """Range checks of a composed run config that need no model (run before building one)."""
    check_seed(cfg.seed)
    fps = cfg.fps
    if not isinstance(fps, (int, float)) or isinstance(fps, bool) or not 0 < fps <= 1000:
        raise ConfigError(f"fps={fps!r} must be a frame rate in (0, 1000]")
    r = cfg.rollout
    for key in ("batch_size", "frames_per_block", "height", "width"):
        check_positive_int(r[key], f"rollout.{key}")
    check_total_blocks(r.total_blocks, "rollout.total_blocks")
