"""Latent preview decoder (and the no-op decoder): shapes, frame convention, value range."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

import flashdreams
from flashdreams.vae.preview import WAN21_RGB_BIAS, WAN21_RGB_FACTORS, LatentPreviewDecoder

CONF_DIR = Path(flashdreams.__file__).parent / "conf" / "vae"


def latents_of(num_frames: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return scale * torch.randn(2, 16, num_frames, 3, 5, generator=g)  # (B, C, T, h, w)


@pytest.mark.parametrize("blocks", [[1, 3, 3], [3, 3, 3], [2, 1]])
def test_frame_convention_and_shapes(blocks):
    decoder = LatentPreviewDecoder()
    outs = [decoder.decode_step(b) for b in latents_of(sum(blocks)).split(blocks, dim=2)]
    assert [o.shape[1] for o in outs] == [1 + 4 * (blocks[0] - 1)] + [4 * n for n in blocks[1:]]
    assert all(o.shape[0] == 2 and o.shape[2:] == (3, 24, 40) for o in outs)


def test_matches_one_full_clip_decode_and_reset():
    latents = latents_of(7)
    decoder = LatentPreviewDecoder(spatial_factor=2, temporal_factor=3)
    full = decoder.decode_step(latents)
    assert full.shape == (2, 1 + 3 * 6, 3, 6, 10)
    decoder.reset()
    streamed = torch.cat([decoder.decode_step(b) for b in latents.split([1, 3, 3], dim=2)], 1)
    assert torch.equal(streamed, full)


def test_values_are_the_published_projection():
    latents = latents_of(2)
    frames = LatentPreviewDecoder().decode_step(latents)
    factors, bias = torch.tensor(WAN21_RGB_FACTORS), torch.tensor(WAN21_RGB_BIAS)
    rgb = torch.einsum("bcthw,cr->btrhw", latents, factors) + bias.view(1, 1, 3, 1, 1)
    expected = ((rgb + 1) / 2).clamp(0, 1)  # (B, T, 3, h, w)
    # Frame 0 is latent 0; frames 1..4 repeat latent 1; each latent pixel is an 8x8 patch.
    torch.testing.assert_close(frames[:, 0, :, ::8, ::8], expected[:, 0])
    for t in range(1, 5):
        torch.testing.assert_close(frames[:, t, :, 7::8, 7::8], expected[:, 1])
    zero = LatentPreviewDecoder().decode_step(torch.zeros(1, 16, 1, 1, 1))
    torch.testing.assert_close(zero.flatten()[::64], (bias + 1) / 2)


def test_range_is_clamped():
    frames = LatentPreviewDecoder().decode_step(latents_of(3, scale=50.0))
    assert frames.min() == 0.0 and frames.max() == 1.0


def test_configs_instantiate():
    preview = instantiate(OmegaConf.load(CONF_DIR / "preview.yaml"))
    assert isinstance(preview, LatentPreviewDecoder) and preview.produces_frames
    assert (preview.spatial_factor, preview.temporal_factor) == (8, 4)
    none = instantiate(OmegaConf.load(CONF_DIR / "none.yaml"))
    assert none.produces_frames is False
    none.reset()
    assert none.decode_step(latents_of(2)) is None
