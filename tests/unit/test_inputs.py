"""Inputs of the I2V / CFG recipes: image files, the new config groups, their checks, the CLI."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys

import pytest
import torch
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from hydra.utils import instantiate
from PIL import Image

from flashdreams import ConfigError
from flashdreams.build import build_rollout
from flashdreams.cli import _image_flag, group_options
from flashdreams.io.image import fit_image, image_to_tensor, load_image
from flashdreams.vae.wan21_encode import Wan21Encoder
from tests.unit.test_config import compose_run

CLIP_TINY = ("image_encoder.config={hidden_size:16,intermediate_size:32,num_hidden_layers:2,"
             "num_attention_heads:2,projection_dim:8}")  # fmt: skip
ENCODER_TINY = ["conditioner.encoder.base_dim=8", "conditioner.encoder.num_res_blocks=1"]
TINY_OPTION = {
    ("image_encoder", "clip"): [
        "image_encoder.checkpoint=null",
        "image_encoder.processor=null",
        CLIP_TINY,
    ],  # fmt: skip
    ("conditioner", "concat"): ENCODER_TINY,
    ("conditioner", "first_frame"): ENCODER_TINY,
}
I2V = ["recipe=causal_forcing_wan21_i2v_1_3b_framewise", "model=tiny", "model.checkpoint=null",
       "text_encoder=random", "vae=preview", "~vae.checkpoint", "conditioner.encoder.checkpoint=null",
       *ENCODER_TINY, "rollout.height=32", "rollout.width=32", "rollout.total_blocks=2",
       "device=cpu"]  # fmt: skip


def _run(args, cwd, check=True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run([sys.executable, "-m", "flashdreams.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert not check or proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _png(path, size=(48, 32), seed=0):
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=gen, dtype=torch.uint8)
    Image.fromarray(pixels.numpy()).save(path)
    return path


# ---------------------------------------------------------------- image files
def test_load_image_reads_png_and_jpeg(tmp_path):
    _png(tmp_path / "a.png")
    Image.open(tmp_path / "a.png").save(tmp_path / "a.jpg")
    for name in ("a.png", "a.jpg"):
        img = load_image(tmp_path / name)
        assert img.mode == "RGB" and img.size == (48, 32)


@pytest.mark.parametrize("content", [None, b"not an image at all", b"\x89PNG\r\n\x1a\ntruncated"])
def test_bad_image_is_one_line_config_error(tmp_path, content):
    path = tmp_path / "bad.png"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as err:
        load_image(path)
    assert str(err.value).startswith("image=") and "\n" not in str(err.value)


def test_fit_image_resizes_and_crops_with_a_log_line(tmp_path, caplog):
    img = load_image(_png(tmp_path / "a.png", size=(64, 32)))
    assert fit_image(img, 32, 64) is img  # right size: untouched, no log
    with caplog.at_level(logging.INFO, logger="flashdreams.io.image"):
        same_aspect = fit_image(img, 16, 32)
        cropped = fit_image(img, 32, 32)
    assert same_aspect.size == (32, 16) and cropped.size == (32, 32)
    assert "resized to 32x16" in caplog.text and "center crop 32x32" in caplog.text
    # the crop keeps the middle: equal to resizing the central square
    middle = img.crop((16, 0, 48, 32))
    assert (image_to_tensor([cropped]) - image_to_tensor([middle])).abs().max() == 0


def test_image_to_tensor_range():
    img = Image.new("RGB", (2, 1))
    img.putpixel((0, 0), (0, 0, 0))
    img.putpixel((1, 0), (255, 255, 255))
    x = image_to_tensor([img])
    assert x.shape == (1, 3, 1, 2) and x[0, :, 0, 0].eq(-1).all() and x[0, :, 0, 1].eq(1).all()


def test_image_flag_sugar():
    assert _image_flag(["--image", "a.png", "seed=1"]) == ["image=a.png", "seed=1"]
    assert _image_flag(["--image=dir/my pic.png"]) == ["image='dir/my pic.png'"]
    with pytest.raises(SystemExit):
        _image_flag(["--image"])


# ---------------------------------------------------------------- new groups
CASES = [(g, o) for g in ("guidance", "image_encoder", "conditioner") for o in group_options(g)]


@pytest.mark.parametrize("group,option", CASES)
def test_every_new_option_instantiates(group, option):
    part = instantiate(
        compose_run([f"{group}={option}", *TINY_OPTION.get((group, option), [])])[group]
    )
    assert part is not None


def test_clip_gives_penultimate_257_tokens():
    enc = instantiate(
        compose_run(["image_encoder=clip", *TINY_OPTION[("image_encoder", "clip")]]).image_encoder
    )
    images = [Image.new("RGB", (40, 30), (200, 10, 10)), Image.new("RGB", (30, 40))]
    tokens = enc.encode(images, torch.device("cpu"), torch.float32)
    assert tokens.shape == (2, 257, 16)
    pixels = enc.processor(images=images, return_tensors="pt")["pixel_values"]
    hidden = enc.model(pixel_values=pixels, output_hidden_states=True).hidden_states
    assert len(hidden) == 3 and torch.equal(tokens, hidden[1])  # penultimate of 2 layers


# ---------------------------------------------------------------- checks at build time
@pytest.mark.parametrize("overrides,match", [
    (I2V, "image=null"),
    (["model=tiny", "image=x.png", "device=cpu"], None),  # ok: T2V ignores the image
    (["model=tiny", "model.in_dim=36", "device=cpu"], "model.in_dim=36"),
    (["model=tiny", "model.image_dim=32", "device=cpu"], "model.image_dim=32"),
    (["guidance=cfg", "device=cpu"], "guidance=cfg needs a bidirectional recipe"),
])  # fmt: skip
def test_build_checks(overrides, match, caplog):
    if match is None:
        with caplog.at_level(logging.WARNING):
            build_rollout(compose_run(overrides))
        assert "is ignored" in caplog.text
        return
    with pytest.raises(ConfigError, match=re.escape(match)):
        build_rollout(compose_run(overrides))


# ---------------------------------------------------------------- Wan-format VAE encoder keys
def _to_wan_name(key: str) -> str:
    """diffusers -> Wan original name (the test's own inverse, checked against diffusers')."""
    rules = [(r"^quant_conv\.", "conv1."), (r"^encoder\.conv_in\.", "encoder.conv1."),
             (r"^encoder\.norm_out\.", "encoder.head.0."),
             (r"^encoder\.conv_out\.", "encoder.head.2."),
             (r"^encoder\.down_blocks\.", "encoder.downsamples."),
             (r"mid_block\.attentions\.0\.", "middle.1."),
             (r"mid_block\.resnets\.(\d)\.", lambda m: f"middle.{2 * int(m[1])}."),
             *[(rf"((downsamples\.\d+|middle\.[02])\.){a}\.", rf"\1{b}.")
               for a, b in (("norm1", "residual.0"), ("conv1", "residual.2"),
                            ("norm2", "residual.3"), ("conv2", "residual.6"),
                            ("conv_shortcut", "shortcut"))]]  # fmt: skip
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


def test_wan_format_vae_encoder_matches_diffusers(tmp_path):
    arch = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2], num_res_blocks=1,
                temperal_downsample=[True, True])  # fmt: skip
    torch.manual_seed(0)
    vae = AutoencoderKLWan(**arch).eval()
    ours_keys = {k: v for k, v in vae.state_dict().items() if k.startswith(("encoder.", "quant_"))}
    wan = {_to_wan_name(k): v for k, v in ours_keys.items()}
    assert convert_wan_vae_to_diffusers(wan).keys() == ours_keys.keys()  # the inverse is right
    torch.save({**wan, "decoder.head.0.gamma": torch.ones(8)}, tmp_path / "Wan2.1_VAE.pth")
    enc = Wan21Encoder(str(tmp_path / "Wan2.1_VAE.pth"), **arch)
    video = torch.rand(1, 3, 9, 16, 16) * 2 - 1
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        ref = (vae.encode(video).latent_dist.mode() - mean) / std
    torch.testing.assert_close(enc.encode(video), ref, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- CLI end to end
def test_cli_i2v_prompt_file_batch_writes_one_video_each(tmp_path):
    from flashdreams.io.video import read_video_frames

    _png(tmp_path / "first.png", size=(64, 48))
    (tmp_path / "prompts.txt").write_text("a fox\n\na dog\n")
    _run([*I2V, "--image", str(tmp_path / "first.png"),
          f"prompt_file={tmp_path / 'prompts.txt'}"], tmp_path)  # fmt: skip
    (run_dir,) = (tmp_path / "outputs/runs/causal_forcing_wan21_i2v_1_3b_framewise").iterdir()
    videos = sorted(run_dir.glob("video_*.mp4"))
    assert [v.name for v in videos] == ["video_000.mp4", "video_001.mp4"]
    assert all(read_video_frames(v) == 1 + 4 * 2 for v in videos)  # image frame + 2 blocks


def test_cli_unreadable_image_is_one_line(tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"garbage")
    proc = _run([*I2V, f"image={tmp_path / 'broken.jpg'}"], tmp_path, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flashdreams: error: image=")
