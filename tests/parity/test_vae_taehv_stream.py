"""Streaming TAEHV decode vs its full-clip parallel decode vs a frame-by-frame reference.

Tolerance: max abs difference <= 1e-5 on [0, 1] frames (fp32, CPU): the paths run the same convs
on differently batched frames, so they differ by rounding only.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import save_file

import flashdreams
from flashdreams.io.checkpoint import CheckpointError
from flashdreams.vae.taehv import MemBlock, TAEHVDecoder, TGrow

ATOL = 1e-5
TINY = (16, 8, 8, 4)  # level widths: small, but unequal so misplaced weights cannot fit
CONF_DIR = Path(flashdreams.__file__).parent / "conf" / "vae"


@pytest.fixture(scope="module")
def decoder() -> TAEHVDecoder:
    return TAEHVDecoder(channels=TINY, seed=0).eval()


def latents_of(num_frames: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 16, num_frames, 3, 4, generator=g)  # (B, C, T, h, w)


@torch.no_grad()
def frame_by_frame(decoder: TAEHVDecoder, latents: torch.Tensor) -> torch.Tensor:
    """Independent reference: layer by layer, one frame at a time, as the causal graph reads."""
    frames = list(latents.transpose(1, 2).unbind(1))  # T x (B, C, h, w)
    for layer in decoder.decoder:
        if isinstance(layer, MemBlock):
            pasts = [torch.zeros_like(frames[0])] + frames[:-1]
            frames = [layer(x, past) for x, past in zip(frames, pasts, strict=True)]
        elif isinstance(layer, TGrow):
            frames = [y for x in frames for y in layer.conv(x).chunk(layer.stride, dim=1)]
        else:
            frames = [layer(x) for x in frames]
    return torch.stack(frames, dim=1).clamp(0, 1)[:, 3:]  # (B, 1 + 4 (T - 1), 3, H, W)


def stream(decoder: TAEHVDecoder, latents: torch.Tensor, blocks: list[int]) -> list[torch.Tensor]:
    decoder.reset()
    return [decoder.decode_step(block) for block in latents.split(blocks, dim=2)]


def test_full_decode_matches_frame_by_frame_reference(decoder):
    latents = latents_of(4)
    full = decoder.decode_full(latents)
    assert full.shape == (2, 13, 3, 24, 32)
    assert full.std() > 0.05  # the random weights give frames with content, not a flat clamp
    assert (full - frame_by_frame(decoder, latents)).abs().max().item() <= ATOL


@pytest.mark.parametrize("blocks", [[1, 3, 3], [3, 3, 3], [2, 1, 4]])
def test_stream_equals_full_clip(decoder, blocks):
    latents = latents_of(sum(blocks))
    outs = stream(decoder, latents, blocks)
    assert [o.shape[1] for o in outs] == [1 + 4 * (blocks[0] - 1)] + [4 * n for n in blocks[1:]]
    frames = torch.cat(outs, dim=1)
    full = decoder.decode_full(latents)
    assert frames.shape == full.shape == (2, 1 + 4 * (sum(blocks) - 1), 3, 24, 32)
    assert (frames - full).abs().max().item() <= ATOL
    assert 0.0 <= frames.min() and frames.max() <= 1.0
    # reset() starts a new clip: the same blocks decode to the same frames again.
    assert torch.equal(torch.cat(stream(decoder, latents, blocks), dim=1), frames)


@pytest.mark.parametrize("blocks", [[1, 3, 3], [2, 1, 4]])
def test_channels_last_streams_the_same_frames(decoder, blocks):
    """``channels_last=true`` (NHWC convolutions): the same frames and MemBlock memories as
    the default layout over a clip start and steady blocks, frames in the default's strides."""
    nhwc = TAEHVDecoder(channels=TINY, seed=0, channels_last=True).eval()
    assert nhwc.decoder[1].weight.is_contiguous(memory_format=torch.channels_last)
    latents = latents_of(sum(blocks))
    got, ref = stream(nhwc, latents, blocks), stream(decoder, latents, blocks)
    for a, b in zip(got, ref, strict=True):
        assert a.shape == b.shape and a.stride() == b.stride()
        assert (a - b).abs().max().item() <= ATOL
    assert nhwc._memory.keys() == decoder._memory.keys()
    assert all(m.is_contiguous() for m in nhwc._memory.values())
    assert all((nhwc._memory[k] - decoder._memory[k]).abs().max() <= ATOL for k in nhwc._memory)


def test_channels_last_is_checked():
    with pytest.raises(flashdreams.ConfigError, match="vae.channels_last"):
        TAEHVDecoder(channels=TINY, channels_last="yes")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_checkpoint_round_trip(decoder, tmp_path, suffix):
    state = {k: v.clone() for k, v in decoder.state_dict().items()}
    state["encoder.0.weight"] = torch.zeros(64, 3, 3, 3)  # real files hold the encoder too
    path = tmp_path / f"taew2_1{suffix}"
    if suffix == ".pth":
        torch.save(state, path)
    else:
        save_file(state, str(path))
    loaded = TAEHVDecoder(checkpoint=str(path), channels=TINY)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in decoder.state_dict().items())
    latents = latents_of(5, seed=3)
    torch.testing.assert_close(
        torch.cat(stream(loaded, latents, [2, 3]), dim=1), decoder.decode_full(latents)
    )


def test_real_key_layout_and_wider_tgrow(tmp_path):
    """Key names of taew2_1.pth (decoder.<Sequential index>); a TGrow file wider than the model
    keeps its last-frame rows, as the reference loader does."""
    with torch.device("meta"):
        names = set(TAEHVDecoder(channels=(256, 128, 64, 64)).state_dict())
    assert {"decoder.1.weight", "decoder.3.conv.0.weight", "decoder.7.conv.weight"} <= names
    assert {"decoder.13.conv.weight", "decoder.19.conv.weight", "decoder.22.bias"} <= names
    small = TAEHVDecoder(channels=TINY, seed=4)
    state = dict(small.state_dict())
    state["decoder.7.conv.weight"] = torch.cat(
        [torch.randn(16, 16, 1, 1), state["decoder.7.conv.weight"]]
    )
    torch.save(state, tmp_path / "wide.pth")
    loaded = TAEHVDecoder(checkpoint=str(tmp_path / "wide.pth"), channels=TINY)
    assert torch.equal(loaded.decoder[7].conv.weight, small.decoder[7].conv.weight)


def test_mismatched_checkpoint_is_one_clear_error(decoder, tmp_path):
    state = dict(decoder.state_dict())
    del state["decoder.22.bias"]
    state["decoder.99.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"missing \(1\):\n    decoder\.22\.bias") as err:
        TAEHVDecoder(checkpoint=str(tmp_path / "bad.pth"), channels=TINY)
    assert "bad.pth" in str(err.value) and "unexpected (1):\n    decoder.99.weight" in str(
        err.value
    )
    with pytest.raises(CheckpointError, match="wrong shape"):
        TAEHVDecoder(checkpoint=str(tmp_path / "bad.pth"), channels=(32, 8, 8, 4))


def test_config_instantiates_seeded():
    config = OmegaConf.load(CONF_DIR / "taehv.yaml")
    config.channels = list(TINY)
    a, b, c = instantiate(config), instantiate(config), instantiate(config, seed=1)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert not torch.equal(a.decoder[1].weight, c.decoder[1].weight)
    assert (a.spatial_factor, a.temporal_factor, a.latent_channels) == (8, 4, 16)
