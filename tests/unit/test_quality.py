"""quality=true: stats.json carries per-step cosine / PSNR against a precision=bf16 reference."""

import json
import math

import pytest
import torch

from flashdreams.job import run_job
from flashdreams.quality import PSNR_CAP_DB, cosine, psnr_db, reference_config
from tests.unit.test_config import compose_run


def _stats(tmp_path, overrides):
    cfg = compose_run(["quality=true", "rollout.total_blocks=2", f"paths.root={tmp_path}",
                       *overrides])  # fmt: skip
    assert run_job(cfg) == 0
    (path,) = tmp_path.glob("runs/demo/*/stats.json")
    return json.loads(path.read_text())


def test_metrics():
    a = torch.randn(2, 3, 4)
    assert cosine(a, a) == pytest.approx(1.0, abs=1e-12)
    assert cosine(a, -a) == pytest.approx(-1.0, abs=1e-12)
    assert psnr_db(a.sigmoid(), a.sigmoid()) == PSNR_CAP_DB
    assert psnr_db(torch.zeros(4), torch.full((4,), 0.1)) == pytest.approx(20.0)


def test_reference_config_is_bf16_without_offload():
    cfg = compose_run(["precision=fp8", "precision.kv_cache=fp8", "offload=blocks", "quality=true"])
    ref = reference_config(cfg)
    assert ref.precision._target_ == "flashdreams.precision.base.Precision"
    assert ref.precision.kv_cache is None and ref.offload == "none" and not ref.quality
    assert cfg.precision.kv_cache == "fp8"  # the run's config is untouched


def test_bf16_against_bf16_is_identical(tmp_path, capsys):
    stats = _stats(tmp_path, [])
    # precision=bf16 computes in the run's dtype: float32 on the CPU, bfloat16 on CUDA
    assert stats["precision"] == {"float32": "fp32", "bfloat16": "bf16"}[stats["dtype"]]
    assert stats["offload"] == "none"
    rows = stats["quality"]
    assert [r["step"] for r in rows] == [0, 1]
    for row in rows:
        assert len(row["dit_cosine"]) == 4  # one per denoising step of the block
        assert row["min_dit_cosine"] == pytest.approx(1.0, abs=1e-12)
        assert row["latent_cosine"] == pytest.approx(1.0, abs=1e-12)
        assert row["psnr_db"] == PSNR_CAP_DB
    s = stats["summary"]
    assert s["quality_reference"] == "precision=bf16"
    assert s["quality_min_cosine"] == pytest.approx(1.0, abs=1e-12)
    assert s["quality_min_psnr_db"] == PSNR_CAP_DB
    assert "quality vs precision=bf16" in capsys.readouterr().out


def test_emulated_fp8_is_measured_against_bf16(tmp_path):
    stats = _stats(tmp_path, ["precision=fp8", "precision.emulate=true",
                              "precision.min_out_features=0"])  # fmt: skip
    assert stats["precision"] == "fp8 (reference)"
    s = stats["summary"]
    assert 0.99 < s["quality_min_cosine"] < 1.0
    assert 20.0 < s["quality_min_psnr_db"] < PSNR_CAP_DB and math.isfinite(s["quality_min_psnr_db"])


def test_forced_reference_runs_on_the_runs_latents():
    from flashdreams.build import build_rollout
    from flashdreams.quality import QualityReport

    over = ["precision=fp8", "precision.emulate=true", "precision.min_out_features=0",
            "rollout.total_blocks=2"]  # fmt: skip
    cfg = compose_run(over)
    for mode in ("free", "forced"):
        run = build_rollout(cfg)
        report = QualityReport(run, build_rollout(reference_config(cfg)), mode)
        run.start(["a prompt"])
        rows = []
        for _ in range(2):
            out = run.step()
            rows.append(report.compare(out))
            same = torch.equal(report.last_reference.latents, out.latents)
            assert same == (mode == "forced")  # forced: the reference hands on the run's latents
        for row in rows:
            assert 0.99 < row["min_dit_cosine"] < 1.0  # the DiT calls themselves still differ
            assert (row["latent_cosine"] is None) == (mode == "forced")
    assert report.summary()["quality_reference"] == "precision=bf16 (teacher-forced)"


def test_bad_quality_mode_is_one_line():
    from flashdreams import ConfigError
    from flashdreams.quality import build_quality

    cfg = compose_run(["quality=true", "quality_mode=teacher"])
    with pytest.raises(ConfigError, match="quality_mode='teacher'"):
        build_quality(cfg, None)
