"""Latency plots of one run (per AR step) and of a sweep (per job), drawn with Agg.

Figures are built with `matplotlib.figure.Figure` directly, which renders through the Agg
canvas without touching pyplot's global state or the process-wide backend.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

STAGES = ("encode_ms", "control_ms", "diffuse_ms", "decode_ms", "commit_ms")
STAGE_COLORS = ("#8fbcd4", "#9e9ac8", "#2c7fb8", "#41ab5d", "#fdae61")


def median_over_steady_steps(values: list[float]) -> float | None:
    """Median over AR steps >= 2 (0 and 1 are warm-up), or over all steps when fewer than 3.

    Args:
        values: One value per AR step, in step order.

    Returns:
        The median, or ``None`` for an empty list.
    """
    if not values:
        return None
    steady = values[2:] if len(values) >= 3 else values
    return float(statistics.median(steady))


def _step_totals(steps: list[dict[str, Any]]) -> tuple[list[float], list[float]]:
    """Per-step latency and period in ms, from the stored values or the stage sums."""
    latency, period = [], []
    for step in steps:
        step_ms = step.get("step_ms")
        if step_ms is None:
            step_ms = sum(step.get(key) or 0.0 for key in STAGES[:4])
        period_ms = step.get("period_ms")
        if period_ms is None:
            period_ms = step_ms + (step.get("commit_ms") or 0.0)
        latency.append(float(step_ms))
        period.append(float(period_ms))
    return latency, period


def _save(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` (creating its directory) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def _draw_median(ax: Any, value: float | None, label: str, color: str) -> None:
    """Draw a dashed horizontal median line, labelled with its value."""
    if value is not None:
        ax.axhline(value, color=color, linestyle="--", linewidth=1.2, label=f"{label}: {value:.1f}")


def _stacked_stage_bars(ax: Any, xs: list[int], steps: list[dict[str, Any]]) -> None:
    """Draw one bar per step stacking the stage times in `STAGES` order."""
    bottom = [0.0] * len(steps)
    for key, color in zip(STAGES, STAGE_COLORS, strict=True):
        heights = [float(step.get(key) or 0.0) for step in steps]
        ax.bar(xs, heights, bottom=bottom, color=color, label=key.removesuffix("_ms"))
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]


def _shade_warmup(ax: Any, steps: list[dict[str, Any]]) -> None:
    """Shade the warm-up steps (AR step 0 and 1 of each clip) that the medians leave out."""
    if len(steps) < 3:
        return  # with fewer than 3 steps the medians use every step
    label = "warm-up"
    for i, step in enumerate(steps):
        if step.get("step", i) < 2:
            ax.axvspan(i - 0.5, i + 0.5, color="0.92", zorder=0, label=label)
            label = None


def plot_latency(stats: dict[str, Any], path: str | Path) -> Path:
    """Plot per-AR-step stage times of one run as stacked bars, with step latency and period.

    Bars stack encode, diffuse, decode (their top is the step latency) and commit (the top of
    the stack is the block period). Dashed lines mark the medians from ``stats["summary"]``,
    or medians computed with the same rule when the summary lacks them.

    Args:
        stats: The run's ``stats.json`` content (``steps`` and optionally ``summary``).
        path: Output image file (format from the suffix, e.g. ``.png``).

    Returns:
        The written path.
    """
    steps = stats.get("steps") or []
    summary = stats.get("summary") or {}
    xs = list(range(len(steps)))  # position in the run; "step" restarts with each clip
    latency, period = _step_totals(steps)
    fig = Figure(figsize=(max(7.0, 0.3 * len(steps) + 5.0), 4.0), layout="constrained")
    ax = fig.add_subplot()
    _stacked_stage_bars(ax, xs, steps)
    ax.plot(xs, latency, "k.", markersize=4, label="step latency")
    _shade_warmup(ax, steps)
    median_step = summary.get("median_step_ms", median_over_steady_steps(latency))
    median_period = summary.get("median_period_ms", median_over_steady_steps(period))
    _draw_median(ax, median_step, "median step latency", "black")
    _draw_median(ax, median_period, "median period", "#d7301f")
    ax.set_xlabel("AR step (in run order)")
    ax.set_ylabel("time (ms)")
    title = " | ".join(str(stats[k]) for k in ("run_name", "device", "dtype") if stats.get(k))
    ax.set_title(title or "latency per AR step", fontsize=10)
    fig.legend(fontsize=8, loc="outside right upper")
    return _save(fig, path)


def _job_label(row: dict[str, Any]) -> str:
    """Y tick label of a sweep job: its label or overrides, plus its status unless completed."""
    label = str(row.get("label") or row.get("overrides") or row.get("job") or "?")
    if len(label) > 60:
        label = label[:57] + "..."
    status = row.get("status")
    return label if status in (None, "completed") else f"{label} [{status}]"


def plot_sweep(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Plot median step latency and block period per sweep job as grouped horizontal bars.

    Args:
        rows: Report rows with ``label`` (else ``overrides``, else ``job``), ``status``,
            ``median_step_ms`` and ``median_period_ms``; missing values are labelled n/a.
        path: Output image file.

    Returns:
        The written path.
    """
    labels = [_job_label(row) for row in rows]
    ys = list(range(len(rows)))
    fig = Figure(figsize=(9.0, 1.2 + 0.45 * len(rows)), layout="constrained")
    ax = fig.add_subplot()
    series = (
        ("median_step_ms", "step latency", "#2c7fb8"),
        ("median_period_ms", "period", "#fdae61"),
    )
    for offset, (key, label, color) in zip((-0.2, 0.2), series, strict=True):
        values = [row.get(key) for row in rows]
        heights = [0.0 if value is None else value for value in values]
        bars = ax.barh([y + offset for y in ys], heights, height=0.38, color=color, label=label)
        texts = ["n/a" if value is None else f"{value:.1f}" for value in values]
        ax.bar_label(bars, labels=texts, fontsize=7, padding=2)
    ax.set_yticks(ys, labels, fontsize=8)
    ax.margins(x=0.1)  # room for the value labels
    ax.invert_yaxis()  # first job on top, like the printed table
    ax.set_xlabel("median time (ms), AR steps >= 2")
    fig.legend(fontsize=8, loc="outside lower center", ncols=2)
    return _save(fig, path)
