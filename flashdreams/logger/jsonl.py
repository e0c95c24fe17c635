"""Append-only JSON-lines logger: one record per line, flushed as it is written."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import IO, Any

from flashdreams.logger.base import Logger


class JsonlLogger(Logger):
    """Write the run's records to ``<run_dir>/<filename>``, one JSON object per line.

    Every record has a ``type`` and a wall-clock ``time`` (Unix seconds). In order:

    - ``{"type": "config", "run_name": ..., "config": {...}}`` once, from `start`;
    - ``{"type": "step", "step": 0, "encode_ms": ..., ...}`` per AR step (metrics flattened);
    - ``{"type": "summary", "num_steps": ..., "median_step_ms": ..., ...}`` (flattened);
    - ``{"type": "video", "path": "...", "fps": 16}``;
    - ``{"type": "status", "status": "completed" | "failed"}`` last, from `finish`.

    Each line is flushed when written, so the file can be tailed live and survives a crash.
    Values JSON cannot hold (paths, tuples of objects) are written as strings.

    Args:
        filename: File name inside the run directory.
    """

    def __init__(self, filename: str = "metrics.jsonl") -> None:
        self.filename = filename
        self.path: Path | None = None
        self._file: IO[str] | None = None

    def _write(self, record_type: str, fields: dict[str, Any]) -> None:
        """Write one record (``type`` and ``time`` first, then ``fields``) and flush it."""
        if self._file is None:
            raise RuntimeError("JsonlLogger: call start() before logging")
        record = {"type": record_type, "time": round(time.time(), 6)}
        record.update({k: v for k, v in fields.items() if k not in record})
        self._file.write(json.dumps(record, default=str) + "\n")
        self._file.flush()

    def start(self, config: dict[str, Any], run_dir: Path, run_name: str) -> None:
        """Open the file (truncating it) and write the config record."""
        self.path = Path(run_dir) / self.filename
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("w", encoding="utf-8")
        self._write("config", {"run_name": run_name, "config": config})

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        """Write a ``step`` record."""
        metrics = {k: v for k, v in metrics.items() if k != "step"}
        self._write("step", {"step": step, **metrics})

    def log_summary(self, summary: dict[str, Any]) -> None:
        """Write the ``summary`` record."""
        self._write("summary", summary)

    def log_video(self, path: Path, fps: int) -> None:
        """Write a ``video`` record holding the file's path."""
        self._write("video", {"path": str(path), "fps": fps})

    def finish(self, failed: bool = False) -> None:
        """Write the ``status`` record and close the file; later calls do nothing."""
        if self._file is None:
            return
        self._write("status", {"status": "failed" if failed else "completed"})
        self._file.close()
        self._file = None
