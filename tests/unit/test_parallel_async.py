"""``parallel.async_qkv``: the Ulysses exchanges issued asynchronously give the same latents.

Four CPU processes (gloo, whose async collectives really run on background threads while the
caller packs, picks rows and attends), the tiny Wan with 6 heads and 9 tokens per frame (heads
padded: 8 over 4 ranks -> 2 per rank, two head chunks of one; 6 over 2 -> 3, chunks of 1 and 2;
tokens padded). Ulysses (degree 4) and usp (2 x ring 2) each run an AR rollout with a rolling
KV cache, and with ``fp8_all_to_all`` a bidirectional forward, with and without
``async_qkv``.

Tolerance: ulysses bit-equal (the async path changes only when bytes move, and the fp8 scales
are per head, so splitting by tensor or head changes none). usp: the ring attends each head
chunk as its own ring pass, whose CPU kernel runs on differently strided K/V and reorders fp32
sums (observed max abs 7e-7): max abs <= 1e-4 as in ``test_parallel``; with fp8 such a
difference can move a value across an e4m3 rounding step (observed 6e-6): relative L2 <= 1e-3,
a twentieth of the fp8 exchange's own bound.
"""

from __future__ import annotations

import pytest

from tests.unit.test_parallel import (
    AR,
    BIDIRECTIONAL,
    TINY,
    join_gloo,
    leave_gloo,
    rollout_latents,
    run_ranks,
)

SIX_HEADS = ["model.dim=48", "model.num_heads=6", "rollout.height=48", "rollout.width=48"]
ULYSSES, USP = ["parallel=ulysses"], ["parallel=usp", "parallel.ulysses_degree=2"]
FP8 = ["parallel.fp8_all_to_all=true"]
CASES = {  # name: (overrides, modes)
    "ulysses": (ULYSSES, ("ar",)),
    "usp": (USP, ("ar",)),
    "ulysses-fp8": ([*ULYSSES, *FP8], ("bidirectional",)),
    "usp-fp8": ([*USP, *FP8], ("bidirectional",)),
}
MODES = {"ar": AR, "bidirectional": BIDIRECTIONAL}


def _worker(rank: int, world: int, port: int, out_path: str) -> None:
    join_gloo(rank, world, port)
    results = {}
    for name, (strategy, modes) in CASES.items():
        for mode in modes:
            base = [*TINY, *SIX_HEADS, *MODES[mode], *strategy]
            sync = rollout_latents(base)
            overlapped = rollout_latents([*base, "parallel.async_qkv=true"])
            results[f"{name}-{mode}"] = {
                "equal": bool((overlapped == sync).all()),
                "err": (overlapped - sync).abs().max().item(),
                "rel": ((overlapped - sync).norm() / sync.norm()).item(),
                "scale": sync.abs().max().item(),
            }
    leave_gloo(rank, out_path, results)


def test_async_exchange_equals_the_synchronous_exchange(tmp_path):
    results = run_ranks(_worker, 4, tmp_path)
    assert len(results) == sum(len(modes) for _, modes in CASES.values())
    for name, r in results.items():
        assert r["scale"] > 0, name
        detail = f"{name}: max abs difference {r['err']:.2e}, relative L2 {r['rel']:.2e}"
        if name.startswith("ulysses"):
            assert r["equal"], detail
        elif "fp8" in name:
            assert r["rel"] <= 1e-3, detail
        else:
            assert r["err"] <= 1e-4, detail


def test_async_exchange_needs_an_all_to_all():
    from flashdreams import ConfigError
    from flashdreams.parallel.usp import UspParallel

    policy = UspParallel(ulysses_degree=1, async_qkv=True)
    policy.world_size = 2  # as after joining a 2-rank group: a pure ring, no all-to-all to overlap
    policy.rank = 0
    with pytest.raises(ConfigError, match="parallel.async_qkv=true needs an all-to-all"):
        policy.setup(__import__("torch").device("cpu"))


def test_async_exchange_of_one_process_is_a_no_op():
    import torch

    from flashdreams.attention.base import Attention
    from flashdreams.attention.sdpa import SdpaAttention
    from flashdreams.parallel.ulysses import UlyssesParallel

    policy = UlyssesParallel(async_qkv=True)
    assert policy.setup(torch.device("cpu")) == torch.device("cpu")
    assert type(policy.attention(SdpaAttention())) is Attention  # no hook, no collectives
