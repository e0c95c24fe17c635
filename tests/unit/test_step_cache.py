"""Step caching (``step_cache`` group): DBCache and TaylorSeer on the bidirectional Wan recipe.

One tiny random Wan 2.1 T2V DiT (6 layers, dim 64) runs ``wan21_t2v_1_3b_480p``'s sampler
(UniPC, shift 5, CFG 5 with two forwards per step) for 10 steps on a 3-frame 32x32 clip, built
once; each case installs its step cache (``DiT.set_step_cache``, as the build does) and reruns
the clip on the same injected noise. Tolerance of a cached run against the uncached one (random
weights change much more per step than trained ones, so few steps pass a threshold): cosine
>= 0.99 and max abs difference <= 10 % of the latents' max abs value (observed with 2-4 of the
10 steps reused: cosine >= 0.998, max abs difference <= 6.6 %). No VAE: latents are compared.
"""

from __future__ import annotations

import pytest
import torch

from flashdreams import ConfigError
from flashdreams.build import build_rollout
from flashdreams.step_cache.base import StepCache
from flashdreams.step_cache.dbcache import DBCache, TaylorSeer, relative_l1
from tests.unit.test_config import compose_run

FRAMES, SIZE, STEPS, LAYERS = 3, 32, 10, 6
DIT = ["model.dim=64", "model.num_heads=4", f"model.num_layers={LAYERS}", "model.ffn_dim=128",
       "model.text_dim=32", "model.text_len=16", "model.checkpoint=null"]  # fmt: skip
RUN = ["device=cpu", "dtype=float32", "text_encoder=random", "vae=none", "~vae.checkpoint",
       "~vae.chunk_frames", f"rollout.height={SIZE}", f"rollout.width={SIZE}",
       f"rollout.frames_per_block={FRAMES}", f"scheduler.num_steps={STEPS}",
       "prompt='a fox'", "negative_prompt='blurry'"]  # fmt: skip
RECIPE = ["recipe=wan21_t2v_1_3b_480p", *DIT, *RUN]


@pytest.fixture(scope="module")
def clip():
    """(run(step_cache) -> latents, the uncached latents, the rollout)."""
    torch.manual_seed(1)
    noise = torch.randn(1, 16, FRAMES, SIZE // 8, SIZE // 8)
    rollout = build_rollout(compose_run(RECIPE), noise_fn=lambda shape: noise.clone())

    def run(step_cache: StepCache) -> torch.Tensor:
        rollout.model.set_step_cache(step_cache)
        rollout.start(["a fox"])
        return rollout.step().latents

    reference = run(StepCache())
    yield run, reference, rollout
    rollout.model.set_step_cache(StepCache())


def _close(out: torch.Tensor, ref: torch.Tensor) -> None:
    cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0)
    rel = (out - ref).abs().max() / ref.abs().max()
    assert cos >= 0.99, f"cosine {cos:.5f}"
    assert rel <= 0.1, f"max abs difference {rel:.3f} of the latents' max abs value"


def test_threshold_zero_equals_uncached_bit_for_bit(clip):
    run, ref, _ = clip
    cache = DBCache(front_blocks=1, back_blocks=1, threshold=0.0, warmup_steps=0)
    out = run(cache)
    assert torch.equal(out, ref)
    assert cache.middle_passes == 2 * STEPS  # both CFG branches, every step
    records = cache.records()
    assert [(r["step"], r["branch"]) for r in records] == [
        (s, b) for s in range(STEPS) for b in (0, 1)
    ]
    assert all(r["computed"] for r in records)
    assert all(r["diff"] is None for r in records)  # threshold 0: never measured (cache-dit)


def test_threshold_reuses_middle_blocks_within_tolerance(clip):
    run, ref, _ = clip
    cache = DBCache(front_blocks=1, back_blocks=1, threshold=0.5, warmup_steps=2)
    out = run(cache)
    reused = [r for r in cache.records() if not r["computed"]]
    assert 0 < len(reused) and cache.middle_passes == 2 * STEPS - len(reused)
    assert all(r["step"] >= 2 and r["diff"] < 0.5 for r in reused)  # warm-up, then threshold
    measured = [r for r in cache.records() if r["diff"] is not None]
    assert all(r["computed"] == (r["diff"] >= 0.5) for r in measured)
    assert not torch.equal(out, ref)
    _close(out, ref)
    # each CFG branch keeps its own state and compares with its own last computed residual
    for branch in (0, 1):
        assert [r["step"] for r in cache.records() if r["branch"] == branch] == list(range(STEPS))
    (_, cond), (_, uncond) = sorted(cache._states.items())
    assert not torch.equal(cond.middle, uncond.middle)
    assert not torch.equal(cond.front, uncond.front)


def test_static_mask_computes_exactly_the_masked_steps(clip):
    run, ref, _ = clip
    mask = [1, 1, 1, 0, 1, 0, 1, 0, 1, 1]
    cache = DBCache(front_blocks=1, back_blocks=1, threshold=0.0, warmup_steps=0, mask=mask,
                    mask_policy="static")  # fmt: skip
    out = run(cache)
    for branch in (0, 1):
        computed = [int(r["computed"]) for r in cache.records() if r["branch"] == branch]
        assert computed == mask
    assert cache.middle_passes == 2 * sum(mask)
    _close(out, ref)


def test_taylorseer_extrapolates_the_reused_residual(clip):
    run, ref, _ = clip
    mask = [1, 1, 1, 0, 1, 1, 0, 1, 1, 1]
    plain = run(DBCache(1, 1, 0.0, 0, mask=mask, mask_policy="static"))
    cache = DBCache(1, 1, 0.0, 0, mask=mask, mask_policy="static", taylorseer_order=1)
    out = run(cache)
    assert cache.middle_passes == 2 * sum(mask)
    assert not torch.equal(out, plain)  # the reused residual is not the stored one
    _close(out, ref)


def test_commits_and_forwards_outside_a_step_run_every_block():
    cache = DBCache(front_blocks=1, back_blocks=1, threshold=1e9, warmup_steps=0)
    calls = []

    def segment(x, start, stop):
        calls.append((start, stop))
        return x + 1

    x = torch.zeros(2)
    assert torch.equal(cache.run(x, segment, 6), x + 1)
    assert calls == [(0, 6)]
    calls.clear()
    for step in range(3):
        with cache.step(step):
            cache.run(x, segment, 6)
    # step 0 computes (nothing stored), steps 1 and 2 reuse (diff 0 < threshold)
    assert calls == [(0, 1), (1, 5), (5, 6), (0, 1), (5, 6), (0, 1), (5, 6)]


def test_limits_force_computation():
    cache = DBCache(front_blocks=1, back_blocks=0, threshold=1e9, warmup_steps=1,
                    max_cached_steps=3, max_continuous_cached_steps=2)  # fmt: skip

    def segment(x, start, stop):
        return x + 1

    for step in range(10):
        with cache.step(step):
            cache.run(torch.zeros(2), segment, 4)
    computed = [int(r["computed"]) for r in cache.records()]
    # step 0 warm-up; two reused in a row at most; three reused in all
    assert computed == [1, 0, 0, 1, 0, 1, 1, 1, 1, 1]


def test_taylorseer_matches_its_polynomial():
    steps = [0, 1, 3, 4]  # computed steps, uneven windows
    linear = {s: torch.tensor([2.0 + 0.5 * s, -1.0 * s]) for s in range(9)}
    seer = TaylorSeer(order=1)
    for s in steps:
        seer.update(linear[s], s)
    for s in (5, 6, 8):  # order 1 is exact on a sequence linear in the step
        torch.testing.assert_close(seer.approximate(s), linear[s], rtol=0, atol=1e-6)

    def f(s):
        return torch.tensor([1.0 + 2.0 * s + 3.0 * s * s])

    seer = TaylorSeer(order=2)
    for s in (0, 2, 4):
        seer.update(f(s), s)
    # factors: f(4); first difference over the window 2; second: difference of those over 2
    d0, d1_prev = f(4), (f(2) - f(0)) / 2
    d1 = (f(4) - f(2)) / 2
    d2 = (d1 - d1_prev) / 2
    for k in (1, 2, 3):
        expected = d0 + d1 * k + d2 * k * k / 2
        torch.testing.assert_close(seer.approximate(4 + k), expected, rtol=0, atol=1e-5)
    assert len(seer.factors) == 3


def test_relative_l1():
    prev = torch.tensor([1.0, -1.0, 2.0, -2.0])
    assert float(relative_l1(prev, prev)) == 0.0
    assert float(relative_l1(prev * 1.1, prev)) == pytest.approx(0.1, rel=1e-5)


@pytest.mark.parametrize(
    "kwargs, setting",
    [
        (dict(front_blocks=0), "step_cache.front_blocks=0"),
        (dict(back_blocks=-1), "step_cache.back_blocks=-1"),
        (dict(threshold=-0.1), "step_cache.threshold=-0.1"),
        (dict(warmup_steps=-1), "step_cache.warmup_steps=-1"),
        (dict(max_cached_steps=0), "step_cache.max_cached_steps=0"),
        (dict(max_continuous_cached_steps=0), "step_cache.max_continuous_cached_steps=0"),
        (dict(mask=[1, 2]), "step_cache.mask=[1, 2]"),
        (dict(mask=[0, 1], mask_policy="static"), "step_cache.mask=[0, 1]"),
        (dict(mask_policy="sometimes"), "step_cache.mask_policy='sometimes'"),
        (dict(taylorseer_order=-1), "step_cache.taylorseer_order=-1"),
    ],
)
def test_bad_settings_are_one_line_config_errors(kwargs, setting):
    with pytest.raises(ConfigError) as err:
        DBCache(**kwargs)
    assert setting in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "overrides, setting",
    [
        (["step_cache.front_blocks=3", "step_cache.back_blocks=3"], "model.num_layers=6"),
        (["step_cache.mask=[1,0,1]"], "scheduler.num_steps=10"),
        (["step_cache.warmup_steps=10"], "step_cache.warmup_steps=10"),
        (["graph=cuda_graph"], "graph=eager"),
        (["recipe=self_forcing_wan21_t2v_1_3b"], "cache=none"),
    ],
)
def test_recipes_that_cannot_cache_fail_at_build(overrides, setting):
    base = RECIPE if not overrides[0].startswith("recipe=") else [*DIT, "device=cpu"]
    cfg = compose_run([*base, "step_cache=dbcache", "step_cache.front_blocks=1",
                       "step_cache.back_blocks=1", "step_cache.warmup_steps=2", *overrides])  # fmt: skip
    with pytest.raises(ConfigError) as err:
        build_rollout(cfg)
    assert setting in str(err.value) and "\n" not in str(err.value)


def test_config_group_builds_the_cache():
    from flashdreams.build import build_step_cache

    cache = build_step_cache(compose_run([*RECIPE, "step_cache=taylorseer"]))
    assert isinstance(cache, DBCache) and cache.taylorseer_order == 1
    assert (cache.front, cache.back, cache.threshold) == (8, 0, 0.08)
    assert type(build_step_cache(compose_run(RECIPE))) is StepCache


def test_stats_json_records_every_forward_and_the_hit_rate(tmp_path):
    import json

    from flashdreams.job import run_job

    mask = [1, 1, 0, 1, 0, 1, 1, 0, 1, 1]
    cfg = compose_run([*RECIPE, f"paths.root={tmp_path}", "step_cache=dbcache",
                       "step_cache.front_blocks=1", "step_cache.back_blocks=1",
                       "step_cache.warmup_steps=0", f"step_cache.mask={mask}".replace(" ", ""),
                       "step_cache.mask_policy=static"])  # fmt: skip
    assert run_job(cfg) == 0
    (path,) = tmp_path.rglob("stats.json")
    stats = json.loads(path.read_text())
    records = stats["step_cache"]
    assert [(r["step"], r["branch"]) for r in records] == [
        (s, b) for s in range(STEPS) for b in (0, 1)
    ]
    assert [int(r["computed"]) for r in records if r["branch"] == 1] == mask
    assert stats["summary"]["step_cache_hit_rate"] == pytest.approx(0.3)


def test_quality_measures_a_cached_run_against_the_uncached_one(tmp_path):
    import json

    from flashdreams.job import run_job

    cfg = compose_run([*RECIPE, f"paths.root={tmp_path}", "quality=true", "step_cache=dbcache",
                       "step_cache.front_blocks=1", "step_cache.back_blocks=1",
                       "step_cache.warmup_steps=0",
                       "step_cache.mask=[1,1,1,0,1,1,1,1,1,1]", "step_cache.mask_policy=static"])  # fmt: skip
    assert run_job(cfg) == 0
    (path,) = tmp_path.rglob("stats.json")
    stats = json.loads(path.read_text())
    (row,) = stats["quality"]
    # the steps before the first reuse are the uncached run's exactly, the reused one is not
    assert row["dit_cosine"][:3] == pytest.approx([1.0] * 3, abs=1e-12)
    assert row["dit_cosine"][3] < 1.0 - 1e-9
    assert 0.99 <= row["latent_cosine"] < 1.0
    assert stats["summary"]["quality_reference"] == "precision=bf16 step_cache=none"


def test_cosmos_threshold_zero_is_exact_and_a_mask_is_followed():
    cfg = compose_run(["recipe=cosmos_predict2_5_2b_t2v", "model=cosmos_tiny", "model.num_layers=4",
                       "model.checkpoint=null",
                       "device=cpu", "dtype=float32", "text_encoder=random", "vae=none",
                       "~vae.checkpoint", "~vae.chunk_frames", "rollout.height=32",
                       "rollout.width=32", "rollout.frames_per_block=2",
                       f"scheduler.num_steps={STEPS}"])  # fmt: skip
    torch.manual_seed(2)
    noise = torch.randn(1, 16, 2, 4, 4)
    rollout = build_rollout(cfg, noise_fn=lambda shape: noise.clone())

    def run(step_cache):
        rollout.model.set_step_cache(step_cache)
        rollout.start(["a robot arm"])
        return rollout.step().latents

    ref = run(StepCache())
    assert torch.equal(run(DBCache(1, 1, threshold=0.0, warmup_steps=0)), ref)
    mask = [1, 1, 1, 0, 1, 1, 0, 1, 1, 1]
    cache = DBCache(1, 1, 0.0, 0, mask=mask, mask_policy="static")
    out = run(cache)
    assert [int(r["computed"]) for r in cache.records() if r["branch"] == 0] == mask
    assert not torch.equal(out, ref)
    _close(out, ref)


def test_two_experts_and_batched_cfg_keep_their_own_state():
    """Wan 2.2 A14B (tiny experts), CFG as one batch-2 forward: one branch per step, a state per
    expert; threshold 0 is exact, and the low-noise expert's first step computes."""
    overrides = ["recipe=wan22_t2v_a14b_480p", *DIT, *RUN, "guidance.batched=true"]
    torch.manual_seed(3)
    noise = torch.randn(1, 16, FRAMES, SIZE // 8, SIZE // 8)
    rollout = build_rollout(compose_run(overrides), noise_fn=lambda shape: noise.clone())
    plan = rollout.model.expert_plan(rollout.scheduler.begin_block(torch.device("cpu")))
    assert 0 < plan.count(1) < STEPS, plan

    def run(step_cache):
        rollout.model.set_step_cache(step_cache)
        rollout.start(["a fox"])
        return rollout.step().latents

    ref = run(StepCache())
    exact = DBCache(1, 1, threshold=0.0, warmup_steps=0)
    assert torch.equal(run(exact), ref)
    assert [(r["step"], r["expert"], r["branch"]) for r in exact.records()] == [
        (s, e, 0) for s, e in enumerate(plan)
    ]
    first_low = plan.index(1)
    cache = DBCache(1, 1, threshold=1e9, warmup_steps=1)  # reuse whenever allowed
    run(cache)
    computed = [r["step"] for r in cache.records() if r["computed"]]
    assert computed == [0, first_low]  # each expert's first (warm-up) step only
    assert cache.middle_passes == 2
