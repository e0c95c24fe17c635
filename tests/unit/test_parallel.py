"""Context parallelism on CPU (gloo): N processes give the latents of one process.

One spawned job per world size runs every case in one process group: the AR rollout (rolling
KV cache with a sink, so blocks are evicted) and the bidirectional forward (no cache, one step
over the clip), for ulysses, ring and usp, on a geometry that divides evenly (4 heads, 4 tokens
per frame) and one that does not (3 heads, 9 tokens per frame: heads and tokens padded).
The test compares rank 0's latents of each case with a single-process run of the same config
(in the test's own process, after the ranks: no rank waits in a collective meanwhile).
Tolerance: fp32, max abs error <= 1e-4 (the ring's log-sum-exp merge and the padded
all-to-alls only reorder fp32 sums; observed errors are ~1e-6).
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TOL = 1e-4
EVEN = ["model.dim=64", "model.num_heads=4", "rollout.height=32", "rollout.width=32"]
ODD = ["model.dim=48", "model.num_heads=3", "rollout.height=48", "rollout.width=48"]
TINY = ["device=cpu", "dtype=float32", "vae=none", "model.num_layers=2", "model.ffn_dim=96",
        "model.text_dim=32", "model.text_len=8"]  # fmt: skip
AR = ["cache=rolling", "cache.window_frames=4", "cache.sink_frames=1",
      "rollout.frames_per_block=2", "rollout.total_blocks=3"]  # fmt: skip
BIDIRECTIONAL = ["cache=none", "rollout.frames_per_block=5", "rollout.total_blocks=1"]
STRATEGIES = {
    2: {"ulysses": ["parallel=ulysses"], "ring": ["parallel=ring"]},
    4: {"ulysses": ["parallel=ulysses"], "ring": ["parallel=ring"],
        "usp": ["parallel=usp", "parallel.ulysses_degree=2"]},
}  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rollout_latents(overrides: list[str]) -> torch.Tensor:
    """(B, C, F, h, w) clean latents of every AR step of the composed config."""
    from flashdreams.build import build_rollout
    from flashdreams.rollout import run_rollout
    from tests.unit.test_config import compose_run

    rollout = build_rollout(compose_run(overrides))
    steps: list[torch.Tensor] = []
    prompts = ["a fox", "a cat"][: rollout.batch_size]
    run_rollout(rollout, prompts, lambda out: steps.append(out.latents))
    rollout.parallel.teardown()  # no-op here: the harness owns the process group
    return torch.cat(steps, dim=2)


def _cases(world: int) -> list[tuple[str, list[str], list[str]]]:
    cases = []
    for geometry, geo in (("even", EVEN), ("odd", ODD)):
        for mode, mod in (("ar", AR), ("bidirectional", BIDIRECTIONAL)):
            base = [*TINY, *geo, *mod]
            for name, strategy in STRATEGIES[world].items():
                cases.append((f"{name}-{geometry}-{mode}", base, strategy))
    batch2 = [*TINY, *ODD, *(AR if world == 4 else BIDIRECTIONAL), "rollout.batch_size=2"]
    cases.append(("batch2", batch2, STRATEGIES[world]["usp" if world == 4 else "ring"]))
    return cases


def _masked_forward_error(world: int) -> float:
    """Ulysses on a masked full-sequence forward (odd heads and tokens) vs one process."""
    from flashdreams.attention.sdpa import SdpaAttention
    from flashdreams.parallel.ulysses import UlyssesParallel
    from tests.conftest import make_tiny_model

    ref_model, model = (make_tiny_model(dim=48, num_heads=3, text_dim=32) for _ in range(2))
    policy = UlyssesParallel()
    policy.setup(torch.device("cpu"))
    model.set_attention(policy.attention(SdpaAttention()))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 2, 6, 6, generator=gen)  # 2 frames x 9 tokens
    ctx = ref_model.prepare_context(torch.randn(1, 16, 32, generator=gen))
    mask = (torch.rand(18, 18, generator=gen) < 0.5) | torch.eye(18, dtype=torch.bool)
    t = torch.tensor([500.0])
    return (model(x, t, ctx, mask=mask) - ref_model(x, t, ctx, mask=mask)).abs().max().item()


def join_gloo(rank: int, world: int, port: int) -> None:
    """A spawned test rank joins the loopback gloo group (300 s per collective; one thread)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=__import__("datetime").timedelta(seconds=300))  # fmt: skip
    torch.set_num_threads(1)


def leave_gloo(rank: int, out_path: str, results: dict) -> None:
    """Rank 0 hands its ``results`` (tensors and numbers) to the test; every rank leaves, all
    together: a rank that tore its group down while rank 0 still computed aborted at exit once
    in CI ("terminate called without an active exception")."""
    if rank == 0:
        torch.save(results, out_path)
    dist.barrier()
    dist.destroy_process_group()


def _entry(rank: int, worker, world: int, port: int, out_path: str) -> None:
    """A spawned rank: Python's fault handler writes where the rank was if it dies of a signal
    (an abort inside gloo leaves nothing else behind), then ``worker`` runs, and the rank ends
    with ``os._exit(0)`` once it left the group: in fresh-clone CI runs a rank whose work was
    done (empty fault log) still aborted at interpreter exit ("terminate called without an
    active exception": a gloo thread met by static destructors), which skipping them avoids."""
    import faulthandler
    import sys

    with open(f"{out_path}.rank{rank}.fault", "w") as log:
        faulthandler.enable(log)
        worker(rank, world, port, out_path)
        faulthandler.disable()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(worker, world: int, tmp_path) -> dict:
    """``worker(rank, world, port, out_path)`` on ``world`` spawned ranks (a free loopback
    port); returns the results rank 0 left with ``leave_gloo``. A rank killed by a signal fails
    the test with the Python stacks the fault handler wrote."""
    out = tmp_path / "results.pt"
    try:
        mp.spawn(_entry, args=(worker, world, free_port(), str(out)), nprocs=world, join=True)
    except mp.ProcessExitedException as err:
        stacks = [f"rank {r}:\n{(tmp_path / f'results.pt.rank{r}.fault').read_text()}"
                  for r in range(world) if (tmp_path / f"results.pt.rank{r}.fault").exists()]  # fmt: skip
        raise AssertionError(f"{err}\n" + "\n".join(stacks)) from err
    return torch.load(out, weights_only=True)


def _worker(rank: int, world: int, port: int, out_path: str) -> None:
    join_gloo(rank, world, port)
    results = {name: rollout_latents(base + strategy) for name, base, strategy in _cases(world)}
    results["ulysses-masked"] = _masked_forward_error(world)
    leave_gloo(rank, out_path, results)


@pytest.mark.parametrize("world", [2, 4])
def test_context_parallel_matches_single_process(world, tmp_path):
    results = run_ranks(_worker, world, tmp_path)
    assert results.pop("ulysses-masked") <= TOL
    refs = {}  # single-process runs here, not in rank 0: no rank waits in a collective for them
    cases = _cases(world)
    assert set(results) == {name for name, _, _ in cases}
    for name, base, _ in cases:
        if tuple(base) not in refs:
            refs[tuple(base)] = rollout_latents(base)
        ref, got = refs[tuple(base)], results[name]
        assert got.shape == ref.shape, name
        err = (got - ref).abs().max().item()
        assert err <= TOL, f"{name}: max abs error {err:.2e} (latents up to {ref.abs().max():.2f})"


# ---------------------------------------------------------------- index math and checks (no comms)
@pytest.mark.parametrize("tpf,u,r", [(9, 2, 1), (9, 1, 4), (9, 2, 2), (6, 4, 1), (1560, 4, 2)])
def test_layout_shards_cover_every_token_once(tpf, u, r):
    from flashdreams.parallel.layout import TokenLayout

    frames, batch, count = 3, 2, 2
    lays = [TokenLayout(tpf, u, r, q) for q in range(u * r)]
    tokens = torch.arange(frames * tpf)
    shards = [tokens[lay.shard(frames, "cpu")] for lay in lays]
    gathered = torch.cat(shards)[lays[0].unshard(frames, "cpu")]
    assert torch.equal(gathered, tokens)  # scatter then gather is the identity
    keys = []
    for lay in lays:  # simulate the all-to-all receive buffer of lay's ulysses group
        members = torch.stack([shards[q] for q in lay.group_ranks(lay.group)])  # (u, Ls)
        recv = members[:, None, None, :] + 10**6 * torch.arange(count * batch).view(
            1, count, batch, 1
        )
        picked = recv.flatten()[lay.group_select(frames, batch, count, "cpu")]
        offsets = 10**6 * torch.arange(count * batch).view(count, batch, 1)
        expected = lay.group_keys(frames, "cpu") + offsets
        assert torch.equal(picked, expected)
        assert lay.group_keys(frames, "cpu").numel() == frames * lay.group_tokens()
        if lay.rank % u == 0:
            keys.append(lay.group_keys(frames, "cpu"))
    assert torch.equal(torch.cat(keys).sort().values, tokens)  # ring groups hold disjoint keys


def _policy(cls, world: int, **kwargs):
    policy = cls(**kwargs)
    policy.world_size = world
    return policy


def test_degrees_default_to_the_world_size_and_are_checked():
    from flashdreams import ConfigError
    from flashdreams.parallel.ring import RingParallel
    from flashdreams.parallel.ulysses import UlyssesParallel
    from flashdreams.parallel.usp import UspParallel

    assert _policy(UlyssesParallel, 8)._degrees() == (8, 1)
    assert _policy(RingParallel, 8)._degrees() == (1, 8)
    assert _policy(UspParallel, 8, ulysses_degree=4)._degrees() == (4, 2)
    assert _policy(UspParallel, 1, ulysses_degree=1)._degrees() == (1, 1)
    bad = [(UspParallel, 4, {"ulysses_degree": 3}, "parallel.ulysses_degree=3 does not divide"),
           (UspParallel, 1, {}, "parallel.ulysses_degree=2 does not divide the world size 1"),
           (UspParallel, 8, {"ulysses_degree": 2, "ring_degree": 2}, "must equal the world size 8"),
           (RingParallel, 4, {"ring_degree": 0}, "parallel.ring_degree=0 must be a positive")]  # fmt: skip
    for cls, world, kwargs, message in bad:
        with pytest.raises(ConfigError, match=message):
            _policy(cls, world, **kwargs)._degrees()


def test_cache_share_and_too_few_tokens():
    from flashdreams import ConfigError
    from flashdreams.parallel.layout import TokenLayout
    from flashdreams.parallel.ring import RingParallel
    from flashdreams.parallel.ulysses import UlyssesParallel

    def share(policy, heads, tpf):
        policy.ulysses, policy.ring = policy._degrees()
        return policy.cache_factory(lambda **dims: dims)(num_heads=heads, tokens_per_frame=tpf)

    assert share(_policy(UlyssesParallel, 8), 12, 1560) == {
        "num_heads": 2,
        "tokens_per_frame": 1560,
    }
    assert share(_policy(RingParallel, 4), 12, 1561) == {"num_heads": 12, "tokens_per_frame": 391}
    with pytest.raises(ConfigError, match="3 latent tokens per frame cannot be split over 4"):
        TokenLayout(3, 4, 1, 0)
