"""Context parallelism applies to CosmosDiT as to Wan: 2 CPU processes (gloo) give the latents
of one process, for the bidirectional CFG recipe under Ulysses and a block-causal AR rollout
(the distilled 4-step recipe with a rolling KV cache and a sink) under ring attention. Tolerance: fp32, max abs error <= 1e-4."""

from __future__ import annotations

from tests.unit.test_parallel import join_gloo, leave_gloo, rollout_latents, run_ranks

TINY = ["model=cosmos_tiny", "model.checkpoint=null", "device=cpu", "dtype=float32",
        "text_encoder=random", "vae=none", "~vae.checkpoint", "~vae.chunk_frames", "rollout.height=32",
        "rollout.width=32"]  # fmt: skip
CASES = {
    "ulysses-bidirectional": ["recipe=cosmos_predict2_5_2b_t2v", *TINY, "scheduler.num_steps=1",
                              "rollout.frames_per_block=3", "parallel=ulysses"],
    "ring-ar": ["recipe=cosmos_predict2_5_2b_distilled_t2v", *TINY,
                "scheduler.timesteps=[1000,500]", "cache=rolling", "cache.window_frames=4",
                "cache.sink_frames=1", "rollout.frames_per_block=2", "rollout.total_blocks=3",
                "parallel=ring"],
}  # fmt: skip


def _worker(rank: int, world: int, port: int, out_path: str) -> None:
    join_gloo(rank, world, port)
    leave_gloo(rank, out_path, {name: rollout_latents(o) for name, o in CASES.items()})


def test_context_parallel_cosmos_matches_single_process(tmp_path):
    got = run_ranks(_worker, 2, tmp_path)
    assert set(got) == set(CASES)
    for name, overrides in CASES.items():  # the single-process runs here, after the ranks
        ref = rollout_latents([o for o in overrides if not o.startswith("parallel=")])
        assert got[name].shape == ref.shape, name
        err = (got[name] - ref).abs().max().item()
        assert err <= 1e-4, f"{name}: max abs error {err:.2e}"
