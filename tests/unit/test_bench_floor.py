"""The benchmark floor counts the FLOPs of the shape and the model that really run (VAE
factor, CFG, action modules, a re-run history), and a diffusers peer only where one exists."""

from __future__ import annotations

import pytest

from flashdreams import ConfigError
from flashdreams.bench import (
    check_peer,
    flops_ms,
    ran_fp8_linears,
    step_floor,
    step_shapes,
    timed_kv_frames,
)
from flashdreams.build import construct_model
from tests.unit.test_config import compose_run


def forward_flops(cfg_model, q_tokens, kv_tokens):
    tpf = 10  # whole frames of every shape below
    return construct_model(cfg_model).forward_flops(q_tokens, kv_tokens, tpf)


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
    f = construct_model(cfg.model).forward_flops(frames * tpf, frames * tpf, tpf)
    one = ((f["linear"] + f["embed"]) / 500.0 + f["attention"] / 250.0) / 1e9
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
    gemm = f["linear"] + f["embed"]
    assert bf16 - fp8 == pytest.approx(steps * gemm * (1 / 500.0 - 1 / 1000.0) / 1e9)


def test_the_floor_charges_fp8_linears_only_where_they_ran():
    """What the stats header records as applied decides the linears' rate, not the config: a
    precision=fp8 run on a GPU without FP8 GEMMs kept bf16 and is charged the bf16 rate."""
    assert ran_fp8_linears({"precision": "fp8 (scaled_mm)"})
    assert not ran_fp8_linears({"precision": "bfloat16 (fp8 unavailable)"})
    assert not ran_fp8_linears({"precision": "bf16"})
    assert not ran_fp8_linears({})  # stats from before the header recorded it


def test_the_floor_counts_the_models_own_flops():
    """Matrix-Game's floor holds its action modules: more than a Wan DiT of the same shape, by
    exactly what the model counts for them."""
    tiny = [*TINY, "model.action_blocks=1", "model.image_dim=16"]
    cfg = compose_run(["recipe=matrix_game2_universal", *tiny])
    stats = {"steps": [{"step": 3}], "tokens_per_frame": 10, "forwards_per_step": 1}
    model = construct_model(cfg.model)
    row = step_floor(cfg, stats, THROUGHPUT, 10, model)[0]
    frames = cfg.rollout.frames_per_block
    steps = len(cfg.scheduler.timesteps)
    q, kv = frames * 10, row["kv_tokens"]
    action = model.blocks[0].action_model.flops(q, kv, 10)
    wan = model.forward_flops(q, kv, 10)
    for part in ("linear", "attention"):
        wan[part] -= action[part]
    assert row["floor_ms"] == pytest.approx(steps * flops_ms(model.forward_flops(q, kv, 10),
                                                             THROUGHPUT))  # fmt: skip
    assert row["floor_ms"] > steps * flops_ms(wan, THROUGHPUT) * 1.01


def test_the_floor_of_a_rerun_history_counts_the_memory_forward():
    """HY-WorldPlay re-runs up to ``context_frames`` history frames before each block (a
    ``forward_kv``: its last block stops at the K/V, no head), then the block attends to them
    and itself."""
    cfg = compose_run(["recipe=hy_worldplay_wan_i2v_5b", *TINY, "model.memory_points=100"])
    model = construct_model(cfg.model)
    fpb, ctx = cfg.rollout.frames_per_block, model.context_frames
    stats = {"steps": [{"step": 0}, {"step": 9}], "tokens_per_frame": 10, "forwards_per_step": 1}
    first, late = step_floor(cfg, stats, THROUGHPUT, 10, model)
    steps = len(cfg.scheduler.timesteps)
    assert first["kv_tokens"] == fpb * 10  # no history before the first block
    assert late["kv_tokens"] == (ctx + fpb) * 10
    memory = flops_ms(model.forward_kv_flops(ctx * 10, ctx * 10, 10), THROUGHPUT)
    block = flops_ms(model.forward_flops(fpb * 10, (ctx + fpb) * 10, 10), THROUGHPUT)
    assert late["floor_ms"] == pytest.approx(memory + steps * block)
    whole = flops_ms(model.forward_flops(ctx * 10, ctx * 10, 10), THROUGHPUT)
    assert memory < whole * (1 - 0.5 / model.num_layers)  # the last block's tail is not counted


def test_the_attention_rate_is_measured_at_the_windowed_steps_shape():
    """Matrix-Game attends to a window of 6 latent frames: the floor's attention rate is
    measured at the timed steps' 6 frames of keys (not at the frames generated so far), and
    each step's floor counts that many."""
    cfg = compose_run(["recipe=matrix_game2_universal", *TINY, "model.action_blocks=1"])
    model = construct_model(cfg.model)
    stats = {"steps": [{"step": i} for i in range(12)]}
    shapes = step_shapes(cfg, stats, model)
    assert [s["kv_frames"] for s in shapes] == [3] + [6] * 11
    assert timed_kv_frames(shapes) == cfg.cache.window_frames == 6
    grown = compose_run(["recipe=self_forcing_wan21_t2v_1_3b", *TINY])  # no window: 3 .. 21
    shapes = step_shapes(grown, {"steps": [{"step": i} for i in range(7)]}, model)
    assert [s["kv_frames"] for s in shapes] == [3, 6, 9, 12, 15, 18, 21]
    assert timed_kv_frames(shapes) == 15  # the median of steps 2..6


def test_peer_only_for_a_plain_wan():
    check_peer(compose_run(["recipe=self_forcing_wan21_t2v_1_3b", *TINY, "+bench.peer=true"]))
    cfg = compose_run(["recipe=matrix_game2_universal", *TINY, "model.action_blocks=1",
                       "+bench.peer=true"])  # fmt: skip
    with pytest.raises(
        ConfigError, match=r"^bench.peer=true .*\(MatrixGameDiT\).*bench.peer=false$"
    ):
        check_peer(cfg)
