"""Wan 2.2 VAE encoder for image conditioning (TI2V): pixels -> normalized 48-channel latents.

The encoder mirrors ``Wan22Decoder3d``: 2x2 patchify, then residual down levels whose
parameter-free shortcut averages (time, height, width) blocks into channels. It runs the same
causal chunking as diffusers' ``AutoencoderKLWan._encode`` (first frame alone, then chunks of
``temporal_factor`` frames through a per-conv cache) and returns the posterior mode, normalized
to the DiT's latent space ``(z - mean) / std``.
"""

from __future__ import annotations

from collections.abc import Sequence

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

from flashdreams import ConfigError
from flashdreams.io.checkpoint import resolve_path
from flashdreams.vae.wan21_encode import CausalChunkEncoder
from flashdreams.vae.wan22 import (
    WAN22_LATENTS_MEAN,
    WAN22_LATENTS_STD,
    cached_conv,
    gather_channels,
    patchify,
    read_wan22_vae,
)


class ResidualDownLevel(nn.Module):
    """One encoder level: residual blocks + downsampler, plus the space-to-channel shortcut."""

    def __init__(self, in_dim: int, out_dim: int, num_blocks: int, down: bool, down_time: bool):
        super().__init__()
        dims = [in_dim] + [out_dim] * num_blocks
        self.resnets = nn.ModuleList(
            WanResidualBlock(i, o) for i, o in zip(dims[:-1], dims[1:], strict=True)
        )
        mode = "downsample3d" if down_time else "downsample2d"
        self.downsampler = WanResample(out_dim, mode) if down else None
        self.out_dim = out_dim
        self.factor_t, self.factor_s = (2 if down_time else 1), (2 if down else 1)

    def forward(self, x, feat_cache=None, feat_idx=(0,)):
        shortcut = gather_channels(x, self.out_dim, self.factor_t, self.factor_s)
        for resnet in self.resnets:
            x = resnet(x, feat_cache=feat_cache, feat_idx=feat_idx)
        if self.downsampler is not None:
            x = self.downsampler(x, feat_cache=feat_cache, feat_idx=feat_idx)
        return x + shortcut


class Wan22Encoder3d(nn.Module):
    """Wan 2.2 residual encoder (diffusers' module names): conv_in, down levels, mid, head."""

    def __init__(self, dim, z_dim, dim_mult, num_res_blocks, temperal_downsample, patch_size):
        super().__init__()
        dims = [dim * m for m in [1, *dim_mult]]
        last = len(dim_mult) - 1
        self.conv_in = WanCausalConv3d(3 * patch_size**2, dims[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            ResidualDownLevel(dims[i], dims[i + 1], num_res_blocks, i != last,
                              i != last and temperal_downsample[i])
            for i in range(len(dim_mult))
        )  # fmt: skip
        self.mid_block = WanMidBlock(dims[-1], num_layers=1)
        self.norm_out = WanRMS_norm(dims[-1], images=False)
        self.conv_out = WanCausalConv3d(dims[-1], z_dim, 3, padding=1)

    def forward(self, x, feat_cache=None, feat_idx=(0,)) -> torch.Tensor:
        # x: (B, 3 p p, T, H / p, W / p) patchified pixels -> (B, z_dim, T', h, w) moments
        idx = feat_idx if isinstance(feat_idx, list) else list(feat_idx)
        x = cached_conv(self.conv_in, x, feat_cache, idx)
        for level in self.down_blocks:
            x = level(x, feat_cache=feat_cache, feat_idx=idx)
        x = self.mid_block(x, feat_cache=feat_cache, feat_idx=idx)
        return cached_conv(self.conv_out, F.silu(self.norm_out(x)), feat_cache, idx)


class Wan22Encoder(CausalChunkEncoder):
    """Encoder half of the Wan 2.2 VAE, returning normalized posterior means.

    Args:
        checkpoint: Wan's ``Wan2.2_VAE.pth`` (or the same keys in ``.safetensors``), a diffusers
            ``AutoencoderKLWan`` folder (its ``config.json`` overrides the architecture) or a
            diffusers-named file; local or ``hf://``. None = seeded random weights.
        base_dim: channels of the first encoder level (Wan 2.2: 160).
        z_dim: latent channels (48).
        dim_mult: channel multiplier per level; ``len - 1`` spatial 2x downsamplings.
        num_res_blocks: residual blocks per level (2).
        temperal_downsample: per level, whether it halves time (4x overall).
        patch_size: pixel patch folded into channels before the convolutions (2).
        seed: seed of the random weights.
        dtype: weight and compute dtype (float32 is the reference; runs once per clip).
        channels_last: run the convolutions on NDHWC activations (same values).
    """

    def __init__(
        self, checkpoint: str | None = None, base_dim: int = 160, z_dim: int = 48,
        dim_mult: Sequence[int] = (1, 2, 4, 4), num_res_blocks: int = 2,
        temperal_downsample: Sequence[bool] = (False, True, True), patch_size: int = 2,
        seed: int = 0, dtype: str = "float32", channels_last: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        arch = dict(base_dim=base_dim, z_dim=z_dim, dim_mult=list(dim_mult),
                    num_res_blocks=num_res_blocks, temperal_downsample=list(temperal_downsample),
                    patch_size=patch_size)  # fmt: skip
        config, state = {}, None
        if checkpoint is not None:
            config, state = read_wan22_vae(resolve_path(checkpoint), "encoder")
        arch.update({k: config[k] for k in arch if k in config})
        mean = config.get("latents_mean", WAN22_LATENTS_MEAN)
        std = config.get("latents_std", WAN22_LATENTS_STD)
        z = int(arch["z_dim"])
        if not len(mean) == len(std) == z:
            raise ConfigError(
                f"vae encoder z_dim={z} does not match its latent stats (Wan 2.2: 48)"
            )
        self.patch_size = int(arch["patch_size"])
        self.spatial_factor = self.patch_size * 2 ** (len(arch["dim_mult"]) - 1)
        self._set_stats(mean, std, arch["temperal_downsample"])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            with torch.device("meta" if state is not None else "cpu"):
                self.encoder = Wan22Encoder3d(
                    int(arch["base_dim"]), 2 * z, [int(m) for m in arch["dim_mult"]],
                    int(arch["num_res_blocks"]), [bool(v) for v in arch["temperal_downsample"]],
                    self.patch_size,
                )  # fmt: skip
                self.quant_conv = WanCausalConv3d(2 * z, 2 * z, 1)
        self._load(state, checkpoint, dtype, channels_last)

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Encode pixels to normalized latents.

        Args:
            video: (B, 3, T, H, W) frames in [-1, 1]; T = 1 + temporal_factor * k; H and W
                multiples of ``spatial_factor``.

        Returns:
            (B, z_dim, 1 + k, H / 16, W / 16) float32 latents in the DiT's space.
        """
        return self._encode_chunks(
            patchify(video.to(self.quant_conv.weight.dtype), self.patch_size)
        )
