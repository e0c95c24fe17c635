"""Wan 2.1 VAE encoder (diffusers' modules) for image conditioning: pixels -> DiT latents.

Only the encoder half of ``AutoencoderKLWan`` is built (``encoder`` + ``quant_conv``); it runs
the same causal chunking as ``AutoencoderKLWan._encode`` (first frame alone, then chunks of
``temporal_factor`` frames through a per-conv cache) and returns the posterior mode, normalized
to the DiT's latent space ``(z - mean) / std``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanEncoder3d
from safetensors.torch import load_file
from torch import nn

from flashdreams import ConfigError
from flashdreams.io.checkpoint import (
    CheckpointError,
    as_dtype,
    check_state_dict,
    load_torch_file,
    resolve_path,
)
from flashdreams.vae.base import conv_input, to_channels_last
from flashdreams.vae.wan21 import WAN21_LATENTS_MEAN, WAN21_LATENTS_STD

_ARCH_KEYS = ("base_dim", "z_dim", "dim_mult", "num_res_blocks", "temperal_downsample")
_RESNET = {"residual.0.": "norm1.", "residual.2.": "conv1.", "residual.3.": "norm2.",
           "residual.6.": "conv2.", "shortcut.": "conv_shortcut."}  # fmt: skip


def wan_encoder_key_to_diffusers(key: str) -> str | None:
    """Map an encoder-side key of Wan's ``Wan2.1_VAE.pth`` to diffusers' ``AutoencoderKLWan`` name.

    Returns:
        The diffusers name (``encoder.down_blocks.3.norm1.gamma``), or None for decoder-side
        keys (``decoder.*``, ``conv2.*``). Unknown keys come back unchanged.
    """
    if key.startswith(("decoder.", "conv2.")):
        return None
    if key.startswith("conv1."):
        return "quant_conv." + key[len("conv1.") :]
    if key.startswith("encoder.conv1."):
        return "encoder.conv_in." + key[len("encoder.conv1.") :]
    if m := re.fullmatch(r"encoder\.(downsamples|middle)\.(\d+)\.(.+)", key):
        part, idx, rest = m[1], int(m[2]), m[3]
        for old, new in _RESNET.items():
            if rest.startswith(old):
                rest = new + rest[len(old) :]
                break
        if part == "downsamples":  # flat in both layouts (Wan 2.1, non-residual)
            return f"encoder.down_blocks.{idx}.{rest}"
        if idx == 1:
            return f"encoder.mid_block.attentions.0.{rest}"
        return f"encoder.mid_block.resnets.{idx // 2}.{rest}"
    if m := re.fullmatch(r"encoder\.head\.([02])\.(.+)", key):
        return f"encoder.{'norm_out' if m[1] == '0' else 'conv_out'}.{m[2]}"
    return key


def _read(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, encoder-side tensors under diffusers names) of a VAE file or diffusers folder."""
    config: dict = {}
    if path.is_dir():
        if (path / "config.json").is_file():
            config = json.loads((path / "config.json").read_text())
        files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
        if not files:
            raise CheckpointError(f"checkpoint {str(path)!r} has no *.safetensors or *.bin")
    else:
        files = [path]
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(
            load_file(str(file)) if file.suffix == ".safetensors" else load_torch_file(file)
        )
    wan_format = any(k.startswith(("encoder.conv1.", "encoder.downsamples.")) for k in state)
    out = {}
    for key, value in state.items():
        if wan_format:
            key = wan_encoder_key_to_diffusers(key)
        elif not key.startswith(("encoder.", "quant_conv.")):
            key = None
        if key is not None:
            out[key] = value.float()
    return config, out


class CausalChunkEncoder(nn.Module):
    """What the Wan 2.1 and 2.2 VAE encoders share: latent stats, loading, causal chunking.

    Subclasses build ``self.encoder`` (diffusers-style ``forward(x, feat_cache, feat_idx)``) and
    ``self.quant_conv`` under :meth:`_build`, then call :meth:`_load`; :meth:`_encode_chunks`
    runs the first frame alone, then chunks of ``temporal_factor`` frames through one per-conv
    cache (as ``AutoencoderKLWan._encode``), and returns normalized posterior means.
    """

    lead_frames = 1  # video frames of latent frame 0 (then temporal_factor per latent frame)

    @property
    def input_dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    def new_cache(self) -> list:
        """The empty per-conv cache of a new stream (``encode_step``'s first ``cache``)."""
        return [None] * self._num_convs

    def _set_stats(self, mean, std, temperal_downsample) -> None:
        self.temporal_factor = 2 ** sum(bool(v) for v in temperal_downsample)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1, 1), persistent=False)

    def _load(
        self, state: dict | None, checkpoint, dtype: str, channels_last: bool = False
    ) -> None:
        """Assign checkpoint tensors (the modules were built on meta), cast to ``dtype`` and,
        with ``channels_last``, put the convolution weights in NDHWC order."""
        if state is not None:
            check_state_dict(self, state, str(checkpoint))
            self.load_state_dict(state, assign=True)
        self.to(as_dtype(dtype))
        self.channels_last = bool(channels_last)
        if self.channels_last:
            to_channels_last(self)
        self._num_convs = sum(isinstance(m, WanCausalConv3d) for m in self.encoder.modules())

    def _normalized(self, moments: torch.Tensor) -> torch.Tensor:
        """Encoder moments -> the posterior mode in the DiT's latent space (float32, default
        layout)."""
        mu = moments.float()[:, : self.mean.shape[1]]
        return ((mu - self.mean.float()) / self.std.float()).contiguous()

    def encode_step(self, x: torch.Tensor, cache: list) -> tuple[torch.Tensor, list]:
        """One causal step of a streamed encode, as a function of tensors only.

        Args:
            x: (B, C, T, H, W) encoder input: the clip's first frame alone (T = 1), then any
                multiple of ``temporal_factor`` frames (one call for a block's 8 frames equals
                two 4-frame chunks: every causal conv and temporal downsampling reads the same
                past through the cache).
            cache: the per-conv cache of the previous step (``new_cache()`` first); not
                modified.

        Returns:
            (B, z_dim, T', h, w) float32 normalized latents and the new cache. Once every
            entry holds a tensor the shapes repeat, so the step can be compiled and captured.
        """
        cache = list(cache)
        x = conv_input(x, self.channels_last)
        moments = self.quant_conv(self.encoder(x, feat_cache=cache, feat_idx=[0]))
        return self._normalized(moments), cache

    def _encode_chunks(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) encoder input -> (B, z_dim, T', h, w) float32 normalized latents."""
        cache, tf = [None] * self._num_convs, self.temporal_factor
        x = conv_input(x, self.channels_last)
        chunks = [x[:, :, :1]] + list(x[:, :, 1:].split(tf, dim=2))
        outs = [self.encoder(c, feat_cache=cache, feat_idx=[0]) for c in chunks if c.shape[2]]
        return self._normalized(self.quant_conv(torch.cat(outs, dim=2)))


class Wan21Encoder(CausalChunkEncoder):
    """Encoder half of the Wan 2.1 VAE, returning normalized posterior means.

    Args:
        checkpoint: Wan's ``Wan2.1_VAE.pth`` (or the same keys in ``.safetensors``), a diffusers
            ``AutoencoderKLWan`` folder (its ``config.json`` overrides the architecture) or a
            diffusers-named file; local or ``hf://``. None = seeded random weights.
        base_dim: channels of the first level (Wan 2.1: 96).
        z_dim: latent channels (16).
        dim_mult: channel multiplier per level; ``len - 1`` spatial 2x downsamplings (8x).
        num_res_blocks: residual blocks per level (2).
        temperal_downsample: per level, whether it halves time (4x overall).
        seed: seed of the random weights.
        dtype: weight and compute dtype (float32 is the reference; the encoder runs once per clip).
        channels_last: run the convolutions on NDHWC activations (same values).
    """

    def __init__(
        self, checkpoint: str | None = None, base_dim: int = 96, z_dim: int = 16,
        dim_mult: Sequence[int] = (1, 2, 4, 4), num_res_blocks: int = 2,
        temperal_downsample: Sequence[bool] = (False, True, True), seed: int = 0,
        dtype: str = "float32", channels_last: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        arch = dict(base_dim=base_dim, z_dim=z_dim, dim_mult=list(dim_mult),
                    num_res_blocks=num_res_blocks, temperal_downsample=list(temperal_downsample))  # fmt: skip
        config, state = ({}, None) if checkpoint is None else _read(resolve_path(checkpoint))
        arch.update({k: config[k] for k in _ARCH_KEYS if k in config})
        if config.get("is_residual") or config.get("patch_size"):
            raise CheckpointError(f"checkpoint {checkpoint!r} is a Wan 2.2 VAE, not Wan 2.1")
        mean = config.get("latents_mean", WAN21_LATENTS_MEAN)
        std = config.get("latents_std", WAN21_LATENTS_STD)
        if not len(mean) == len(std) == int(arch["z_dim"]):
            raise ConfigError(f"vae encoder z_dim={arch['z_dim']} does not match its latent stats")
        z = int(arch["z_dim"])
        self.spatial_factor = 2 ** (len(arch["dim_mult"]) - 1)
        self._set_stats(mean, std, arch["temperal_downsample"])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            with torch.device("meta" if state is not None else "cpu"):
                self.encoder = WanEncoder3d(
                    dim=int(arch["base_dim"]), z_dim=2 * z, dim_mult=arch["dim_mult"],
                    num_res_blocks=int(arch["num_res_blocks"]),
                    temperal_downsample=[bool(v) for v in arch["temperal_downsample"]],
                )  # fmt: skip
                self.quant_conv = WanCausalConv3d(2 * z, 2 * z, 1)
        self._load(state, checkpoint, dtype, channels_last)

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Encode pixels to normalized latents.

        Args:
            video: (B, 3, T, H, W) frames in [-1, 1]; T = 1 + temporal_factor * k.

        Returns:
            (B, z_dim, 1 + k, H / 8, W / 8) float32 latents in the DiT's space.
        """
        return self._encode_chunks(video.to(self.quant_conv.weight.dtype))
