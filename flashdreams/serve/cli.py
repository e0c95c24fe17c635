"""``flashdreams-serve``: the streaming server as a Hydra app (same recipes as ``flashdreams-run``).

torch is imported lazily so ``--help`` and ``--cfg`` stay fast.
"""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

from flashdreams.cli import (
    _interruptible,
    check_choices,
    check_keys,
    discard_if_empty,
    fail,
    run_dir_of_job,
    user_error,
)
from flashdreams.serve import config  # noqa: F401  (registers the serve schema)


@hydra.main(version_base="1.3", config_path="../conf", config_name="serve")
def _serve(cfg: DictConfig) -> None:
    try:
        from flashdreams.config.options import hydra_choices, scope_options
        from flashdreams.config.validate import check_run_config
        from flashdreams.serve.app import serve

        scope_options(cfg, hydra_choices())
        check_run_config(cfg)
        serve(cfg)
    except KeyboardInterrupt:
        pass
    except Exception as err:  # noqa: BLE001
        message = user_error(err)
        if message is not None:
            discard_if_empty(run_dir_of_job())
        if message is None or cfg.debug:
            raise
        fail(message)


@_interruptible
def serve_main() -> None:
    """``flashdreams-serve``: serve a recipe over HTTP + WebSocket (Hydra app)."""
    check_choices(sys.argv[1:])
    check_keys("serve", sys.argv[1:])
    if "debug=true" in sys.argv[1:]:
        os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    _serve()


if __name__ == "__main__":
    serve_main()
