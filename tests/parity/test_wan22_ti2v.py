"""Wan2.2-TI2V-5B: per-token timesteps, the recipe, the Wan 2.2 VAE vs diffusers (tiny, CPU, fp32).

Tolerances (max abs difference):
  * DiT forward with per-token timesteps vs ``WanTransformer3DModel``: 2e-5 (|flow| <= ~5;
    the same math, kernels of other shapes; observed <= 1.1e-6);
  * recipe latents vs ``WanPipeline`` / ``WanImageToVideoPipeline`` (``expand_timesteps=True``,
    2 UniPC steps with CFG): 5e-5, as ``test_pipeline_parity.py`` (observed <= 8.1e-6);
  * VAE decode vs ``AutoencoderKLWan.decode`` (Wan 2.2 configuration) and streaming vs full-clip:
    1e-5 on [0, 1] frames; encoder vs ``AutoencoderKLWan.encode`` posterior mode: 1e-5.
"""

from __future__ import annotations

import json
import re

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
from flashdreams.io.checkpoint import CheckpointError, materialize
from flashdreams.io.image import image_to_tensor, load_image
from flashdreams.io.keymap import wan22_vae_key_to_diffusers, wan_to_diffusers
from flashdreams.io.video import read_video_frames
from flashdreams.job import run_job
from flashdreams.model.wan import WanDiT
from flashdreams.vae.wan22 import (
    WAN22_LATENTS_MEAN,
    WAN22_LATENTS_STD,
    Wan22Decoder3d,
    Wan22StreamingDecoder,
)
from flashdreams.vae.wan22_encode import Wan22Encoder, Wan22Encoder3d
from tests.unit.test_config import compose_run

NUM_RES = 1  # residual blocks per level of the tiny VAE
Z = 48  # Wan 2.2 latent channels (kept real: the DiT's in/out and the VAE's z)
FRAMES, SIZE, STEPS = 3, 32, 2  # latent frames (9 video frames), pixels, solver steps
PROMPT, NEGATIVE = "a fox in the snow", "blurry, static"
# Wan 2.2 VAE layout, tiny: residual levels, 2x2 patchify, both time upsamplers; 8x spatial.
TINY_VAE = dict(base_dim=8, decoder_base_dim=8, z_dim=Z, dim_mult=[1, 2, 2], num_res_blocks=1,
                temperal_downsample=[True, True], is_residual=True, in_channels=12,
                out_channels=12, patch_size=2, scale_factor_spatial=8,
                latents_mean=list(WAN22_LATENTS_MEAN), latents_std=list(WAN22_LATENTS_STD))  # fmt: skip
VAE_ARGS = ["vae.base_dim=8", "vae.dim_mult=[1,2,2]", "vae.num_res_blocks=1",
            "vae.temperal_downsample=[true,true]"]  # fmt: skip
DIT = ["model.dim=64", "model.num_heads=4", "model.num_layers=2", "model.ffn_dim=128",
       "model.text_dim=32", "model.text_len=16", "model.checkpoint=null"]  # fmt: skip
RUN = ["recipe=wan22_ti2v_5b_720p", *DIT, "device=cpu", "dtype=float32", "text_encoder=random",
       f"rollout.height={SIZE}", f"rollout.width={SIZE}", f"rollout.frames_per_block={FRAMES}",
       f"scheduler.num_steps={STEPS}", f"prompt='{PROMPT}'", f"negative_prompt='{NEGATIVE}'"]  # fmt: skip


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    """A tiny Wan 2.2 ``AutoencoderKLWan`` saved as a diffusers folder, and the module."""
    torch.manual_seed(0)
    vae = AutoencoderKLWan(**TINY_VAE).eval()
    folder = tmp_path_factory.mktemp("wan22_vae")
    vae.save_pretrained(folder)
    return folder, vae


def _diffusers_dit(model: WanDiT) -> WanTransformer3DModel:
    dit = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=model.num_heads,
        attention_head_dim=model.head_dim, in_channels=model.in_dim, out_channels=model.out_dim,
        text_dim=model.text_dim, freq_dim=256, ffn_dim=model.blocks[0].ffn[0].out_features,
        num_layers=model.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=1e-6,
    )  # fmt: skip
    dit.load_state_dict(wan_to_diffusers(model.state_dict()), strict=True)
    return dit.eval()


# ------------------------------------------------------------------ (a) DiT, per-token t
def _tiny_dit(checkpoint=None) -> WanDiT:
    with torch.device("meta"):
        model = WanDiT(dim=64, num_heads=4, num_layers=2, ffn_dim=128, in_dim=Z, out_dim=Z,
                       text_dim=32, text_len=16)  # fmt: skip
    return materialize(model, checkpoint, "cpu", torch.float32, seed=3).eval()


def test_dit_per_token_timesteps_match_diffusers(tmp_path):
    reference = _diffusers_dit(_tiny_dit())
    reference.save_pretrained(tmp_path / "transformer")  # a TI2V-Diffusers-style folder
    model = _tiny_dit(str(tmp_path))  # read back through our diffusers-folder loader
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, Z, 3, 4, 6, generator=gen)  # 3 frames x 2 x 3 tokens
    text = torch.randn(2, 16, 32, generator=gen)
    first_frame_zero = torch.full((2, 3, 6), 700.0)
    first_frame_zero[:, 0] = 0.0  # TI2V: the given first frame's tokens carry t = 0
    every_token = torch.rand(2, 18, generator=gen) * 1000  # the general per-token case
    for t in (first_frame_zero.flatten(1), every_token):
        with torch.no_grad():
            ours = model(x, t, model.prepare_context(text))
            theirs = reference(x, t, text, return_dict=False)[0]
        torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-5)
    # per-frame timesteps are the per-token ones of uniform frames
    with torch.no_grad():
        per_frame = model(x, torch.tensor([[0.0, 700.0, 700.0]] * 2), model.prepare_context(text))
        ours = model(x, first_frame_zero.flatten(1), model.prepare_context(text))
    torch.testing.assert_close(per_frame, ours, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="timestep"):
        model(x, torch.zeros(2, 5), model.prepare_context(text))


# ------------------------------------------------------------------ (b) recipe vs pipelines
def _unipc() -> UniPCMultistepScheduler:
    return UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
                                   use_flow_sigmas=True, flow_shift=5.0)  # fmt: skip


def _ours(overrides, image=None):
    torch.manual_seed(1)
    noise = torch.randn(1, Z, FRAMES, SIZE // 8, SIZE // 8)  # tiny VAE: 8x
    rollout = build_rollout(compose_run(overrides), noise_fn=lambda shape: noise.clone())
    rollout.start([PROMPT], images=None if image is None else [image])
    latents = rollout.step().latents
    emb = rollout.text_encoder.encode([PROMPT, NEGATIVE], torch.device("cpu"), torch.float32)
    return latents, noise, rollout, emb[:1], emb[1:]


def test_t2v_recipe_matches_wan_pipeline_expand_timesteps(vae_folder):
    folder, vae = vae_folder
    overrides = [*RUN, f"vae.checkpoint={folder}", "conditioner.encoder.checkpoint=null",
                 *[a.replace("vae.", "conditioner.encoder.") for a in VAE_ARGS]]  # fmt: skip
    ours, noise, rollout, pos, neg = _ours(overrides)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=_unipc(),
                       transformer=_diffusers_dit(rollout.model), expand_timesteps=True)  # fmt: skip
    theirs = pipe(prompt_embeds=pos, negative_prompt_embeds=neg, height=SIZE, width=SIZE,
                  num_frames=1 + 4 * (FRAMES - 1), num_inference_steps=STEPS, guidance_scale=5.0,
                  latents=noise.clone(), output_type="latent", return_dict=False)[0]  # fmt: skip
    assert ours.shape == theirs.shape == noise.shape
    torch.testing.assert_close(ours, theirs, rtol=0, atol=5e-5)


def test_i2v_recipe_matches_image_to_video_pipeline_expand_timesteps(vae_folder, tmp_path):
    folder, vae = vae_folder
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (SIZE, SIZE, 3), generator=gen, dtype=torch.uint8).numpy()
    Image.fromarray(pixels).save(tmp_path / "first.png")
    image = load_image(tmp_path / "first.png")
    overrides = [*RUN, f"vae.checkpoint={folder}", f"conditioner.encoder.checkpoint={folder}",
                 f"image={tmp_path / 'first.png'}", "guidance.batched=true"]  # fmt: skip
    ours, noise, rollout, pos, neg = _ours(overrides, image)
    pipe = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=_unipc(),
                                   transformer=_diffusers_dit(rollout.model),
                                   expand_timesteps=True)  # fmt: skip
    theirs = pipe(image=image, prompt_embeds=pos, negative_prompt_embeds=neg, height=SIZE,
                  width=SIZE, num_frames=1 + 4 * (FRAMES - 1), num_inference_steps=STEPS,
                  guidance_scale=5.0, latents=noise.clone(), output_type="latent",
                  return_dict=False)[0]  # fmt: skip
    assert ours.shape == theirs.shape == noise.shape
    torch.testing.assert_close(ours, theirs, rtol=0, atol=5e-5)
    first = rollout.conditioner.encoder.encode(image_tensor(image))
    torch.testing.assert_close(ours[:, :, :1], first, rtol=0, atol=0)  # the image stays frame 0


def image_tensor(image) -> torch.Tensor:
    return image_to_tensor([image]).unsqueeze(2)  # (1, 3, 1, H, W)


# ------------------------------------------------------------------ (c) the Wan 2.2 VAE
def _frames(vae: AutoencoderKLWan, latents: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        video = vae.decode(latents * std + mean).sample  # (B, 3, T, H, W)
    return ((video + 1) / 2).permute(0, 2, 1, 3, 4)


def _stream(decoder, latents, blocks):
    decoder.reset()
    return [decoder.decode_step(block) for block in latents.split(blocks, dim=2)]


@pytest.mark.parametrize("chunk_frames", [0, 1])
def test_vae_decode_matches_diffusers_and_streams(vae_folder, chunk_frames):
    folder, vae = vae_folder
    decoder = Wan22StreamingDecoder(checkpoint=str(folder), chunk_frames=chunk_frames).eval()
    assert (decoder.spatial_factor, decoder.temporal_factor, decoder.latent_channels) == (8, 4, Z)
    latents = torch.randn(1, Z, 5, 2, 3, generator=torch.Generator().manual_seed(1))
    expected = _frames(vae, latents)
    full = torch.cat(_stream(decoder, latents, [5]), dim=1)
    assert full.shape == expected.shape == (1, 17, 3, 16, 24)
    assert (full - expected).abs().max().item() <= 1e-5
    outs = _stream(decoder, latents, [1, 2, 2])  # block by block == the full clip
    assert [o.shape[1] for o in outs] == [1, 8, 8]
    assert (torch.cat(outs, dim=1) - full).abs().max().item() <= 1e-5


def test_vae_encoder_matches_diffusers(vae_folder):
    folder, vae = vae_folder
    encoder = Wan22Encoder(checkpoint=str(folder))
    video = torch.rand(1, 3, 5, 16, 24, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        mode = vae.encode(video).latent_dist.mode()
    mean, std = (
        torch.tensor(v).view(1, -1, 1, 1, 1) for v in (WAN22_LATENTS_MEAN, WAN22_LATENTS_STD)
    )
    torch.testing.assert_close(encoder.encode(video), (mode - mean) / std, rtol=0, atol=1e-5)


def to_wan22_name(key: str, num_res: int = NUM_RES) -> str:
    """diffusers name -> ``Wan2.2_VAE.pth`` name (the test's own inverse of the key map)."""
    for new, old in (("quant_conv.", "conv1."), ("post_quant_conv.", "conv2.")):
        if key.startswith(new):
            return old + key[len(new) :]
    key = re.sub(r"^(encoder|decoder)\.conv_in\.", r"\1.conv1.", key)
    key = re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.head.0.", key)
    key = re.sub(r"^(encoder|decoder)\.conv_out\.", r"\1.head.2.", key)
    key = re.sub(r"mid_block\.attentions\.0\.", "middle.1.", key)
    key = re.sub(r"mid_block\.resnets\.(\d)\.", lambda m: f"middle.{2 * int(m[1])}.", key)
    for kind, resampler in (("down", num_res), ("up", num_res + 1)):  # after the resnets
        key = re.sub(rf"{kind}_blocks\.(\d+)\.resnets\.", rf"{kind}samples.\1.{kind}samples.", key)
        key = re.sub(rf"{kind}_blocks\.(\d+)\.{kind}sampler\.",
                     rf"{kind}samples.\1.{kind}samples.{resampler}.", key)  # fmt: skip
    for new, old in (("norm1", "residual.0"), ("conv1", "residual.2"), ("norm2", "residual.3"),
                     ("conv2", "residual.6"), ("conv_shortcut", "shortcut")):  # fmt: skip
        key = re.sub(rf"(samples\.\d+\.|middle\.[02]\.){new}\.", rf"\1{old}.", key)
    return key


def test_wan_format_checkpoint_loads_through_key_map(vae_folder, tmp_path):
    _, vae = vae_folder
    state = {to_wan22_name(k): v.clone() for k, v in vae.state_dict().items()}
    assert "decoder.upsamples.0.upsamples.2.time_conv.weight" in state
    assert "encoder.downsamples.1.downsamples.0.shortcut.weight" in state
    assert all(wan22_vae_key_to_diffusers(k) in vae.state_dict() for k in state)
    torch.save(state, tmp_path / "Wan2.2_VAE.pth")
    decoder = Wan22StreamingDecoder(str(tmp_path / "Wan2.2_VAE.pth"), base_dim=8,
                                    dim_mult=[1, 2, 2], num_res_blocks=1,
                                    temperal_downsample=[True, True])  # fmt: skip
    latents = torch.randn(1, Z, 2, 2, 2, generator=torch.Generator().manual_seed(3))
    frames = torch.cat(_stream(decoder, latents, [2]), dim=1)
    assert (frames - _frames(vae, latents)).abs().max().item() <= 1e-5
    encoder = Wan22Encoder(str(tmp_path / "Wan2.2_VAE.pth"), base_dim=8, dim_mult=[1, 2, 2],
                           num_res_blocks=1, temperal_downsample=[True, True])  # fmt: skip
    assert encoder.encode(torch.zeros(1, 3, 1, 16, 16)).shape == (1, Z, 1, 2, 2)


def test_real_size_layout_matches_diffusers_and_key_map():
    """At the real Wan 2.2 size (meta tensors): same names and shapes as diffusers' VAE."""
    with torch.device("meta"):
        ref = AutoencoderKLWan(base_dim=160, decoder_base_dim=256, z_dim=Z, is_residual=True,
                               in_channels=12, out_channels=12, patch_size=2,
                               scale_factor_spatial=16, latents_mean=list(WAN22_LATENTS_MEAN),
                               latents_std=list(WAN22_LATENTS_STD))  # fmt: skip
        dec = Wan22Decoder3d(256, Z, [1, 2, 4, 4], 2, [True, True, False], 2)
        enc = Wan22Encoder3d(160, 2 * Z, [1, 2, 4, 4], 2, [False, True, True], 2)
    expected = {k: v.shape for k, v in ref.state_dict().items()}
    for side, module in (("decoder", dec), ("encoder", enc)):
        ours = {f"{side}.{k}": v.shape for k, v in module.state_dict().items()}
        assert ours == {k: v for k, v in expected.items() if k.startswith(side + ".")}
    originals = [to_wan22_name(k, num_res=2) for k in expected]
    assert "decoder.upsamples.2.upsamples.3.resample.1.weight" in originals
    assert "encoder.downsamples.0.downsamples.2.resample.1.weight" in originals
    assert [wan22_vae_key_to_diffusers(k) for k in originals] == list(expected)


# ------------------------------------------------------------------ (d) mismatched checkpoint
def test_mismatched_checkpoint_is_one_clear_error(vae_folder, tmp_path):
    folder, vae = vae_folder
    state = {to_wan22_name(k): v.clone() for k, v in vae.state_dict().items()}
    del state["decoder.head.2.bias"]
    state["decoder.conv1.weight"] = torch.zeros(3, 3, 3, 3, 3)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as err:
        Wan22StreamingDecoder(str(tmp_path / "bad.pth"), base_dim=8, dim_mult=[1, 2, 2],
                              num_res_blocks=1, temperal_downsample=[True, True])  # fmt: skip
    message = str(err.value)
    assert "bad.pth" in message and "Wan22StreamingDecoder" in message
    assert "missing (1):\n    decoder.conv_out.bias" in message
    assert "wrong shape (1):\n    decoder.conv_in.weight: checkpoint (3, 3, 3, 3, 3)" in message
    wan21 = tmp_path / "wan21"
    AutoencoderKLWan(base_dim=8, dim_mult=[1, 2, 2], num_res_blocks=1).save_pretrained(wan21)
    with pytest.raises(CheckpointError, match="Wan 2.1 VAE, not Wan 2.2"):
        Wan22StreamingDecoder(str(wan21))
    assert json.loads((folder / "config.json").read_text())["is_residual"] is True


# ------------------------------------------------------------------ (e) recipe end to end
def test_recipe_composes_at_reference_settings():
    cfg = compose_run(["recipe=wan22_ti2v_5b_720p"])
    assert (cfg.rollout.height, cfg.rollout.width, cfg.fps) == (704, 1280, 24)
    assert 1 + 4 * (cfg.rollout.frames_per_block - 1) == 121
    assert (cfg.scheduler.num_steps, cfg.scheduler.shift, cfg.guidance.scale) == (50, 5.0, 5.0)
    assert (cfg.model.dim, cfg.model.in_dim, cfg.vae.z_dim) == (3072, 48, 48)


@pytest.mark.parametrize("with_image", [False, True])
def test_tiny_recipe_run_writes_video(tmp_path, with_image):
    overrides = [*RUN, f"paths.root={tmp_path}", "vae.checkpoint=null", *VAE_ARGS,
                 "conditioner.encoder.checkpoint=null", "scheduler.num_steps=1",
                 *[a.replace("vae.", "conditioner.encoder.") for a in VAE_ARGS]]  # fmt: skip
    if with_image:  # another size: center-cropped and resized to the video's
        Image.new("RGB", (48, 40), (200, 40, 10)).save(tmp_path / "first.jpg")
        overrides.append(f"image={tmp_path / 'first.jpg'}")
    assert run_job(compose_run(overrides)) == 0
    run_dir = next((tmp_path / "runs" / "wan22_ti2v_5b_720p").iterdir())
    assert read_video_frames(run_dir / "video.mp4") == 1 + 4 * (FRAMES - 1)
