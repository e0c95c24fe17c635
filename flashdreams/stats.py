"""Per-AR-step stage timing and the stats.json record (DESIGN.md section 3)."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

STAGES = ("encode", "control", "diffuse", "decode", "commit")
WARMUP_STEPS = 2  # steps 0 and 1 are warm-up (compile, capture) and excluded from medians


class Mark:
    """A point in time on the host clock or a CUDA stream."""

    def __init__(self, device: torch.device) -> None:
        self.event = None
        if device.type == "cuda":
            self.event = torch.cuda.Event(enable_timing=True)
            self.event.record()
        self.host = time.perf_counter()

    def ms_until(self, other: Mark) -> float:
        if self.event is not None:
            return self.event.elapsed_time(other.event)
        return (other.host - self.host) * 1000.0


class StepTimer:
    """Marks stage boundaries of one AR step; resolved to milliseconds after a sync.

    CUDA events are recorded without synchronising; ``resolve`` is only called once the
    step's work is known to be finished (a profiling sync, or the end of the run).
    """

    def __init__(self, step: int, device: torch.device) -> None:
        self.step = step
        self.device = device
        self.marks: dict[str, tuple[Mark, Mark]] = {}
        self.parts: dict[str, list[tuple[Mark, Mark]]] = {}  # sub-stages, e.g. a projector
        self.inside: dict[str, str] = {}  # part -> the stage it runs inside
        self._open: tuple[str, Mark] | None = None
        self.num_frames = 0  # video frames the step decoded
        self.latent_frames = 0  # latent frames of the step's block (the block schedule's)

    def start(self, stage: str) -> None:
        self._open = (stage, Mark(self.device))

    def stop(self) -> None:
        stage, begin = self._open
        self.marks[stage] = (begin, Mark(self.device))
        self._open = None

    def add_parts(self, parts: dict[str, list[tuple[Mark, Mark]]],
                  inside: dict[str, str] | None = None) -> None:  # fmt: skip
        """Sub-stage intervals recorded by a part of the step; each becomes ``<name>_ms``, the
        sum of its intervals. ``inside`` names the stage a part runs within (a control's LR
        projector inside ``diffuse``); parts not named there run beside the stages (an encode
        ahead on a side stream). A stage with parts inside also gets its own time without
        them: ``dit_ms`` for ``diffuse`` (the DiT alone), ``<stage>_own_ms`` for the others."""
        for name, pairs in parts.items():
            self.parts.setdefault(name, []).extend(pairs)
        for name, stage in (inside or {}).items():
            if stage not in STAGES:
                raise ValueError(f"part {name!r} inside unknown stage {stage!r} ({STAGES})")
            self.inside[name] = stage

    def close_period(self) -> None:
        """Mark the end of the block period on the current stream, for stages that overlap
        (decode on a side stream beside the commit): record it once the current stream has
        waited for every stage. The period is then the time from the first stage's start to
        this mark, not the sum of the stages."""
        first = next(iter(self.marks.values()))[0]
        self.marks["period"] = (first, Mark(self.device))

    def done(self) -> bool:
        """Whether every mark has been reached (``resolve`` will not wait): a stage on a side
        stream (a pipelined decode) may end after the step's last mark on the current one."""
        return all(m.event is None or m.event.query()
                   for pair in self.marks.values() for m in pair)  # fmt: skip

    def resolve(self) -> dict[str, Any]:
        """Stage times of this step in ms, plus step latency and block period."""
        row: dict[str, Any] = {"step": self.step}
        for stage in STAGES:
            pair = self.marks.get(stage)
            row[f"{stage}_ms"] = pair[0].ms_until(pair[1]) if pair else 0.0
        row["step_ms"] = row["encode_ms"] + row["control_ms"] + row["diffuse_ms"] + row["decode_ms"]
        row["period_ms"] = row["step_ms"] + row["commit_ms"]
        if "period" in self.marks:  # overlapping stages: step start to all of them done
            row["period_ms"] = self.marks["period"][0].ms_until(self.marks["period"][1])
        for name, pairs in self.parts.items():
            row[f"{name}_ms"] = sum(a.ms_until(b) for a, b in pairs)
        for stage in dict.fromkeys(self.inside.values()):  # stages with parts inside them
            within = sum(
                row[f"{n}_ms"] for n, s in self.inside.items() if s == stage and n in self.parts
            )
            own = "dit_ms" if stage == "diffuse" else f"{stage}_own_ms"
            row[own] = max(0.0, row[f"{stage}_ms"] - within)
        row["num_frames"] = self.num_frames
        row["latent_frames"] = self.latent_frames
        return row


def summarize(steps: list[dict[str, Any]], warmup_s: float | None, peak_bytes: int,
              total_s: float):  # fmt: skip
    """DESIGN.md metrics: medians over steps >= 2 (all steps when fewer than 3: ``medians_over``
    says which); ``warmup_s`` is None when the run ended before its warm-up did."""
    timed = [s for s in steps if s["step"] >= WARMUP_STEPS] or steps
    frames = sum(s["num_frames"] for s in steps)
    with_commit = [s for s in timed if s["commit_ms"] > 0] or timed
    return {
        "num_steps": len(steps),
        "medians_over": f"steps>={WARMUP_STEPS}" if len(steps) > WARMUP_STEPS else "all steps",
        "median_step_ms": statistics.median(s["step_ms"] for s in timed) if timed else None,
        "median_period_ms": (
            statistics.median(s["period_ms"] for s in with_commit) if timed else None
        ),
        "median_control_ms": (
            statistics.median(s.get("control_ms", 0.0) for s in timed) if timed else None
        ),
        "median_diffuse_ms": statistics.median(s["diffuse_ms"] for s in timed) if timed else None,
        "median_decode_ms": statistics.median(s["decode_ms"] for s in timed) if timed else None,
        "median_commit_ms": (
            statistics.median(s["commit_ms"] for s in with_commit) if timed else None
        ),
        "warmup_s": warmup_s,
        "peak_memory_bytes": peak_bytes,
        "total_s": total_s,
        "num_frames": frames,
        "fps": frames / total_s if total_s > 0 else None,
    }


class RunStats:
    """Accumulates resolved steps and rewrites ``stats.json`` after each one.

    Rewriting per step keeps the file true to the completed steps even if the run dies.
    """

    def __init__(self, path: Path | None, header: dict[str, Any]) -> None:
        self.path = path
        self.header = dict(header)
        self.steps: list[dict[str, Any]] = []
        self.summary: dict[str, Any] = {}
        self.sections: dict[str, Any] = {}  # extra top-level entries (e.g. "quality")
        self.status = "running"

    def add(self, row: dict[str, Any]) -> None:
        self.steps.append(row)
        self.write()

    def finish(self, status: str, warmup_s: float | None, peak_bytes: int, total_s: float,
               extra: dict[str, Any] | None = None) -> None:  # fmt: skip
        self.status = status
        self.summary = {**summarize(self.steps, warmup_s, peak_bytes, total_s), **(extra or {})}
        self.write()

    def as_dict(self) -> dict[str, Any]:
        return {**self.header, "status": self.status, "steps": self.steps,
                "summary": self.summary, **self.sections}  # fmt: skip

    def write(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.as_dict(), indent=1))
        tmp.replace(self.path)
