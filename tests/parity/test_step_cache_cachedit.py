"""``step_cache=dbcache`` / ``taylorseer`` == cache-dit on diffusers' ``WanPipeline``.

The recipe ``wan21_t2v_1_3b_480p`` at tiny sizes (6 layers, 10 UniPC steps, CFG 5 as two
forwards) and diffusers' ``WanPipeline`` with the same DiT weights, prompt embeddings and noise;
cache-dit (``cache_dit.enable_cache`` with ``DBCacheConfig(enable_separate_cfg=True)`` and,
for TaylorSeer, ``TaylorSeerCalibratorConfig``) caches the pipeline's transformer with the same
settings. Both must reuse the middle blocks on the same (step, CFG branch) pairs and give the
same latents: fp32, max abs difference <= 5e-5 (observed <= 5e-6 at |latent| <= 6, as the
uncached pipeline parity). cache-dit is not a dependency: the test is skipped without it
(``pip install --no-deps cache-dit``; checked with 1.5.3).
"""

from __future__ import annotations

import pytest
import torch

from flashdreams.step_cache.dbcache import DBCache
from tests.parity import test_pipeline_parity as P
from tests.unit.test_config import compose_run

cache_dit = pytest.importorskip("cache_dit")

STEPS, THRESHOLD, WARMUP = 10, 0.5, 2
DIT = [d.replace("model.num_layers=2", "model.num_layers=6") for d in P.DIT]
RUN = [r.replace(f"scheduler.num_steps={P.STEPS}", f"scheduler.num_steps={STEPS}") for r in P.RUN]


@pytest.fixture(scope="module")
def pair():
    """(our rollout, diffusers' pipeline, the noise, the prompt embeddings)."""
    from diffusers import AutoencoderKLWan, WanPipeline

    from flashdreams.build import build_rollout

    torch.manual_seed(1)
    noise = torch.randn(1, 16, P.FRAMES, P.SIZE // 8, P.SIZE // 8)
    cfg = compose_run(["recipe=wan21_t2v_1_3b_480p", *DIT, "model.text_len=16", *RUN])
    rollout = build_rollout(cfg, noise_fn=lambda shape: noise.clone())
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=AutoencoderKLWan(**P.TINY_VAE),
                       scheduler=P._unipc(5.0), transformer=P._diffusers_dit(rollout.model))  # fmt: skip
    return rollout, pipe, noise, P._embeds(rollout)


@pytest.mark.parametrize("order", [0, 1, 2])
def test_same_decisions_and_latents_as_cache_dit(pair, order):
    from cache_dit import DBCacheConfig, TaylorSeerCalibratorConfig

    rollout, pipe, noise, (pos, neg) = pair
    ours_cache = DBCache(front_blocks=1, back_blocks=1, threshold=THRESHOLD, warmup_steps=WARMUP,
                         taylorseer_order=order)  # fmt: skip
    rollout.model.set_step_cache(ours_cache)
    rollout.start([P.PROMPT])
    ours = rollout.step().latents

    config = DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=1,
                           residual_diff_threshold=THRESHOLD, max_warmup_steps=WARMUP,
                           enable_separate_cfg=True, num_inference_steps=STEPS)  # fmt: skip
    calibrator = TaylorSeerCalibratorConfig(taylorseer_order=order) if order else None
    cache_dit.enable_cache(pipe, cache_config=config, calibrator_config=calibrator)
    try:
        theirs = pipe(prompt_embeds=pos, negative_prompt_embeds=neg, height=P.SIZE,
                      width=P.SIZE, num_frames=1 + 4 * (P.FRAMES - 1), num_inference_steps=STEPS,
                      guidance_scale=5.0, latents=noise.clone(), output_type="latent",
                      return_dict=False)[0]  # fmt: skip
        stats = cache_dit.summary(pipe)[0]
    finally:
        cache_dit.disable_cache(pipe)

    reused = {b: [r["step"] for r in ours_cache.records() if r["branch"] == b and not r["computed"]]
              for b in (0, 1)}  # fmt: skip
    assert reused[0] == list(stats.cached_steps) and reused[0]  # some steps reused
    assert reused[1] == list(stats.cfg_cached_steps)
    for r in ours_cache.records():  # the residual diffs cache-dit measured, per branch
        diffs = stats.residual_diffs if r["branch"] == 0 else stats.cfg_residual_diffs
        if r["diff"] is not None:
            assert r["diff"] == pytest.approx(diffs[str(r["step"])], rel=1e-4)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=5e-5)
