"""A recipe's settings for a config group apply to the option it chose, not to another one.

A recipe selects an option per group (``override /vae: wan21``) and sets that option's keys
(``vae.checkpoint: hf://...``). When the command line picks another option of the group
(``vae=none``), Hydra still merges the recipe's keys into it, and building fails
(``NoDecoder.__init__() got an unexpected keyword argument 'checkpoint'``). Every option's
YAML (with the schema or option it extends) declares its keys; ``scope_options`` drops the
keys of a group node that its option does not declare, with one log line each. No torch here.
"""

from __future__ import annotations

import dataclasses
import logging
from functools import cache
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("flashdreams")
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
_SPECIAL = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}
# groups whose nodes are instantiated from one option each (model: checked by its schema)
SCOPED_GROUPS = ("scheduler", "cache", "attention", "parallel", "graph", "vae", "text_encoder",
                 "guidance", "image_encoder", "conditioner", "control", "logger", "precision")  # fmt: skip


@cache
def option_spec(group: str, option: str) -> tuple[str | None, frozenset[str]]:
    """(``_target_``, declared keys) of ``group/option``, following its defaults list."""
    from hydra.core.config_store import ConfigStore

    data = _option_yaml(group, option)
    if data is None:  # a structured schema (base_*) in Hydra's ConfigStore
        node = ConfigStore.instance().load(f"{group}/{option}.yaml").node
        schema = OmegaConf.get_type(node)
        keys = (
            {f.name for f in dataclasses.fields(schema)}
            if dataclasses.is_dataclass(schema)
            else set(node)
        )
        return node.get("_target_"), frozenset(keys)
    target, keys = data.get("_target_"), set(data) - {"defaults"}
    keys |= set(nested_groups(group, option))
    for entry in data.get("defaults") or []:
        if entry == "_self_" or not isinstance(entry, str):
            continue
        base_target, base_keys = option_spec(group, entry)
        keys |= base_keys
        target = target or base_target
    return target, frozenset(keys)


@cache
def _option_yaml(group: str, option: str) -> dict | None:
    """``conf/<group>/<option>.yaml`` as a plain dict (read once), None where it is no file."""
    path = CONF_DIR / group / f"{option}.yaml"
    if not path.is_file():
        return None
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}


@cache
def nested_groups(group: str, option: str) -> tuple[str, ...]:
    """The sub-groups ``group/option`` composes under its own keys (a defaults entry
    ``encoder: wan21`` in ``control/hdmap.yaml`` is the key ``encoder`` from ``control/encoder``)."""
    data = _option_yaml(group, option)
    if data is None:
        return ()
    subs = []
    for entry in data.get("defaults") or []:
        if isinstance(entry, dict):
            subs += [k for k in entry if (CONF_DIR / group / k).is_dir()]
        elif isinstance(entry, str) and entry != "_self_":
            subs += nested_groups(group, entry)
    return tuple(subs)


def options(group: str) -> list[str]:
    """YAML options of ``group``."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def chosen_option(group: str, node: DictConfig, choice: str | None = None) -> str | None:
    """The option ``node`` was composed from: Hydra's ``choice`` if known, else the option of
    the same ``_target_`` that declares most of its keys."""
    if choice is not None and (CONF_DIR / group / f"{choice}.yaml").is_file():
        return choice
    target = node.get("_target_") if "_target_" in node else None
    best, best_score = None, -1
    for option in options(group):
        opt_target, keys = option_spec(group, option)
        if opt_target != target:
            continue
        score = len(keys & set(node))
        if score > best_score:
            best, best_score = option, score
    return best


def scope_options(cfg: DictConfig, choices: dict | None = None) -> list[str]:
    """Drop the keys of each group node that its option does not declare; returns them.

    Args:
        cfg: a composed run config (changed in place).
        choices: Hydra's ``runtime.choices`` when known (``group -> option``).
    """
    dropped: list[str] = []
    for group in SCOPED_GROUPS:
        _scope(cfg, group, group, choices or {}, dropped)
    return dropped


def _scope(parent: DictConfig, key: str, group: str, choices: dict, dropped: list[str]) -> None:
    """``scope_options`` of the node ``parent[key]`` composed from ``group``, then of the
    sub-groups its option composes (``control/encoder`` under ``control.encoder``)."""
    node = parent.get(key) if key in parent else None
    if not isinstance(node, DictConfig):
        return
    option = chosen_option(group, node, choices.get(group))
    if option is None:
        return
    _, declared = option_spec(group, option)
    extra = [k for k in node if k not in declared and k not in _SPECIAL]
    path = group.replace("/", ".")
    if extra:
        kept = {k: v for k, v in OmegaConf.to_container(node, resolve=False).items()
                if k not in extra}  # fmt: skip
        root = parent._get_root()
        was_struct = OmegaConf.is_struct(root)
        OmegaConf.set_struct(root, False)
        parent[key] = kept
        OmegaConf.set_struct(root, was_struct)
        for k in extra:
            log.info("%s.%s is not a setting of %s=%s (the recipe set it for another option): "
                     "ignored", path, k, group, option)  # fmt: skip
            dropped.append(f"{path}.{k}")
    for sub in nested_groups(group, option):
        _scope(parent[key], sub, f"{group}/{sub}", choices, dropped)


def hydra_choices() -> dict | None:
    """Hydra's group choices of the running app (None outside one)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return dict(HydraConfig.get().runtime.choices)
