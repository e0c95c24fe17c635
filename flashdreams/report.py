"""Summarize a sweep (or a single run): one row per job directory that holds a ``stats.json``.

Usage::

    flashdreams-report outputs/sweeps/<run_name>/<timestamp>

prints an aligned table and writes ``report.csv`` and ``report.png`` into that directory.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

COLUMNS = ("job", "overrides", "median_step_ms", "median_period_ms", "peak_memory_mb",
           "cache_hit_pct", "status")  # fmt: skip
MIB = 2**20


class ReportError(RuntimeError):
    """The sweep directory is missing or holds no ``stats.json``."""


def _natural_key(path: Path) -> list[Any]:
    """Sort key that orders job dirs ``2`` before ``10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def _read_overrides(job_dir: Path) -> str:
    """Return the job's Hydra overrides as ``k=v k=v`` ('' when there are none)."""
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return ""
    overrides = yaml.safe_load(path.read_text()) or []
    return " ".join(str(item) for item in overrides)


def _read_row(stats_path: Path, sweep_dir: Path) -> dict[str, Any]:
    """Build one report row from a job's ``stats.json``."""
    job_dir = stats_path.parent
    row: dict[str, Any] = {column: None for column in COLUMNS}
    row["job"] = job_dir.relative_to(sweep_dir).as_posix()
    row["overrides"] = _read_overrides(job_dir)
    try:
        stats = json.loads(stats_path.read_text())
    except (OSError, json.JSONDecodeError):
        row["status"] = "unreadable"
        return row
    summary = stats.get("summary") or {}
    row["median_step_ms"] = summary.get("median_step_ms")
    row["median_period_ms"] = summary.get("median_period_ms")
    peak = summary.get("peak_memory_bytes")
    row["peak_memory_mb"] = None if peak is None else peak / MIB
    hits = summary.get("step_cache_hit_rate")  # step_cache runs: forwards that reused blocks
    row["cache_hit_pct"] = None if hits is None else 100.0 * hits
    row["status"] = stats.get("status", "unknown")
    if row["status"] == "running" and _process_gone(stats):
        row["status"] = "killed"
    return row


def _process_gone(stats: dict[str, Any]) -> bool:
    """True when the run's process (``pid`` on this ``host``) no longer exists: a run left
    ``running`` by a kill. Runs of other hosts, or without a pid, are taken at their word."""
    import os
    import socket

    pid = stats.get("pid")
    if not isinstance(pid, int) or stats.get("host") != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False


def collect(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """Collect one row per job directory below ``sweep_dir`` that holds a ``stats.json``.

    Args:
        sweep_dir: A sweep directory (``outputs/sweeps/<name>/<timestamp>``), a single run
            directory, or any directory above them; searched recursively.

    Returns:
        Rows in natural path order with the keys in `COLUMNS`: ``job`` (path relative to
        ``sweep_dir``), ``overrides`` (``k=v k=v``), ``median_step_ms``, ``median_period_ms``,
        ``peak_memory_mb`` (MiB) and ``status``. Missing values are ``None``.
    """
    sweep_dir = Path(sweep_dir)
    paths = sorted(sweep_dir.rglob("stats.json"), key=_natural_key)
    return [_read_row(path, sweep_dir) for path in paths]


def _cell(value: Any) -> str:
    """Format one value for the table (floats to 0.1 ms/MiB, None to '')."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def format_table(rows: list[dict[str, Any]]) -> str:
    """Format rows as a space-aligned text table (numbers right-aligned)."""
    cells = [[_cell(row[column]) or "-" for column in COLUMNS] for row in rows]
    widths = [
        max([len(column)] + [len(row[i]) for row in cells]) for i, column in enumerate(COLUMNS)
    ]
    numeric = [column.endswith(("_ms", "_mb", "_pct")) for column in COLUMNS]

    def line(values: Sequence[str]) -> str:
        parts = [
            value.rjust(width) if is_num else value.ljust(width)
            for value, width, is_num in zip(values, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    return "\n".join([line(COLUMNS), line(["-" * w for w in widths])] + [line(c) for c in cells])


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    """Write rows to ``path`` as CSV with a header of `COLUMNS` (full precision, None as '')."""
    with path.open("w", newline="") as file:
        writer = csv.writer(file, lineterminator="\n")
        writer.writerow(COLUMNS)
        writer.writerows([["" if row[c] is None else row[c] for c in COLUMNS] for row in rows])
    return path


def write_report(sweep_dir: str | Path) -> Path:
    """Print the table and write ``report.csv`` and ``report.png`` into ``sweep_dir``.

    Args:
        sweep_dir: Directory to summarize (see `collect`).

    Returns:
        The path of ``report.csv``.

    Raises:
        ReportError: If ``sweep_dir`` is not a directory or holds no ``stats.json``.
    """
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise ReportError(f"not a directory: {sweep_dir}")
    rows = collect(sweep_dir)
    if not rows:
        raise ReportError(f"no stats.json found under {sweep_dir}")
    print(format_table(rows))
    csv_path = write_csv(rows, sweep_dir / "report.csv")
    from flashdreams.io.plot import plot_sweep  # matplotlib is imported only when needed

    plot_sweep(rows, sweep_dir / "report.png")
    return csv_path


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``flashdreams-report``.

    Args:
        argv: Command-line arguments without the program name; ``None`` reads ``sys.argv``.

    Returns:
        The exit status: 0 on success, 2 when the directory is missing or has no runs.
    """
    parser = argparse.ArgumentParser(
        prog="flashdreams-report",
        description="Tabulate and plot the stats.json files of a sweep or run directory.",
    )
    parser.add_argument("sweep_dir", type=Path, help="e.g. outputs/sweeps/<run_name>/<timestamp>")
    args = parser.parse_args(argv)
    try:
        csv_path = write_report(args.sweep_dir)
    except ReportError as err:
        print(f"flashdreams-report: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {csv_path} and {csv_path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
