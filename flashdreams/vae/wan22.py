"""Wan 2.2 VAE decoder (TI2V-5B): 48 latent channels, 16x spatial, 4x temporal, streamed.

The network differs from Wan 2.1 in three places, written here on top of the shared causal
building blocks (``WanCausalConv3d``, ``WanResidualBlock``, ``WanMidBlock``, ``WanResample``):

* the video is patchified 2x2 into 12 channels before the encoder and un-patchified after the
  decoder (so the 8x convolutional VAE gives 16x);
* each decoder level adds a parameter-free shortcut that spreads channels into space (and time)
  around its residual blocks and upsampler (``DupUp``; the encoder mirrors it with ``AvgDown``);
* a level keeps its input width (no halving before the residual blocks).

Decoding is driven by ``Wan21StreamingDecoder``: the causal-conv cache lives across
``decode_step`` calls, so a block-by-block decode gives the frames of one full-clip decode.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.autoencoder_kl_wan import (
    WanCausalConv3d,
    WanMidBlock,
    WanResample,
    WanResidualBlock,
    WanRMS_norm,
)
from torch import nn

from flashdreams.io.checkpoint import CheckpointError, check_state_dict, resolve_path
from flashdreams.io.keymap import wan22_vae_key_to_diffusers
from flashdreams.vae.base import read_tensor_file
from flashdreams.vae.wan21 import Wan21StreamingDecoder

# Per-channel statistics of Wan 2.2 latents (48 channels); the DiT works on (z - mean) / std.
WAN22_LATENTS_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542,
    0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109,
    0.2665, -0.2108, -0.2158, 0.2502, -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899,
    -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)  # fmt: skip
WAN22_LATENTS_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344,
    0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804,
    0.5833, 1.4146, 0.8986, 0.5659, 0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999,
    0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)  # fmt: skip
CACHE_FRAMES = 2  # frames a 3-tap causal conv keeps from the previous chunk


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, C p p, T, H / p, W / p); channel = (c, column offset, row offset)."""
    b, c, t, h, w = x.shape
    x = x.reshape(b, c, t, h // p, p, w // p, p)  # (b, c, t, hh, ph, ww, pw)
    return x.permute(0, 1, 6, 4, 2, 3, 5).reshape(b, c * p * p, t, h // p, w // p)


def unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: (B, C p p, T, h, w) -> (B, C, T, h p, w p)."""
    b, cpp, t, h, w = x.shape
    x = x.reshape(b, cpp // (p * p), p, p, t, h, w)  # (b, c, pw, ph, t, h, w)
    return x.permute(0, 1, 4, 5, 3, 6, 2).reshape(b, cpp // (p * p), t, h * p, w * p)


def cached_conv(conv: WanCausalConv3d, x: torch.Tensor, cache: list | None, idx: list[int]):
    """A causal conv reading its last ``CACHE_FRAMES`` input frames from ``cache[idx[0]]``."""
    if cache is None:
        return conv(x)
    i = idx[0]
    keep = x[:, :, -CACHE_FRAMES:].clone()
    if keep.shape[2] < CACHE_FRAMES and cache[i] is not None:  # a 1-frame chunk: keep one old
        keep = torch.cat([cache[i][:, :, -1:].to(keep.device), keep], dim=2)
    out = conv(x, cache[i])
    cache[i], idx[0] = keep, i + 1
    return out


def spread_channels(x: torch.Tensor, out_dim: int, ft: int, fs: int, first: bool) -> torch.Tensor:
    """DupUp shortcut: repeat channels, then move groups of them into (time, height, width).

    (B, C, T, H, W) -> (B, out_dim, T ft, H fs, W fs); the first chunk of a clip drops the
    ``ft - 1`` leading frames (a clip's first latent frame is one video frame).
    """
    b, c, t, h, w = x.shape
    x = x.repeat_interleave(out_dim * ft * fs * fs // c, dim=1)
    x = x.reshape(b, out_dim, ft, fs, fs, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
    x = x.reshape(b, out_dim, t * ft, h * fs, w * fs)
    return x[:, :, ft - 1 :] if first else x


def gather_channels(x: torch.Tensor, out_dim: int, ft: int, fs: int) -> torch.Tensor:
    """AvgDown shortcut: fold (time, height, width) blocks into channels, average to out_dim.

    (B, C, T, H, W) -> (B, out_dim, ceil(T / ft), H / fs, W / fs); time is zero-padded at the front.
    """
    x = F.pad(x, (0, 0, 0, 0, (-x.shape[2]) % ft, 0))
    b, c, t, h, w = x.shape
    x = x.reshape(b, c, t // ft, ft, h // fs, fs, w // fs, fs).permute(0, 1, 3, 5, 7, 2, 4, 6)
    x = x.reshape(b, out_dim, c * ft * fs * fs // out_dim, t // ft, h // fs, w // fs)
    return x.mean(dim=2)


class ResidualUpLevel(nn.Module):
    """One decoder level: residual blocks + upsampler, plus the channel-to-space shortcut."""

    def __init__(self, in_dim: int, out_dim: int, num_blocks: int, up: bool, up_time: bool):
        super().__init__()
        dims = [in_dim] + [out_dim] * num_blocks
        self.resnets = nn.ModuleList(
            WanResidualBlock(i, o) for i, o in zip(dims[:-1], dims[1:], strict=True)
        )
        mode = "upsample3d" if up_time else "upsample2d"
        self.upsampler = WanResample(out_dim, mode, upsample_out_dim=out_dim) if up else None
        self.out_dim, self.factor_t = out_dim, 2 if up_time else 1

    def forward(self, x, feat_cache=None, feat_idx=(0,), first_chunk=False):
        shortcut = x
        for resnet in self.resnets:
            x = resnet(x, feat_cache=feat_cache, feat_idx=feat_idx)
        if self.upsampler is None:
            return x
        x = self.upsampler(x, feat_cache=feat_cache, feat_idx=feat_idx)
        return x + spread_channels(shortcut, self.out_dim, self.factor_t, 2, first_chunk)


class Wan22Decoder3d(nn.Module):
    """Wan 2.2 residual decoder: conv_in, mid block, residual up levels, head, un-patchify.

    Module names follow diffusers' ``AutoencoderKLWan`` (``decoder.up_blocks.I.resnets.J``), so
    a diffusers folder loads as is and the original file loads through ``io.keymap``.
    """

    def __init__(self, dim, z_dim, dim_mult, num_res_blocks, temperal_upsample, patch_size):
        super().__init__()
        dims = [dim * m for m in [dim_mult[-1], *dim_mult[::-1]]]
        last = len(dim_mult) - 1
        self.patch_size = patch_size
        self.conv_in = WanCausalConv3d(z_dim, dims[0], 3, padding=1)
        self.mid_block = WanMidBlock(dims[0], num_layers=1)
        self.up_blocks = nn.ModuleList(
            ResidualUpLevel(dims[i], dims[i + 1], num_res_blocks + 1, i != last,
                            i != last and temperal_upsample[i])
            for i in range(len(dim_mult))
        )  # fmt: skip
        self.norm_out = WanRMS_norm(dims[-1], images=False)
        self.conv_out = WanCausalConv3d(dims[-1], 3 * patch_size**2, 3, padding=1)

    def forward(self, x, feat_cache=None, feat_idx=(0,), first_chunk=False) -> torch.Tensor:
        # x: (B, z, T, h, w) -> (B, 3, T_out, 16 h, 16 w) in about [-1, 1]
        idx = feat_idx if isinstance(feat_idx, list) else list(feat_idx)
        x = cached_conv(self.conv_in, x, feat_cache, idx)
        x = self.mid_block(x, feat_cache=feat_cache, feat_idx=idx)
        for level in self.up_blocks:
            x = level(x, feat_cache=feat_cache, feat_idx=idx, first_chunk=first_chunk)
        x = F.silu(self.norm_out(x))
        return unpatchify(cached_conv(self.conv_out, x, feat_cache, idx), self.patch_size)


def read_wan22_vae(path: Path, side: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(diffusers config or {}, the ``side`` tensors under diffusers names) of a Wan 2.2 VAE.

    Args:
        path: ``Wan2.2_VAE.pth`` (or the same keys in safetensors), a diffusers-named file, or a
            diffusers ``AutoencoderKLWan`` folder (``config.json`` + weights).
        side: ``"decoder"`` (``decoder.*`` + ``post_quant_conv.*``) or ``"encoder"``.
    """
    config: dict = {}
    files = [path]
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"checkpoint {str(path)!r} is a folder without config.json")
        config = json.loads((path / "config.json").read_text())
        if not config.get("is_residual") or not config.get("patch_size"):
            raise CheckpointError(f"checkpoint {str(path)!r} is a Wan 2.1 VAE, not Wan 2.2")
        files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
        if not files:
            raise CheckpointError(f"checkpoint {str(path)!r} has no *.safetensors or *.bin")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(read_tensor_file(file))
    keep = ("decoder.", "post_quant_conv.") if side == "decoder" else ("encoder.", "quant_conv.")
    out = {}
    for key, value in state.items():
        key = wan22_vae_key_to_diffusers(key)
        if key.startswith(keep):
            out[key] = value.float()
    return config, out


class Wan22StreamingDecoder(Wan21StreamingDecoder):
    """Wan 2.2 VAE decoder driven as a streaming causal decoder (see ``Wan21StreamingDecoder``).

    Args:
        checkpoint: Wan's ``Wan2.2_VAE.pth`` (or the same keys in ``.safetensors``), a
            diffusers-named file, or a diffusers ``AutoencoderKLWan`` folder (whose config then
            overrides the architecture arguments); local or ``hf://``. None = random weights.
        base_dim: channels of the decoder's last level (Wan 2.2: 256, ``decoder_base_dim``).
        z_dim: latent channels (48).
        dim_mult: channel multiplier per level; ``len - 1`` spatial 2x upsamplings.
        num_res_blocks: residual blocks per level minus one (2).
        temperal_downsample: per encoder level, whether it halves time (the decoder mirrors it).
        patch_size: pixel patch folded into channels around the convolutional VAE (2).
        seed: seed of the random weights when ``checkpoint`` is None.
        chunk_frames: latent frames per decoder call after the first; 0 = whole block.
        graph: ``follow`` (steady decoder calls under the run's graph policy) or ``eager``.
        channels_last: run the convolutions on NDHWC activations (same values).
    """

    def __init__(
        self, checkpoint: str | None = None, base_dim: int = 256, z_dim: int = 48,
        dim_mult: Sequence[int] = (1, 2, 4, 4), num_res_blocks: int = 2,
        temperal_downsample: Sequence[bool] = (False, True, True), patch_size: int = 2,
        seed: int = 0, chunk_frames: int = 0, graph: str = "follow", channels_last: bool = False,
    ) -> None:  # fmt: skip
        nn.Module.__init__(self)
        self._set_graph_mode(graph)
        arch = dict(base_dim=base_dim, z_dim=z_dim, dim_mult=list(dim_mult),
                    num_res_blocks=num_res_blocks, temperal_downsample=list(temperal_downsample),
                    patch_size=patch_size)  # fmt: skip
        mean, std, state, source = WAN22_LATENTS_MEAN, WAN22_LATENTS_STD, None, None
        if checkpoint is not None:
            source = str(checkpoint)
            config, state = read_wan22_vae(resolve_path(checkpoint), "decoder")
            arch.update({k: config[k] for k in arch if k in config and k != "base_dim"})
            arch["base_dim"] = config.get("decoder_base_dim") or config.get("base_dim", base_dim)
            mean, std = config.get("latents_mean", mean), config.get("latents_std", std)
        self.chunk_frames = int(chunk_frames)
        self._set_latent_stats(mean, std, int(arch["z_dim"]), "Wan 2.2: 48")
        self._build(state, source, seed, **arch)
        self._finish_build(channels_last)
        self.reset()

    def _build(self, state, source, seed, base_dim, z_dim, dim_mult, num_res_blocks,
               temperal_downsample, patch_size) -> None:  # fmt: skip
        """Create the modules: seeded random weights, or on meta and filled from ``state``."""
        up_time = [bool(v) for v in temperal_downsample][::-1]
        self.latent_channels = int(z_dim)
        self.spatial_factor = int(patch_size) * 2 ** (len(dim_mult) - 1)
        self.temporal_factor = 2 ** sum(up_time)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            with torch.device("meta" if state is not None else "cpu"):
                self.post_quant_conv = WanCausalConv3d(z_dim, z_dim, 1)
                self.decoder = Wan22Decoder3d(int(base_dim), int(z_dim), [int(m) for m in dim_mult],
                                              int(num_res_blocks), up_time, int(patch_size))  # fmt: skip
        if state is not None:
            check_state_dict(self, state, source)
            self.load_state_dict(state, assign=True)
        self._num_convs = sum(isinstance(m, WanCausalConv3d) for m in self.decoder.modules())
