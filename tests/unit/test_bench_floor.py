"""The benchmark floor counts the FLOPs of the shape that really runs (VAE factor, CFG)."""

from __future__ import annotations

import pytest

from flashdreams.bench import forward_flops, ran_fp8_linears, step_floor
from tests.unit.test_config import compose_run

TINY = ["model.dim=64", "model.num_heads=4", "model.num_layers=2", "model.ffn_dim=128",
        "model.text_dim=32", "model.text_len=16"]  # fmt: skip
THROUGHPUT = {"matmul_tflops": 500.0, "attention_tflops": 250.0}


def _floor(cfg, tokens_per_frame, forwards):
    stats = {"steps": [{"step": 0}], "tokens_per_frame": tokens_per_frame,
             "forwards_per_step": forwards}  # fmt: skip
    return step_floor(cfg, stats, THROUGHPUT, tokens_per_frame)[0]


def test_bidirectional_floor_counts_both_guidance_forwards():
    cfg = compose_run(["recipe=wan21_t2v_1_3b_480p", "scheduler.num_steps=3", *TINY])
    tpf = (480 // 8 // 2) * (832 // 8 // 2)
    frames = cfg.rollout.frames_per_block
    f = forward_flops(cfg.model, frames * tpf, frames * tpf)
    one = (f["linear"] / 500.0 + f["attention"] / 250.0) / 1e9
    assert _floor(cfg, tpf, 1)["floor_ms"] == pytest.approx(3 * one)
    assert _floor(cfg, tpf, 2)["floor_ms"] == pytest.approx(6 * one)


def test_tokens_per_frame_follow_the_vae_factor():
    """Wan 2.2's VAE compresses 16x: a 704x1280 frame is 22 x 40 DiT tokens, not 44 x 80."""
    from flashdreams.build import build_rollout

    cfg = compose_run(["recipe=wan22_ti2v_5b_720p", *TINY, "device=cpu", "dtype=float32",
                       "text_encoder=random", "vae.checkpoint=null", "vae.base_dim=8",
                       "model.checkpoint=null", "rollout.height=64", "rollout.width=128",
                       "conditioner.encoder.checkpoint=null", "conditioner.encoder.base_dim=8",
                       "conditioner.encoder.num_res_blocks=1"])  # fmt: skip
    rollout = build_rollout(cfg)
    assert rollout.cache_tokens_per_frame() == (64 // 16 // 2) * (128 // 16 // 2)
    assert rollout.guidance.needs_negative


def test_fp8_runs_charge_the_linears_at_the_fp8_gemm_rate():
    cfg = compose_run(["recipe=self_forcing_wan21_t2v_1_3b", *TINY])
    stats = {"steps": [{"step": 0}], "tokens_per_frame": 10, "forwards_per_step": 1}
    bf16 = step_floor(cfg, stats, THROUGHPUT, 10)[0]["floor_ms"]
    fp8 = step_floor(cfg, stats, {**THROUGHPUT, "linear_tflops": 1000.0}, 10)[0]["floor_ms"]
    f = forward_flops(
        cfg.model, cfg.rollout.frames_per_block * 10, cfg.rollout.frames_per_block * 10
    )
    steps = len(cfg.scheduler.timesteps)
    assert bf16 - fp8 == pytest.approx(steps * f["linear"] * (1 / 500.0 - 1 / 1000.0) / 1e9)


def test_the_floor_charges_fp8_linears_only_where_they_ran():
    """What the stats header records as applied decides the linears' rate, not the config: a
    precision=fp8 run on a GPU without FP8 GEMMs kept bf16 and is charged the bf16 rate."""
    assert ran_fp8_linears({"precision": "fp8 (scaled_mm)"})
    assert not ran_fp8_linears({"precision": "bfloat16 (fp8 unavailable)"})
    assert not ran_fp8_linears({"precision": "bf16"})
    assert not ran_fp8_linears({})  # stats from before the header recorded it
