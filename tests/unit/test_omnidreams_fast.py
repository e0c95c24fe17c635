"""The fast OmniDreams recipe's parts (CPU, fp32): LightVAE files (Wan 2.1 VAE keys at a quarter
of the widths, LightX2V's ``lightvaew2_1.pth``) load into the recipe's HDMap and first-frame
encoders at their real size and encode as diffusers' ``AutoencoderKLWan`` of those widths
(atol 1e-5); LightTAE (``raw_latents``) decodes the DiT's latents as the same TAEHV fed
``z * std + mean`` (atol 0); the 2-step list warps to NVIDIA's runtime grid [1000, 803.57].
"""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKLWan
from hydra.utils import instantiate

from flashdreams.vae.taehv import TAEHVDecoder
from flashdreams.vae.wan21 import WAN21_LATENTS_MEAN, WAN21_LATENTS_STD
from tests.unit.test_config import compose_run
from tests.unit.test_inputs import _to_wan_name

FAST = "recipe=omnidreams_single_view_fast"


def test_lightvae_file_loads_into_both_encoders_and_encodes_as_diffusers(tmp_path):
    cfg = compose_run([FAST])
    arch = {k: cfg.control.encoder[k] for k in ("base_dim", "z_dim", "num_res_blocks")}
    assert arch["base_dim"] == 24 == cfg.conditioner.encoder.base_dim
    torch.manual_seed(0)
    ref = AutoencoderKLWan(**arch, dim_mult=list(cfg.control.encoder.dim_mult),
                           temperal_downsample=list(cfg.control.encoder.temperal_downsample)).eval()  # fmt: skip
    wan = {_to_wan_name(k): v for k, v in ref.state_dict().items()
           if k.startswith(("encoder.", "quant_"))}  # fmt: skip
    assert wan["encoder.conv1.weight"].shape == (24, 3, 3, 3, 3)  # LightVAE's first level
    torch.save(wan, tmp_path / "lightvaew2_1.pth")
    cfg = compose_run([FAST, f"control.encoder.checkpoint={tmp_path / 'lightvaew2_1.pth'}",
                       f"conditioner.encoder.checkpoint={tmp_path / 'lightvaew2_1.pth'}",
                       "control.encoder.dtype=float32"])  # the recipe runs it in bf16  # fmt: skip
    video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    mean = torch.tensor(WAN21_LATENTS_MEAN).view(1, -1, 1, 1, 1)
    std = torch.tensor(WAN21_LATENTS_STD).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        want = (ref.encode(video).latent_dist.mode() - mean) / std
    for node in (cfg.control.encoder, cfg.conditioner.encoder):
        enc = instantiate(node)
        torch.testing.assert_close(enc.encode(video), want, rtol=0, atol=1e-5)


def test_lighttae_decodes_raw_wan_latents():
    cfg = compose_run([FAST])
    assert cfg.vae.raw_latents and "lighttaew2_1" in cfg.vae.checkpoint
    kwargs = dict(channels=[16, 8, 8, 8], seed=3)
    raw, plain = TAEHVDecoder(**kwargs, raw_latents=True), TAEHVDecoder(**kwargs)
    z = torch.randn(1, 16, 2, 4, 4)
    mean = torch.tensor(WAN21_LATENTS_MEAN).view(1, -1, 1, 1, 1)
    std = torch.tensor(WAN21_LATENTS_STD).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(raw.decode_step(z), plain.decode_step(z * std + mean),
                                   rtol=0, atol=0)  # fmt: skip
    assert "latent_mean" not in raw.state_dict()  # not a checkpoint key


@pytest.mark.parametrize("recipe, want", [
    ("omnidreams_single_view", [1000.0, 937.5, 833.333, 625.0]),  # release.py: the 4-step default
    ("omnidreams_single_view_fast", [1000.0, 803.571]),  # NVIDIA runtime: [1000, 450], shift 5
])  # fmt: skip
def test_student_step_lists(recipe, want):
    scheduler = instantiate(compose_run([f"recipe={recipe}"]).scheduler)
    assert scheduler.host_timesteps() == pytest.approx(want, abs=1e-3)
