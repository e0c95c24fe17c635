"""``parallel.fp8_all_to_all``: Ulysses exchanges Q, K/V and O as float8 e4m3 with per-head scales.

1. The quantizer alone: every element within e4m3's rounding of its input (relative 2**-4, plus
   half the smallest subnormal step times the head's scale), one scale per (rank, tensor, head).
2. Two CPU processes (gloo), the tiny Wan (odd geometry: 3 heads padded to 4, 9 tokens per frame
   padded), an AR rollout with a rolling KV cache and a bidirectional forward: the fp8 exchange
   against the same ranks' unquantized exchange. Tolerance: relative L2 error of the latents
   <= 2e-2 (e4m3 rounding of every exchanged activation, propagated through 2 blocks and the
   steps), and > 0 (the fp8 path really ran).
"""

from __future__ import annotations

import pytest
import torch

from tests.unit.test_parallel import (
    AR,
    BIDIRECTIONAL,
    ODD,
    TINY,
    join_gloo,
    leave_gloo,
    rollout_latents,
    run_ranks,
)

REL_L2 = 2e-2


def test_quantize_heads_rounds_within_e4m3_and_scales_per_head():
    from flashdreams.parallel.all_to_all import dequantize_heads, quantize_heads

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2, 1, 5, 3, 8, generator=gen)  # (degree, N, B, L, H, D)
    x[:, :, :, :, 1] *= 100.0  # one loud head: its scale must not crush the others
    payload, scale = quantize_heads(x)
    assert payload.dtype == torch.uint8 and payload.shape == x.shape
    assert scale.shape == (2, 2, 3)
    back = dequantize_heads(payload, scale, x.dtype)
    bound = x.abs() * 2.0**-4 + scale.view(2, 2, 1, 1, 3, 1) * 2.0**-10
    assert bool(((back - x).abs() <= bound + 1e-12).all())
    quiet = x[:, :, :, :, 0]  # a head of unit scale keeps ~3 significant bits, not 0
    assert (back[:, :, :, :, 0] - quiet).norm() / quiet.norm() < 0.04


def _worker(rank: int, world: int, port: int, out_path: str) -> None:
    join_gloo(rank, world, port)
    errors = {}
    for name, mode in (("ar", AR), ("bidirectional", BIDIRECTIONAL)):
        base = [*TINY, *ODD, *mode, "parallel=ulysses"]
        exact = rollout_latents(base)
        fp8 = rollout_latents([*base, "parallel.fp8_all_to_all=true"])
        errors[name] = float((fp8 - exact).norm() / exact.norm())
    leave_gloo(rank, out_path, errors)


def test_fp8_exchange_matches_the_unquantized_exchange(tmp_path):
    errors = run_ranks(_worker, 2, tmp_path)
    assert set(errors) == {"ar", "bidirectional"}
    for name, err in errors.items():
        assert 0.0 < err <= REL_L2, f"{name}: relative L2 error {err:.2e}"


def test_fp8_exchange_needs_an_all_to_all():
    from flashdreams import ConfigError
    from flashdreams.parallel.usp import UspParallel

    policy = UspParallel(ulysses_degree=1, fp8_all_to_all=True)
    policy.world_size = 2  # as after joining a 2-rank group: a pure ring, nothing to quantize
    policy.rank = 0
    with pytest.raises(ConfigError, match="parallel.fp8_all_to_all=true needs an all-to-all"):
        policy.setup(torch.device("cpu"))
