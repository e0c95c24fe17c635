"""A recipe's settings for one option of a group never leak into another option (issue 21).

Every recipe composes with every option of ``vae``, ``text_encoder``, ``cache`` and ``graph``
whose group it sets keys of (a group a recipe sets nothing in cannot leak: those options are
composed once, with the demo recipe), and every group node then holds only keys its option's
constructor takes; a few of these combinations are built and stepped at tiny sizes (CPU,
random weights).
"""

import inspect

import pytest
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import get_object
from omegaconf import OmegaConf

from flashdreams.cli import group_options
from flashdreams.config.options import CONF_DIR, SCOPED_GROUPS, scope_options
from flashdreams.config.validate import unknown_key_error

GROUPS = ("vae", "text_encoder", "cache", "graph")
TINY_MODEL = ["model.dim=32", "model.num_heads=2", "model.num_layers=1", "model.ffn_dim=64",
              "model.checkpoint=null", "device=cpu", "rollout.height=32", "rollout.width=32",
              "rollout.total_blocks=1", "text_encoder=random"]  # fmt: skip


@pytest.fixture(scope="module")
def hydra_ctx():
    GlobalHydra.instance().clear()
    with initialize_config_module("flashdreams.conf", version_base="1.3"):
        yield
    GlobalHydra.instance().clear()


def constructor_rejects(node) -> list[str]:
    """Keys of a group node that its ``_target_`` cannot take."""
    params = inspect.signature(get_object(node["_target_"])).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return []
    return [k for k in node if not k.startswith("_") and k not in params]


def recipe_sets(recipe: str) -> tuple[set[str], dict[str, str]]:
    """Top-level keys a recipe (and the recipes it extends) sets, and its group choices."""
    data = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "recipe" / f"{recipe}.yaml"))
    keys, choices = set(data) - {"defaults"}, {}
    for entry in data.get("defaults") or []:
        if isinstance(entry, str) and entry != "_self_":
            base_keys, base_choices = recipe_sets(entry)
            keys, choices = keys | base_keys, {**base_choices, **choices}
        elif isinstance(entry, dict):
            for key, value in entry.items():
                choices[key.removeprefix("override ").lstrip("/")] = value
    return keys, choices


def check(cfg, what: str) -> None:
    scope_options(cfg)
    for name in SCOPED_GROUPS:
        node = cfg[name]
        if "_target_" in node:
            bad = constructor_rejects(node)
            assert not bad, f"{what}: {name}.{bad} leaked into {node['_target_']}"


@pytest.mark.parametrize("recipe", group_options("recipe"))
def test_every_option_of_a_group_composes_with_every_recipe(hydra_ctx, recipe):
    keys, choices = recipe_sets(recipe)
    for group in GROUPS:
        if group not in keys and recipe != "demo":
            continue  # the recipe sets nothing in this group: nothing can leak
        for option in group_options(group):
            if option == choices.get(group) and recipe != "demo":
                continue  # the recipe's own choice (test_config composes every recipe)
            cfg = compose("run", overrides=[f"recipe={recipe}", f"{group}={option}"])
            check(cfg, f"recipe={recipe} {group}={option}")
            if group == "cache" and option != "rolling":
                assert "window_frames" not in cfg.cache


@pytest.mark.parametrize(
    "overrides",
    [
        ["recipe=self_forcing_wan21_t2v_1_3b", "vae=none"],  # the command
        ["recipe=self_forcing_wan21_t2v_1_3b", "vae=preview", "cache=full"],
        ["recipe=self_forcing_wan21_t2v_1_3b_taehv", "vae=taehv"],
        ["recipe=causal_forcing_wan21_t2v_1_3b_chunkwise", "vae=preview", "cache=full"],
    ],
)
def test_a_recipe_with_another_option_builds_and_steps(hydra_ctx, overrides):
    from flashdreams.session import Session

    cfg = compose("run", overrides=[*overrides, *TINY_MODEL])
    session = Session(cfg, total_blocks=1, images=None)
    frames = session.step()
    assert frames is None or frames.shape[-1] == 32


def test_a_key_of_another_option_on_the_command_line_is_unknown(hydra_ctx):
    from flashdreams.cli import GROUPS as ALL_GROUPS

    ok = ["recipe=self_forcing_wan21_t2v_1_3b", "vae=wan21", "vae.checkpoint=/x"]
    assert unknown_key_error("run", ok, ALL_GROUPS) is None
    bad = ["recipe=self_forcing_wan21_t2v_1_3b", "vae=none", "vae.checkpoint=/x"]
    assert unknown_key_error("run", bad, ALL_GROUPS).startswith("vae.checkpoint: unknown key")
