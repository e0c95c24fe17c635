"""Tests of the metrics loggers: none, jsonl and wandb (offline, read back from its own files)."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from flashdreams.io.video import Mp4Writer
from flashdreams.logger.base import Logger
from flashdreams.logger.jsonl import JsonlLogger
from flashdreams.logger.none import NoLogger
from flashdreams.logger.wandb import WandbLogger

CONF_DIR = Path(__file__).parents[2] / "flashdreams" / "conf" / "logger"
CONFIG = {"model": {"name": "tiny"}, "seed": 0}
STEPS = [
    {"step": i, "encode_ms": 1.0, "diffuse_ms": 30.0 + i, "decode_ms": 4.0, "commit_ms": 7.5}
    for i in range(4)
]
SUMMARY = {"num_steps": 4, "median_step_ms": 36.5, "median_period_ms": 44.0, "fps": 210.0}


@pytest.fixture(autouse=True)
def _offline_wandb(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("video") / "video.mp4"
    with Mp4Writer(path, fps=8) as writer:
        writer.write(np.zeros((4, 16, 16, 3), dtype=np.uint8))
    return path


def _drive(logger: Logger, run_dir: Path, video: Path, failed: bool = False) -> None:
    """Feed a logger a whole run, as the rollout does."""
    logger.start(CONFIG, run_dir, "demo")
    for step in STEPS:
        logger.log_step(step["step"], step)
    logger.log_summary(SUMMARY)
    logger.log_video(video, 8)
    logger.finish(failed=failed)
    logger.finish(failed=failed)  # idempotent


def test_yaml_options_instantiate() -> None:
    expected = {"none": NoLogger, "jsonl": JsonlLogger, "wandb": WandbLogger}
    for name, cls in expected.items():
        logger = instantiate(OmegaConf.load(CONF_DIR / f"{name}.yaml"))
        assert type(logger) is cls
        assert isinstance(logger, Logger)


def test_no_logger_writes_nothing(tmp_path: Path, video: Path) -> None:
    _drive(NoLogger(), tmp_path, video)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("failed", [False, True])
def test_jsonl_records(tmp_path: Path, video: Path, failed: bool) -> None:
    _drive(JsonlLogger(), tmp_path, video, failed=failed)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    expected = ["config", "step", "step", "step", "step", "summary", "video", "status"]
    assert [r["type"] for r in records] == expected
    assert records[0]["config"] == CONFIG and records[0]["run_name"] == "demo"
    for record, step in zip(records[1:5], STEPS, strict=True):
        assert {k: record[k] for k in step} == step
    assert {k: records[5][k] for k in SUMMARY} == SUMMARY
    assert records[6]["path"] == str(video) and records[6]["fps"] == 8
    assert records[7]["status"] == ("failed" if failed else "completed")


def test_jsonl_flushes_each_line(tmp_path: Path) -> None:
    logger = JsonlLogger(filename="m.jsonl")
    logger.start(CONFIG, tmp_path, "demo")
    logger.log_step(0, {"step_ms": 1.5})
    lines = (tmp_path / "m.jsonl").read_text().splitlines()  # read before finish()
    assert json.loads(lines[-1])["step_ms"] == 1.5
    logger.finish()


def test_logging_before_start_raises() -> None:
    with pytest.raises(RuntimeError):
        JsonlLogger().log_step(0, {})
    with pytest.raises(RuntimeError):
        WandbLogger(project="p").log_step(0, {})
    with pytest.raises(ValueError):
        WandbLogger(project="p", mode="cloud")


def _wandb_records(path: Path) -> list[Any]:
    """Parse a ``.wandb`` transaction log: leveldb-style 32 KiB blocks of protobuf records."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, payload, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little room left for a header: block padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if pos + 7 + length > len(data):  # record still being written
            break
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        payload = chunk if kind in (1, 2) else payload + chunk  # 1 full, 2 first, 3/4 more
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            records.append(record)
    return records


def _items(items: Any) -> dict[str, Any]:
    """History/summary items as ``{dotted key: value}``."""
    return {item.key or ".".join(item.nested_key): json.loads(item.value_json) for item in items}


def _finished_records(run_dir: Path, timeout_s: float = 20.0) -> list[Any]:
    """Records of the single offline run under ``run_dir``, once its exit record is on disk.

    ``run.finish()`` returns when wandb-core has handled the exit; its writer closes the
    transaction log a moment later, so poll for the exit record.
    """
    (log_path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    deadline = time.monotonic() + timeout_s
    while True:
        records = _wandb_records(log_path)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        if time.monotonic() > deadline:
            raise TimeoutError(f"no exit record in {log_path}")
        time.sleep(0.05)


def _read_offline_run(run_dir: Path) -> dict[str, Any]:
    """Config, history rows, final summary and exit code of the single offline run."""
    out: dict[str, Any] = {"history": [], "summary": {}, "config": {}, "exit_code": None}
    for record in _finished_records(run_dir):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["config"] = _items(record.run.config.update)
            out["name"] = record.run.display_name
        elif kind == "history":
            out["history"].append(_items(record.history.item))
        elif kind == "summary":
            out["summary"].update(_items(record.summary.update))
        elif kind == "exit":
            out["exit_code"] = record.exit.exit_code
    return out


@pytest.mark.parametrize("failed", [False, True])
def test_wandb_offline_run(tmp_path: Path, video: Path, failed: bool) -> None:
    _drive(WandbLogger(project="flashdreams-test", tags=["unit"]), tmp_path, video, failed)
    run = _read_offline_run(tmp_path)
    assert run["name"] == "demo"
    assert run["config"]["model"] == {"name": "tiny"} and run["config"]["seed"] == 0
    rows = {row["_step"]: row for row in run["history"]}
    assert sorted(rows) == [0, 1, 2, 3]
    for step in STEPS:
        assert {k: rows[step["step"]][k] for k in step if k != "step"} == {
            k: v for k, v in step.items() if k != "step"
        }
    assert rows[3]["video._type"] == "video-file"
    assert {k: run["summary"][k] for k in SUMMARY} == SUMMARY
    assert run["exit_code"] == (1 if failed else 0)
    (copied,) = tmp_path.glob("wandb/offline-run-*/files/media/videos/*.mp4")
    assert copied.read_bytes() == video.read_bytes()


def test_wandb_one_run_per_job(tmp_path: Path, video: Path) -> None:
    """Sequential multirun jobs in one process get one run each, even if a job never finished."""
    crashed = WandbLogger(project="flashdreams-test")
    crashed.start(CONFIG, tmp_path / "0", "demo")
    crashed.log_step(0, STEPS[0])  # job 0 dies here without finish()
    _drive(WandbLogger(project="flashdreams-test"), tmp_path / "1", video)
    first, second = _read_offline_run(tmp_path / "0"), _read_offline_run(tmp_path / "1")
    assert len(first["history"]) == 1  # closed by reinit: its exit record was written
    assert len(second["history"]) == 4 and second["exit_code"] == 0


def test_wandb_disabled_mode_writes_no_run(tmp_path: Path, video: Path) -> None:
    _drive(WandbLogger(project="flashdreams-test", mode="disabled"), tmp_path, video)
    assert not list(tmp_path.glob("wandb/offline-run-*"))


def test_wandb_missing_video_is_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A run that failed before its first block has no video; teardown must not raise."""
    _drive(WandbLogger(project="flashdreams-test", mode="disabled"), tmp_path, tmp_path / "no.mp4")
    assert "no video" in caplog.text
