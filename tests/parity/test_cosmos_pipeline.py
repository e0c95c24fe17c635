"""Cosmos-Predict2.5 sampling against diffusers' ``Cosmos2_5_PredictBasePipeline`` on tiny random
weights (same DiT weights, same VAE, same noise, same prompt embeddings), fp32 on the CPU.

Ours: ``CosmosDiT`` + ``DiffusersFlowScheduler(exact_timesteps=True)`` +
``ClassifierFreeGuidance(anchor="cond")`` + ``CosmosVideoConditioner``, stepped in the order of
the rollout's bidirectional block (replace the given frames and their timesteps before each
forward, step, put them back at the end). Text2World and Video2World (2 latent frames from an
mp4 file), with the shifted schedule (the native sampler: shift 5) and with diffusers' default
Karras one. Tolerance: max abs error 1e-4 on the generated latents (the given frames: below).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flashdreams.conditioner.cosmos_video import CosmosVideoConditioner, read_last_frames
from flashdreams.guidance.cfg import ClassifierFreeGuidance
from flashdreams.scheduler.solver import DiffusersFlowScheduler
from tests.parity.test_cosmos_dit import TINY, _nearest_resize_shim, diffusers_model, ours_from

diffusers = pytest.importorskip("diffusers")

H = W = 32  # pixels -> 4 x 4 latents
FRAMES = 9  # pixel frames -> 3 latent frames
STEPS = 4


def _vae():
    torch.manual_seed(1)
    z = TINY["in_dim"]
    return diffusers.AutoencoderKLWan(
        base_dim=8, z_dim=z, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
        temperal_downsample=[False, True, True], latents_mean=[0.1 * i for i in range(z)],
        latents_std=[1.0 + 0.5 * i for i in range(z)],
    ).eval()  # fmt: skip


class _Encoder:
    """The conditioner's encoder on top of the same diffusers VAE: normalized latent means."""

    def __init__(self, vae) -> None:
        self.vae = vae
        cfg = vae.config
        self.mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1)
        self.std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1)

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        return (self.vae.encode(video).latent_dist.mode() - self.mean) / self.std


class _NoGuardrail(torch.nn.Module):
    """Stands in for the guardrail model (no prompt text, latents out: it checks nothing)."""

    device = torch.device("cpu")


def _scheduler(karras: bool):
    kw = dict(use_karras_sigmas=True, sigma_min=0.01, sigma_max=200.0) if karras else {}
    return diffusers.UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0, **kw
    )


def _write_video(path) -> None:
    from flashdreams.io.video import Mp4Writer

    rng = np.random.default_rng(0)
    with Mp4Writer(path, fps=16) as writer:
        writer.write(rng.integers(0, 255, (7, H, W, 3), dtype=np.uint8))


@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("mode", ["t2w", "v2w"])
def test_sampling_matches_diffusers_pipeline(mode, karras, tmp_path, monkeypatch):
    from diffusers.pipelines.cosmos.pipeline_cosmos2_5_predict import (
        Cosmos2_5_PredictBasePipeline,
    )

    _nearest_resize_shim(monkeypatch)
    ref, vae = diffusers_model(), _vae()
    model = ours_from(ref)
    torch.manual_seed(2)
    text, neg = torch.randn(1, 6, TINY["text_dim"]), torch.randn(1, 6, TINY["text_dim"])
    noise = torch.randn(1, TINY["in_dim"], 3, H // 8, W // 8)

    video_path, video = None, None
    if mode == "v2w":
        video_path = tmp_path / "input.mp4"
        _write_video(video_path)
        frames = read_last_frames(str(video_path), 5)  # what diffusers gets: the decoded frames
        video = torch.from_numpy(np.stack([np.asarray(f) for f in frames])).float()
        video = (video / 255 * 2 - 1).permute(3, 0, 1, 2)[None]  # (1, 3, 5, H, W)

    pipe = Cosmos2_5_PredictBasePipeline(
        text_encoder=None, tokenizer=None, transformer=ref, vae=vae,
        scheduler=_scheduler(karras), safety_checker=_NoGuardrail(),
    )  # fmt: skip
    with torch.no_grad():
        expected = pipe(
            video=video, prompt_embeds=text, negative_prompt_embeds=neg, height=H, width=W,
            num_frames=FRAMES, num_inference_steps=STEPS, guidance_scale=7.0,
            latents=noise.clone(), output_type="latent", num_latent_conditional_frames=2,
        ).frames  # fmt: skip

    # ours, in the rollout's order for one bidirectional block
    karras_sigmas = [0.01, 200.0] if karras else None
    sched = DiffusersFlowScheduler("unipc", STEPS, shift=5.0, exact_timesteps=True,
                                   karras_sigmas=karras_sigmas)  # fmt: skip
    guide = ClassifierFreeGuidance(scale=7.0, anchor="cond")
    cond = CosmosVideoConditioner(_Encoder(vae), video=str(video_path) if video_path else None)
    cond.prepare(None, height=H, width=W, num_frames=3, device=torch.device("cpu"))
    assert cond.num_given == (2 if mode == "v2w" else 0)
    prepared = guide.prepare(model.prepare_context(text), model.prepare_context(neg))
    x = noise.clone()
    with torch.no_grad():
        for i, t in enumerate(sched.begin_block(torch.device("cpu"))):
            inputs = cond.inputs(0, 3)
            flow = guide.predict(lambda x, t, c: model(x, t, c, inputs=inputs),  # noqa: B023
                                 cond.replace(x, 0), cond.timesteps(t.expand(1, 3), 0),
                                 prepared, i)  # fmt: skip
            x = sched.step(flow, x, i, None)
    x = cond.replace(x, 0)
    n = cond.num_given
    torch.testing.assert_close(x[:, :, n:], expected[:, :, n:].float(), rtol=0, atol=1e-4)
    if n:  # the given frames: ours are the encoded input exactly; diffusers' are the solver's
        # integration of their ground-truth velocity (exact up to the solver's error: < 1e-4
        # with shift 5, ~2e-2 with the 4-step Karras schedule)
        torch.testing.assert_close(x[:, :, :n], cond.replace(torch.zeros_like(x), 0)[:, :, :n])
        torch.testing.assert_close(x[:, :, :n], expected[:, :, :n].float(), rtol=0, atol=5e-2)
