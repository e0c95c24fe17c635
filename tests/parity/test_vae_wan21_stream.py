"""Streaming Wan 2.1 VAE decode vs diffusers' full-clip ``AutoencoderKLWan.decode``.

Tolerance: max abs difference <= 1e-5 on [0, 1] frames (fp32, CPU). The streaming path runs the
same diffusers modules; the only differences are the chunking of frames through the causal convs
and the fp32 un-normalization, both rounding-level.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from hydra.utils import instantiate
from omegaconf import OmegaConf

import flashdreams
from flashdreams.io.checkpoint import CheckpointError
from flashdreams.vae.wan21 import Wan21StreamingDecoder, wan_key_to_diffusers

ATOL = 1e-5
CONF_DIR = Path(flashdreams.__file__).parent / "conf" / "vae"
# Tiny but complete: 3 levels, both time upsamplers (4x), a shortcut conv in level 1.
TINY = dict(
    base_dim=8, z_dim=16, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[True, True]
)


@pytest.fixture(scope="module")
def reference() -> AutoencoderKLWan:
    torch.manual_seed(0)
    return AutoencoderKLWan(**TINY).eval()


def reference_frames(vae: AutoencoderKLWan, latents: torch.Tensor) -> torch.Tensor:
    """Diffusers' full-clip decode of DiT-space latents, as (B, T, 3, H, W) in [0, 1]."""
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        video = vae.decode(latents * std + mean).sample  # (B, 3, T, H, W)
    return ((video + 1) / 2).permute(0, 2, 1, 3, 4)


def to_wan_name(key: str, num_res_blocks: int) -> str:
    """Diffusers name -> Wan original name (the test's own inverse of the loader's key map)."""
    per_level = num_res_blocks + 2
    key = re.sub(r"^post_quant_conv\.", "conv2.", key)
    key = re.sub(r"^quant_conv\.", "conv1.", key)
    key = re.sub(r"^decoder\.conv_in\.", "decoder.conv1.", key)
    key = re.sub(r"^decoder\.norm_out\.", "decoder.head.0.", key)
    key = re.sub(r"^decoder\.conv_out\.", "decoder.head.2.", key)
    key = re.sub(r"mid_block\.attentions\.0\.", "middle.1.", key)
    key = re.sub(r"mid_block\.resnets\.(\d)\.", lambda m: f"middle.{2 * int(m[1])}.", key)
    key = re.sub(
        r"up_blocks\.(\d+)\.resnets\.(\d+)\.",
        lambda m: f"upsamples.{int(m[1]) * per_level + int(m[2])}.",
        key,
    )
    key = re.sub(
        r"up_blocks\.(\d+)\.upsamplers\.0\.",
        lambda m: f"upsamples.{int(m[1]) * per_level + num_res_blocks + 1}.",
        key,
    )
    if key.startswith("decoder.") and not re.match(r"decoder\.(conv1|head)\.", key):
        for new, old in (("norm1", "residual.0"), ("conv1", "residual.2"), ("norm2", "residual.3")):
            key = re.sub(rf"\.{new}\.", f".{old}.", key)
        key = re.sub(r"\.conv2\.", ".residual.6.", key)
        key = re.sub(r"\.conv_shortcut\.", ".shortcut.", key)
    return key


def wan_state(vae: AutoencoderKLWan) -> dict[str, torch.Tensor]:
    nrb = vae.config.num_res_blocks
    return {to_wan_name(k, nrb): v.clone() for k, v in vae.state_dict().items()}


def decode_in_blocks(decoder, latents: torch.Tensor, blocks: list[int]) -> list[torch.Tensor]:
    decoder.reset()
    return [decoder.decode_step(block) for block in latents.split(blocks, dim=2)]


@pytest.mark.parametrize("chunk_frames", [0, 1])
@pytest.mark.parametrize("blocks", [[1, 3, 3], [3, 3, 3]])
def test_stream_equals_diffusers_full_decode(reference, tmp_path, blocks, chunk_frames):
    reference.save_pretrained(tmp_path)
    decoder = Wan21StreamingDecoder(checkpoint=str(tmp_path), chunk_frames=chunk_frames).eval()
    assert (decoder.spatial_factor, decoder.temporal_factor) == (4, 4)
    latents = torch.randn(2, 16, sum(blocks), 4, 5, generator=torch.Generator().manual_seed(1))
    outs = decode_in_blocks(decoder, latents, blocks)
    assert [o.shape[1] for o in outs] == [1 + 4 * (blocks[0] - 1)] + [4 * n for n in blocks[1:]]
    frames = torch.cat(outs, dim=1)  # (B, T, 3, H, W)
    expected = reference_frames(reference, latents)
    assert frames.shape == expected.shape == (2, 1 + 4 * (sum(blocks) - 1), 3, 16, 20)
    assert (frames - expected).abs().max().item() <= ATOL
    # The second clip after reset() starts afresh.
    again = torch.cat(decode_in_blocks(decoder, latents, blocks), dim=1)
    assert (again - expected).abs().max().item() <= ATOL


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_wan_format_checkpoint_loads_through_key_map(reference, tmp_path, suffix):
    path = tmp_path / f"Wan2.1_VAE{suffix}"
    state = wan_state(reference)  # encoder keys included: the loader must skip them
    if suffix == ".pth":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    decoder = Wan21StreamingDecoder(checkpoint=str(path), **TINY)
    latents = torch.randn(1, 16, 5, 3, 4, generator=torch.Generator().manual_seed(2))
    frames = torch.cat(decode_in_blocks(decoder, latents, [2, 3]), dim=1)
    assert (frames - reference_frames(reference, latents)).abs().max().item() <= ATOL


def test_key_map_agrees_with_diffusers_converter():
    """On the real Wan 2.1 layout, the loader's map equals diffusers' single-file converter."""
    with torch.device("meta"):
        full = AutoencoderKLWan()
    names = [k for k in full.state_dict() if k.startswith(("decoder.", "post_quant_conv."))]
    wan_names = [to_wan_name(k, 2) for k in names]
    assert "decoder.upsamples.4.shortcut.weight" in wan_names  # the real file's naming
    by_diffusers = list(convert_wan_vae_to_diffusers(dict.fromkeys(wan_names, 0)))
    assert by_diffusers == names
    assert [wan_key_to_diffusers(k, 2) for k in wan_names] == names
    assert wan_key_to_diffusers("encoder.conv1.weight", 2) is None
    assert wan_key_to_diffusers("conv1.bias", 2) is None


def test_mismatched_checkpoint_is_one_clear_error(reference, tmp_path):
    state = wan_state(reference)
    del state["decoder.head.2.bias"]
    state["decoder.extra.weight"] = torch.zeros(1)
    state["decoder.conv1.weight"] = torch.zeros(3, 3, 3, 3, 3)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        Wan21StreamingDecoder(checkpoint=str(path), **TINY)
    message = str(err.value)
    assert "bad.pth" in message and "Wan21StreamingDecoder" in message
    assert "missing (1):\n    decoder.conv_out.bias" in message
    assert "unexpected (1):\n    decoder.extra.weight" in message
    assert "wrong shape (1):\n    decoder.conv_in.weight: checkpoint (3, 3, 3, 3, 3)" in message
    with pytest.raises(CheckpointError, match="does not exist"):
        Wan21StreamingDecoder(checkpoint=str(tmp_path / "missing.pth"), **TINY)


def test_random_weights_are_seeded_and_config_instantiates():
    config = OmegaConf.load(CONF_DIR / "wan21.yaml")
    config.update(TINY)
    a, b, c = instantiate(config), instantiate(config), instantiate(config, seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    frames = a.decode_step(torch.randn(1, 16, 2, 3, 3))
    assert frames.shape == (1, 5, 3, 12, 12)
    assert 0.0 <= frames.min() and frames.max() <= 1.0
