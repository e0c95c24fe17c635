"""The run config: composing it from overrides, its schema, options and validation."""

from __future__ import annotations


def compose_run(overrides=()):
    """The run config (``conf/run.yaml``) composed with ``flashdreams-run`` overrides, outside
    a Hydra app (Session, scripts, tests); clears Hydra's global state first."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_module("flashdreams.conf", version_base="1.3"):
        return compose("run", overrides=list(overrides))
