"""Checks of user-supplied values shared by the CLI, ``flashdreams.Session`` and the server.

One rule per value everywhere it can be given: a seed is an integer in [0, 2**63) (torch's
generator takes any such seed; -1 would silently become 2**64-1), a stream length
(``total_blocks``) a positive integer or ``None``. Each check raises ``ConfigError`` with one
line naming the setting. No torch import here (the CLI runs these before building anything).
"""

from __future__ import annotations

from pathlib import Path
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
        if r[key] is not None or key in ("batch_size", "frames_per_block"):
            check_positive_int(r[key], f"rollout.{key}")  # height / width null: from the input
    check_total_blocks(r.total_blocks, "rollout.total_blocks")
    first = r.get("first_block_frames")
    if first is not None:
        check_positive_int(first, "rollout.first_block_frames")
    largest = max(r.frames_per_block, first or 0)
    cache = cfg.get("cache")
    window = cache.get("window_frames") if cache is not None and "window_frames" in cache else None
    if _is_int(window) and window < largest:
        what = "one block" if largest == r.frames_per_block else "the first block"
        raise ConfigError(
            f"cache.window_frames={window} is smaller than {what} "
            f"({largest} latent frames); use cache.window_frames>={largest}"
        )
    for key in ("prompt_file", "image", "input", "poses", "intrinsics"):  # before any loading
        value = cfg.get(key)
        if value and not Path(str(value)).expanduser().is_file():
            what = "does not exist" if key == "prompt_file" else "no such file"
            sep = " " if key == "prompt_file" else ": "
            raise ConfigError(f"{key}={str(value)!r}{sep}{what}")
    _check_local_weights(cfg)


_WEIGHT_KEYS = ("checkpoint", "low_noise_checkpoint", "tokenizer", "path")


def _check_local_weights(cfg) -> None:
    """A local weights / tokenizer path that does not exist fails before anything is built
    (``hf://`` paths are fetched, or found in the cache, by the loaders)."""
    from omegaconf import DictConfig, OmegaConf

    def visit(node, where: str) -> None:
        for key in node:
            if OmegaConf.is_missing(node, key):
                continue
            value = node[key]
            if isinstance(value, DictConfig):
                visit(value, f"{where}{key}.")
            elif key in _WEIGHT_KEYS and isinstance(value, str) and value:
                if "://" not in value and not Path(value).expanduser().exists():
                    raise ConfigError(f"{where}{key}={value!r}: no such file or directory")

    for group in ("model", "vae", "text_encoder", "conditioner", "control", "image_encoder"):
        node = cfg.get(group) if group in cfg else None
        if isinstance(node, DictConfig):
            visit(node, f"{group}.")


def _paths(node: Any, prefix: str = "") -> list[str]:
    """Dotted paths of every key of a plain (container) config, nodes included."""
    out = []
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{prefix}{key}"
            out += [path, *_paths(value, path + ".")]
    return out


def unknown_key_error(
    config_name: str, overrides: list[str], groups: tuple[str, ...]
) -> str | None:
    """The one-line error of a command-line key that the composed config does not have.

    A ``key=value`` whose key does not exist, and a ``+key=value`` that adds a key to a node
    with a schema (a dataclass: its keys are fixed, so the value would be ignored), are errors
    naming the key and the closest valid keys. Group choices are composed first (a recipe's
    keys count); ``+key`` at the top level, ``++key``, ``~key`` and ``hydra.*`` are left to Hydra. Returns None when every
    key exists or when the overrides do not parse or compose (Hydra reports those itself).
    """
    import dataclasses
    import difflib

    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType
    from omegaconf import DictConfig, OmegaConf

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # noqa: BLE001  (Hydra reports bad syntax)
        return None
    choices, keys = [], []
    for o in parsed:
        key = o.key_or_group
        if key.startswith("hydra") or o.type is OverrideType.DEL:
            continue
        if key in groups or "/" in key or o.package is not None:
            value = next(iter(o.sweep_string_iterator())) if o.is_sweep_override() else None
            choices.append(f"{key}={value}" if value is not None else o.input_line)
        elif o.type in (OverrideType.CHANGE, OverrideType.ADD):
            keys.append(o)
    if not keys:
        return None
    was = GlobalHydra.instance().is_initialized()
    try:
        GlobalHydra.instance().clear()
        with initialize_config_module("flashdreams.conf", version_base="1.3"):
            cfg = compose(config_name, overrides=choices)
    except Exception:  # noqa: BLE001  (Hydra reports it on its own run)
        return None
    finally:
        if not was:
            GlobalHydra.instance().clear()
    from flashdreams.config.options import scope_options

    scope_options(cfg)  # a recipe's keys for options it did not choose are not valid keys
    plain = OmegaConf.to_container(cfg, resolve=False)
    known = _paths(plain)
    for o in keys:
        key = o.key_or_group
        parent_path, _, leaf = key.rpartition(".")
        parent = OmegaConf.select(cfg, parent_path) if parent_path else cfg
        exists = key in known
        if o.type is OverrideType.CHANGE and not exists:
            pass
        elif (
            o.type is OverrideType.ADD
            and not exists
            and parent_path
            and isinstance(parent, DictConfig)
        ):
            if not dataclasses.is_dataclass(OmegaConf.get_type(parent)):
                continue  # a free-form node: adding keys is what + is for
        else:
            continue
        near = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
        if not near and isinstance(parent, DictConfig):
            near = [f"{parent_path}.{k}" if parent_path else str(k) for k in parent][:8]
        hint = f"; closest: {', '.join(near)}" if near else ""
        sign = "+" if o.type is OverrideType.ADD else ""
        return f"{sign}{key}: unknown key{hint}"
    return None
