"""End to end: our bidirectional Wan recipes == diffusers' ``WanPipeline`` / ``WanImageToVideoPipeline``.

Both sides get the same tiny random DiT (ours converted to diffusers names), the same UniPC
schedule, the same prompt embeddings and the same initial noise; diffusers returns latents
(``output_type="latent"``). For I2V they also share the tiny VAE (diffusers' ``AutoencoderKLWan``,
read by our encoder from a saved folder), the CLIP vision tower and its preprocessing.
Tolerance: fp32, max abs difference <= 5e-5 on the final latents (2 x 3 DiT forwards and the
solver's arithmetic in a different order; observed <= 6.3e-6 at |latent| <= 6).
"""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    AutoencoderKLWan,
    UniPCMultistepScheduler,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
)
from PIL import Image

from flashdreams.build import build_rollout
from flashdreams.io.image import load_image
from flashdreams.io.keymap import wan_to_diffusers
from tests.unit.test_config import compose_run

ATOL = 5e-5
FRAMES, SIZE, STEPS = 3, 32, 3  # latent frames (9 video frames), pixels, solver steps
PROMPT, NEGATIVE = "a fox in the snow", "blurry, static"
DIT = ["model.dim=64", "model.num_heads=4", "model.num_layers=2", "model.ffn_dim=128",
       "model.text_dim=32", "model.checkpoint=null"]  # fmt: skip
RUN = ["device=cpu", "dtype=float32", "text_encoder=random", "vae.checkpoint=null",
       "vae.base_dim=8", f"rollout.height={SIZE}", f"rollout.width={SIZE}",
       f"rollout.frames_per_block={FRAMES}", f"scheduler.num_steps={STEPS}",
       f"prompt='{PROMPT}'", f"negative_prompt='{NEGATIVE}'"]  # fmt: skip
TINY_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                temperal_downsample=[False, True, True])  # fmt: skip


def _diffusers_dit(model, image_dim: int | None = None) -> WanTransformer3DModel:
    """diffusers' DiT with the same weights as our ``model``."""
    dit = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=model.num_heads, attention_head_dim=model.head_dim,
        in_channels=model.in_dim, out_channels=model.out_dim, text_dim=model.text_dim, freq_dim=256,
        ffn_dim=128, num_layers=model.num_layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=image_dim,
        added_kv_proj_dim=None if image_dim is None else model.dim,
    )  # fmt: skip
    dit.load_state_dict(wan_to_diffusers(model.state_dict()), strict=True)
    return dit.eval()


def _ours(overrides, image=None):
    """Our latents, the noise we used and the rollout (noise injected, drawn once)."""
    torch.manual_seed(1)
    noise = torch.randn(1, 16, FRAMES, SIZE // 8, SIZE // 8)
    rollout = build_rollout(compose_run(overrides), noise_fn=lambda shape: noise.clone())
    rollout.start([PROMPT], images=None if image is None else [image])
    return rollout.step().latents, noise, rollout


def _embeds(rollout) -> tuple[torch.Tensor, torch.Tensor]:
    emb = rollout.text_encoder.encode([PROMPT, NEGATIVE], torch.device("cpu"), torch.float32)
    return emb[:1], emb[1:]


def _unipc(shift: float) -> UniPCMultistepScheduler:
    return UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
                                   use_flow_sigmas=True, flow_shift=shift)  # fmt: skip


@pytest.mark.parametrize("batched", [False, True])
def test_t2v_matches_wan_pipeline(batched):
    overrides = ["recipe=wan21_t2v_1_3b_480p", *DIT, "model.text_len=16", *RUN,
                 f"guidance.batched={str(batched).lower()}"]  # fmt: skip
    ours, noise, rollout = _ours(overrides)
    pos, neg = _embeds(rollout)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=AutoencoderKLWan(**TINY_VAE),
                       scheduler=_unipc(5.0), transformer=_diffusers_dit(rollout.model))  # fmt: skip
    theirs = pipe(prompt_embeds=pos, negative_prompt_embeds=neg, height=SIZE, width=SIZE,
                  num_frames=1 + 4 * (FRAMES - 1), num_inference_steps=STEPS, guidance_scale=5.0,
                  latents=noise.clone(), output_type="latent", return_dict=False)[0]  # fmt: skip
    assert ours.shape == theirs.shape == noise.shape
    torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL)


def test_i2v_matches_wan_image_to_video_pipeline(tmp_path):
    torch.manual_seed(0)
    vae = AutoencoderKLWan(**TINY_VAE).eval()
    vae.save_pretrained(tmp_path / "vae")
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (SIZE, SIZE, 3), generator=gen, dtype=torch.uint8).numpy()
    Image.fromarray(pixels).save(tmp_path / "first.png")
    image = load_image(tmp_path / "first.png")  # as flashdreams-run reads image=
    clip = ("image_encoder.config={hidden_size:32,intermediate_size:64,num_hidden_layers:2,"
            "num_attention_heads:2,projection_dim:16}")  # fmt: skip
    overrides = ["recipe=wan21_i2v_14b_480p", *DIT, "model.text_len=512", "model.image_dim=32",
                 *RUN, "image_encoder.checkpoint=null", "image_encoder.processor=null", clip,
                 f"conditioner.encoder.checkpoint={tmp_path / 'vae'}",
                 f"image={tmp_path / 'first.png'}"]  # fmt: skip
    ours, noise, rollout = _ours(overrides, image)
    pos, neg = _embeds(rollout)  # 512 tokens: diffusers splits image/text context at 512
    pipe = WanImageToVideoPipeline(
        tokenizer=None, text_encoder=None, vae=vae, scheduler=_unipc(3.0),
        image_processor=rollout.image_encoder.processor, image_encoder=rollout.image_encoder.model,
        transformer=_diffusers_dit(rollout.model, image_dim=32),
    )  # fmt: skip
    theirs = pipe(image=image, prompt_embeds=pos, negative_prompt_embeds=neg, height=SIZE,
                  width=SIZE, num_frames=1 + 4 * (FRAMES - 1), num_inference_steps=STEPS,
                  guidance_scale=5.0, latents=noise.clone(), output_type="latent",
                  return_dict=False)[0]  # fmt: skip
    assert ours.shape == theirs.shape == noise.shape
    torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL)
