"""An exception or Ctrl-C mid-rollout keeps a playable video and the completed steps."""

import json

import pytest

from flashdreams.io.video import read_video_frames
from flashdreams.job import run_job
from flashdreams.logger.jsonl import JsonlLogger
from flashdreams.rollout import Rollout
from tests.unit.test_config import compose_run


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_interrupted_run_keeps_video_and_completed_steps(tmp_path, monkeypatch, error):
    real_step = Rollout.step
    finished = {}

    def flaky_step(self, sync=False):
        if self.step_index == 3:
            raise error("stop mid-rollout")
        return real_step(self, sync)

    real_finish = JsonlLogger.finish

    def spy_finish(self, failed=False):
        finished["failed"] = failed
        real_finish(self, failed)

    monkeypatch.setattr(Rollout, "step", flaky_step)
    monkeypatch.setattr(JsonlLogger, "finish", spy_finish)
    cfg = compose_run([f"paths.root={tmp_path}", "logger=jsonl"])
    with pytest.raises(error):
        run_job(cfg)
    run_dir = next((tmp_path / "runs" / "demo").iterdir())
    stats = json.loads((run_dir / "stats.json").read_text())
    assert stats["status"] == ("interrupted" if error is KeyboardInterrupt else "failed")
    assert [s["step"] for s in stats["steps"]] == [0, 1, 2]
    assert read_video_frames(run_dir / "video.mp4") == 9 + 12 + 12
    assert finished["failed"] is True
