"""Protocol of a metrics logger."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class Logger:
    """Receives the run's config, per-AR-step metrics, the summary and the final video."""

    def start(self, config: dict[str, Any], run_dir: Path, run_name: str) -> None:
        """Open the run. ``config`` is the resolved config as a plain dict."""

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        """Log one AR step's metrics (keys as in stats.json ``steps`` entries)."""

    def log_summary(self, summary: dict[str, Any]) -> None:
        """Log the run summary (keys as in stats.json ``summary``)."""

    def log_video(self, path: Path, fps: int) -> None:
        """Attach the finished video file."""

    def finish(self, failed: bool = False) -> None:
        """Close the run; ``failed=True`` marks it failed (exception or interrupt)."""
