"""Weights & Biases logger: one wandb run per flashdreams run (or multirun job).

``wandb`` is imported inside the methods, so importing this module (and composing configs that
name it) costs nothing when W&B is not used.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flashdreams.logger.base import Logger

MODES = ("online", "offline", "disabled")
log = logging.getLogger(__name__)


class WandbLogger(Logger):
    """Log config, per-step metrics, summary and video to a W&B run.

    The wandb files go under ``<run_dir>/wandb/`` so each run or multirun job keeps its own. A
    run left open by an earlier job in the same process (Hydra's basic launcher runs jobs
    sequentially) is finished before the next one starts (``reinit="finish_previous"``).

    Args:
        project: W&B project name.
        entity: W&B team or user; ``None`` uses the logged-in default.
        mode: ``"online"`` (stream to the server), ``"offline"`` (write locally; upload later
            with ``wandb sync <run_dir>/wandb/offline-run-*``) or ``"disabled"`` (no-op run).
        tags: Tags shown in the W&B UI.
        group: W&B group, e.g. the sweep name; ``None`` leaves the run ungrouped.
        name: Display name; ``None`` uses the flashdreams ``run_name``.
    """

    def __init__(
        self,
        project: str,
        entity: str | None = None,
        mode: str = "offline",
        tags: Sequence[str] = (),
        group: str | None = None,
        name: str | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"WandbLogger mode must be one of {MODES}, got {mode!r}")
        self.project = project
        self.entity = entity
        self.mode = mode
        self.tags = [str(tag) for tag in tags]
        self.group = group
        self.name = name
        self.run: Any = None

    def _require_run(self) -> Any:
        """Return the open run, or raise if `start` was not called."""
        if self.run is None:
            raise RuntimeError("WandbLogger: call start() before logging")
        return self.run

    def start(self, config: dict[str, Any], run_dir: Path, run_name: str) -> None:
        """Create the W&B run with ``config`` under ``run_dir``."""
        import wandb

        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=self.project,
            entity=self.entity,
            mode=self.mode,
            tags=self.tags,
            group=self.group,
            name=self.name or run_name,
            dir=str(run_dir),
            config=config,
            reinit="finish_previous",
        )

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        """Log one AR step's metrics at W&B step ``step``."""
        values = {key: value for key, value in metrics.items() if key != "step"}
        self._require_run().log(values, step=step)

    def log_summary(self, summary: dict[str, Any]) -> None:
        """Store the summary values in the run's summary (one value per key)."""
        run = self._require_run()
        for key, value in summary.items():
            run.summary[key] = value

    def log_video(self, path: Path, fps: int) -> None:
        """Upload the finished MP4 as ``video`` (its frame rate is read from the file).

        A missing or empty file (a run that failed before its first block) is skipped with a
        warning rather than raised, since this is called while a run is being torn down.
        """
        import wandb

        run, path = self._require_run(), Path(path)
        if not path.is_file() or path.stat().st_size == 0:
            log.warning("WandbLogger: no video at %s, not uploaded", path)
            return
        run.log({"video": wandb.Video(str(path), format="mp4")})

    def finish(self, failed: bool = False) -> None:
        """Finish the run, with exit code 1 when ``failed``; later calls do nothing."""
        if self.run is None:
            return
        run, self.run = self.run, None
        run.finish(exit_code=1 if failed else 0)
