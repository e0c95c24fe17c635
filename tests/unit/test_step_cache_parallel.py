"""A step cache under context parallelism takes the decisions of one process.

Two CPU processes (gloo) run the tiny bidirectional Wan recipe of ``test_step_cache`` (10 UniPC
steps, CFG as two forwards) with DBCache at a threshold that reuses some steps, under
``parallel=ulysses`` on an odd geometry (3 heads, 9 tokens per frame: pad tokens on a rank) and
under ``parallel=ring``. Each rank measures the residual change on its own shard; the ratio of
sums over every rank's real tokens (``SequenceParallel.total``, one all-reduce per sum) must give
every rank, and the single process, the same computed / reused pattern. Tolerance of the
latents against the single process: fp32, max abs error <= 1e-4 (the same decisions leave only
reordered sums).
"""

from __future__ import annotations

import json

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.unit.test_parallel import free_port, join_gloo

STEPS = 10
BASE = ["recipe=wan21_t2v_1_3b_480p", "model.dim=48", "model.num_heads=3", "model.num_layers=6",
        "model.ffn_dim=96", "model.text_dim=32", "model.text_len=8", "model.checkpoint=null",
        "device=cpu", "dtype=float32", "text_encoder=random", "vae=none", "~vae.checkpoint",
        "~vae.chunk_frames", "rollout.height=48", "rollout.width=48",
        "rollout.frames_per_block=3", f"scheduler.num_steps={STEPS}", "step_cache=dbcache",
        "step_cache.front_blocks=1", "step_cache.back_blocks=1", "step_cache.warmup_steps=2",
        "step_cache.threshold=0.5"]  # fmt: skip


def _run(overrides: list[str]) -> tuple[torch.Tensor, list[bool]]:
    from flashdreams.build import build_rollout
    from tests.unit.test_config import compose_run

    torch.manual_seed(1)
    noise = torch.randn(1, 16, 3, 6, 6)
    rollout = build_rollout(compose_run(overrides), noise_fn=lambda shape: noise.clone())
    rollout.start(["a fox"])
    latents = rollout.step().latents
    computed = [r["computed"] for r in rollout.model.step_cache.records()]
    return latents, computed


def _worker(rank: int, world: int, port: int, out_path: str) -> None:
    join_gloo(rank, world, port)
    results = {}
    for name in ("ulysses", "ring"):
        latents, computed = _run([*BASE, f"parallel={name}"])
        results[name] = {"latents": latents.flatten().tolist(), "computed": computed}
    if rank == 0:
        ref, computed = _run(BASE)
        results["single"] = {"latents": ref.flatten().tolist(), "computed": computed}
    with open(f"{out_path}.{rank}", "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


def test_ranks_take_the_single_process_decisions(tmp_path):
    out = tmp_path / "results"
    mp.spawn(_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"results.{r}").read_text()) for r in range(2)]
    single = ranks[0]["single"]
    assert len(single["computed"]) == 2 * STEPS  # two CFG forwards per step
    assert 0 < single["computed"].count(False) < 2 * STEPS - 4, single["computed"]  # mixed
    ref = torch.tensor(single["latents"])
    for rank, results in enumerate(ranks):
        for name in ("ulysses", "ring"):
            got = results[name]
            assert got["computed"] == single["computed"], f"rank {rank} {name}: other decisions"
            err = (torch.tensor(got["latents"]) - ref).abs().max().item()
            assert err <= 1e-4, f"rank {rank} {name}: max abs error {err:.2e}"
