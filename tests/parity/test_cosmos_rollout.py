"""End to end through the rollout: the Cosmos-Predict2.5 recipes (T2W, I2W from an image, V2W
from an mp4 file) == diffusers' ``Cosmos2_5_PredictBasePipeline``.

Both sides get the same tiny random DiT (ours converted to diffusers names), the same UniPC
schedule (shift 5, the recipes' sampler), the same prompt embeddings, the same initial noise
and, for I2W / V2W, the same tiny VAE (diffusers' ``AutoencoderKLWan``, read by our
conditioner's encoder from a saved folder) and the same input pixels; diffusers returns latents.
diffusers reads an image with torchvision's ``to_tensor`` (absent here: the same through numpy).
q/k norm eps follows diffusers (1e-5; native: 1e-6). Tolerance: fp32, max abs difference
<= 1e-4 on the final latents.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flashdreams.build import build_rollout
from flashdreams.conditioner.cosmos_video import read_last_frames
from flashdreams.io.cosmos_keymap import flashdreams_to_diffusers
from flashdreams.io.image import load_image
from flashdreams.io.video import Mp4Writer
from tests.parity.test_cosmos_dit import _nearest_resize_shim
from tests.parity.test_cosmos_pipeline import _NoGuardrail
from tests.unit.test_config import compose_run

diffusers = pytest.importorskip("diffusers")

ATOL = 1e-4
FRAMES, SIZE, STEPS = 3, 32, 2  # latent frames (9 video frames), pixels, solver steps
PROMPT, NEGATIVE = "a robot arm stacks cubes", "blurry"
RUN = ["model=cosmos_tiny", "model.checkpoint=null", "model.qk_eps=1e-5", "device=cpu",
       "dtype=float32", "text_encoder=random", "vae=none", "~vae.checkpoint", "~vae.chunk_frames",
       f"rollout.height={SIZE}", f"rollout.width={SIZE}", f"rollout.frames_per_block={FRAMES}",
       f"scheduler.num_steps={STEPS}", f"prompt='{PROMPT}'", f"negative_prompt='{NEGATIVE}'"]  # fmt: skip
TINY_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                temperal_downsample=[False, True, True])  # fmt: skip


def _diffusers_dit(model):
    """diffusers' Cosmos DiT with the same weights as our ``model``."""
    dit = diffusers.CosmosTransformer3DModel(
        in_channels=model.in_dim + 1, out_channels=model.out_dim,
        num_attention_heads=model.num_heads, attention_head_dim=model.head_dim,
        num_layers=model.num_layers, text_embed_dim=model.context_dim,
        adaln_lora_dim=model.blocks[0].adaln_modulation_mlp[1].out_features,
        rope_scale=(1.0, 3.0, 3.0), extra_pos_embed_type=None, use_crossattn_projection=True,
        crossattn_proj_in_channels=model.text_dim,
        encoder_hidden_states_channels=model.context_dim,
    )  # fmt: skip
    dit.load_state_dict(flashdreams_to_diffusers(model.state_dict()), strict=True)
    return dit.eval()


def _to_tensor_shim(monkeypatch):
    """torchvision's ``to_tensor`` (PIL -> (C, H, W) in [0, 1]) for diffusers' image path."""
    from types import SimpleNamespace

    from diffusers.pipelines.cosmos import pipeline_cosmos2_5_predict as module

    def to_tensor(img):
        return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)

    functional = SimpleNamespace(to_tensor=to_tensor)
    shim = SimpleNamespace(transforms=SimpleNamespace(functional=functional))
    monkeypatch.setattr(module, "torchvision", shim, raising=False)


@pytest.mark.parametrize("mode", ["t2w", "i2w", "v2w"])
def test_recipe_matches_cosmos_pipeline(mode, tmp_path, monkeypatch):
    _nearest_resize_shim(monkeypatch)
    _to_tensor_shim(monkeypatch)
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLWan(**TINY_VAE).eval()
    vae.save_pretrained(tmp_path / "vae")
    encoder = [f"conditioner.encoder.checkpoint={tmp_path / 'vae'}",
               "conditioner.encoder.base_dim=8", "conditioner.encoder.dim_mult=[1,2,2,2]",
               "conditioner.encoder.num_res_blocks=1"]  # fmt: skip
    pixels = np.random.default_rng(0).integers(0, 255, (7, SIZE, SIZE, 3), np.uint8)
    overrides, video, image = ["recipe=cosmos_predict2_5_2b_t2v", *RUN], None, None
    if mode == "i2w":
        from PIL import Image

        Image.fromarray(pixels[0]).save(tmp_path / "first.png")
        image = load_image(tmp_path / "first.png")  # as flashdreams-run reads image=
        overrides = [
            "recipe=cosmos_predict2_5_2b_i2v",
            *RUN,
            *encoder,
            f"image={tmp_path / 'first.png'}",
        ]
    if mode == "v2w":
        path = tmp_path / "input.mp4"
        with Mp4Writer(path, fps=16) as writer:
            writer.write(pixels)
        overrides = ["recipe=cosmos_predict2_5_2b_v2w", *RUN, f"conditioner.video={path}",
                     *encoder]  # fmt: skip
        frames = np.stack([np.asarray(f) for f in read_last_frames(str(path), 5)])
        video = (torch.from_numpy(frames).float() / 255 * 2 - 1).permute(3, 0, 1, 2)[None]
    torch.manual_seed(1)
    noise = torch.randn(1, 16, FRAMES, SIZE // 8, SIZE // 8)
    rollout = build_rollout(compose_run(overrides), noise_fn=lambda shape: noise.clone())
    rollout.start([PROMPT], images=None if image is None else [image])
    ours = rollout.step().latents

    emb = rollout.text_encoder.encode([PROMPT, NEGATIVE], torch.device("cpu"), torch.float32)
    pipe = diffusers.pipelines.cosmos.pipeline_cosmos2_5_predict.Cosmos2_5_PredictBasePipeline(
        text_encoder=None, tokenizer=None, transformer=_diffusers_dit(rollout.model), vae=vae,
        scheduler=diffusers.UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0),
        safety_checker=_NoGuardrail(),
    )  # fmt: skip
    with torch.no_grad():
        theirs = pipe(image=image, video=video, prompt_embeds=emb[:1],
                      negative_prompt_embeds=emb[1:],
                      height=SIZE, width=SIZE, num_frames=1 + 4 * (FRAMES - 1),
                      num_inference_steps=STEPS, guidance_scale=7.0, latents=noise.clone(),
                      output_type="latent", num_latent_conditional_frames=2).frames  # fmt: skip
    assert ours.shape == theirs.shape == noise.shape
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=0, atol=ATOL)
