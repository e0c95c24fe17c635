"""Wan 2.1 causal VAE decoder, streamed block by block with its causal-conv cache kept alive.

The network is diffusers' ``WanDecoder3d`` (plus ``post_quant_conv``); only the driving differs.
Diffusers' ``AutoencoderKLWan.decode`` clears the per-conv feature cache on every call; here the
cache lives across ``decode_step`` calls, so decoding a clip block by block gives the frames of one
full-clip decode.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import (
    WanCausalConv3d,
    WanDecoder3d,
    WanResample,
)

from flashdreams import ConfigError
from flashdreams.graph.base import GraphPolicy
from flashdreams.io.checkpoint import CheckpointError, check_state_dict, resolve_path
from flashdreams.vae.base import (
    StreamingDecoder,
    conv_input,
    read_tensor_file,
    to_channels_last,
)

GRAPH_MODES = ("follow", "eager")  # vae.graph: the run's graph policy, or always eager

# Per-channel statistics of Wan 2.1 latents; the DiT works on (z - mean) / std.
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip

# Wan's residual-block layer names -> diffusers' names.
_RESNET_RENAMES = {
    "residual.0.": "norm1.",
    "residual.2.": "conv1.",
    "residual.3.": "norm2.",
    "residual.6.": "conv2.",
    "shortcut.": "conv_shortcut.",
}
_ARCH_KEYS = ("base_dim", "z_dim", "dim_mult", "num_res_blocks", "temperal_downsample")


def _rename_resnet(rest: str) -> str:
    for old, new in _RESNET_RENAMES.items():
        if rest.startswith(old):
            return new + rest[len(old) :]
    return rest


def wan_key_to_diffusers(key: str, num_res_blocks: int) -> str | None:
    """Map one key of Wan's original ``Wan2.1_VAE.pth`` to diffusers' ``AutoencoderKLWan`` name.

    Args:
        key: a key of the original checkpoint, e.g. ``decoder.upsamples.4.residual.2.weight``.
        num_res_blocks: residual blocks per decoder level minus one (Wan 2.1: 2).

    Returns:
        The diffusers name (``decoder.up_blocks.1.resnets.0.conv1.weight``), None for
        encoder-side keys (``encoder.*``, ``conv1.*``), or the key unchanged if it is unknown.
    """
    if key.startswith(("encoder.", "conv1.")):
        return None
    if key.startswith("conv2."):
        return "post_quant_conv." + key[len("conv2.") :]
    if key.startswith("decoder.conv1."):
        return "decoder.conv_in." + key[len("decoder.conv1.") :]
    if m := re.fullmatch(r"decoder\.middle\.(\d+)\.(.+)", key):
        idx, rest = int(m[1]), m[2]
        if idx == 1:
            return f"decoder.mid_block.attentions.0.{rest}"
        return f"decoder.mid_block.resnets.{idx // 2}.{_rename_resnet(rest)}"
    if m := re.fullmatch(r"decoder\.upsamples\.(\d+)\.(.+)", key):
        # Wan lists each level flat: num_res_blocks + 1 resnets, then one resampler.
        level, j = divmod(int(m[1]), num_res_blocks + 2)
        if j <= num_res_blocks:
            return f"decoder.up_blocks.{level}.resnets.{j}.{_rename_resnet(m[2])}"
        return f"decoder.up_blocks.{level}.upsamplers.0.{m[2]}"
    if m := re.fullmatch(r"decoder\.head\.([02])\.(.+)", key):
        return f"decoder.{'norm_out' if m[1] == '0' else 'conv_out'}.{m[2]}"
    return key


def _decoder_side(state: dict[str, torch.Tensor], num_res_blocks: int) -> dict[str, torch.Tensor]:
    """Keep the decoder-side tensors of a Wan-format or diffusers-format VAE, diffusers names."""
    wan_format = any(k.startswith(("decoder.conv1.", "decoder.middle.")) for k in state)
    out = {}
    for key, value in state.items():
        if wan_format:
            key = wan_key_to_diffusers(key, num_res_blocks)
        elif key.startswith(("encoder.", "quant_conv.")):
            key = None
        if key is not None:
            out[key] = value.float()
    return out


def _read_diffusers_folder(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Config and tensors of a diffusers ``AutoencoderKLWan`` folder (``config.json`` + weights)."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"checkpoint {str(folder)!r} is a folder without config.json")
    config = json.loads(config_path.read_text())
    if config.get("_class_name", "AutoencoderKLWan") != "AutoencoderKLWan":
        raise CheckpointError(f"checkpoint {str(config_path)!r} is a {config['_class_name']}")
    if config.get("is_residual") or config.get("patch_size"):
        raise CheckpointError(f"checkpoint {str(folder)!r} is a Wan 2.2 VAE, not Wan 2.1")
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not files:
        raise CheckpointError(f"checkpoint {str(folder)!r} has no *.safetensors or *.bin")
    state = {}
    for file in files:
        state.update(read_tensor_file(file))
    return config, state


class TraceableResample(WanResample):
    """diffusers' ``WanResample`` whose temporal upsampling, once its cache holds frames, runs
    without comparing the cached tensor to the ``"Rep"`` marker string (``tensor == "Rep"``,
    which ``torch.compile`` cannot trace). The first call of a clip (no cache, or the marker)
    takes diffusers' own code; the same weights, the same values."""

    def forward(self, x, feat_cache=None, feat_idx=(0,)) -> torch.Tensor:
        if self.mode != "upsample3d" or feat_cache is None:
            return super().forward(x, feat_cache, feat_idx)
        idx = feat_idx[0]
        prev = feat_cache[idx]
        if prev is None or isinstance(prev, str):
            return super().forward(x, feat_cache, feat_idx)
        b, c, t, h, w = x.shape
        cache_x = x[:, :, -2:].clone()  # the two frames the next call's time conv reads
        if cache_x.shape[2] < 2:
            cache_x = torch.cat([prev[:, :, -1:].to(cache_x.device), cache_x], dim=2)
        y = self.time_conv(x, prev).reshape(b, 2, c, t, h, w)
        feat_cache[idx] = cache_x
        feat_idx[0] += 1
        y = torch.stack((y[:, 0], y[:, 1]), 3).reshape(b, c, 2 * t, h, w)  # frames interleaved
        y = self.resample(y.permute(0, 2, 1, 3, 4).reshape(b * 2 * t, c, h, w))
        return y.view(b, 2 * t, *y.shape[1:]).permute(0, 2, 1, 3, 4)


def traceable_resamples(module: torch.nn.Module) -> None:
    """Make every ``WanResample`` under ``module`` a :class:`TraceableResample` (in place)."""
    for m in module.modules():
        if type(m) is WanResample:
            m.__class__ = TraceableResample


class Wan21StreamingDecoder(StreamingDecoder):
    """Full Wan 2.1 VAE decoder (diffusers' modules) driven as a streaming causal decoder.

    The first latent frame of a clip is decoded alone (it yields one video frame); after that the
    latent frames of each block go through the decoder ``chunk_frames`` at a time, every causal
    conv reading the last two frames it saw from its cache. Input latents are the DiT's
    normalized ones; they are mapped back with Wan 2.1's per-channel statistics
    (``z = x * std + mean``, in fp32) before ``post_quant_conv``.

    Each decoder call is :meth:`decode_chunk`, a function of tensors (latents and the per-conv
    cache in, frames and the new cache out). From the third call of a clip on, every cache
    entry holds two frames, so the shapes repeat: those calls run under the decoder's graph
    policy (``set_graph``; ``graph=follow``): compiled under ``compile`` policies and captured
    per chunk shape under capturing ones (the cache, a graph's static output, is fed back as
    its next input). The first two calls (frame 0 alone, then a cache still filling) run eager.

    Args:
        checkpoint: Wan's original ``Wan2.1_VAE.pth`` (or the same keys in ``.safetensors``), a
            diffusers-named file, or a diffusers folder (``config.json`` + safetensors, whose
            config then overrides the architecture arguments); None = random weights.
        base_dim: channels of the first level (Wan 2.1: 96).
        z_dim: latent channels (16).
        dim_mult: channel multiplier per level; ``len - 1`` spatial 2x upsamplings.
        num_res_blocks: residual blocks per level minus one (2).
        temperal_downsample: per encoder level, whether it halves time (the decoder mirrors it).
        seed: seed of the random weights when ``checkpoint`` is None.
        chunk_frames: latent frames per decoder call after the first frame; 0 = whole block.
            Each chunk shape is its own capture (one per shape, in one pool per decoder).
        graph: ``follow`` (the run's graph policy) or ``eager`` (never compiled or captured).
        channels_last: run the convolutions on NDHWC activations (cuDNN's native bf16 layout);
            same values, a different speed.
    """

    def __init__(
        self,
        checkpoint: str | None = None,
        base_dim: int = 96,
        z_dim: int = 16,
        dim_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        temperal_downsample: Sequence[bool] = (False, True, True),
        seed: int = 0,
        chunk_frames: int = 0,
        graph: str = "follow",
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self._set_graph_mode(graph)
        arch = dict(
            base_dim=base_dim,
            z_dim=z_dim,
            dim_mult=dim_mult,
            num_res_blocks=num_res_blocks,
            temperal_downsample=temperal_downsample,
        )
        mean, std, state, source = WAN21_LATENTS_MEAN, WAN21_LATENTS_STD, None, None
        if checkpoint is not None:
            path = resolve_path(checkpoint)
            source = str(path)
            if path.is_dir():
                config, state = _read_diffusers_folder(path)
                arch.update({k: config[k] for k in _ARCH_KEYS if k in config})
                arch["base_dim"] = config.get("decoder_base_dim") or arch["base_dim"]
                mean, std = config.get("latents_mean", mean), config.get("latents_std", std)
            else:
                state = read_tensor_file(path)
            state = _decoder_side(state, int(arch["num_res_blocks"]))
        self.chunk_frames = int(chunk_frames)
        self._set_latent_stats(mean, std, int(arch["z_dim"]), "Wan 2.1: 16")
        self._build(state, source, seed, **arch)
        self._finish_build(channels_last)
        self.reset()

    def _finish_build(self, channels_last: bool) -> None:
        """After the modules exist: traceable resamples (steady calls compile under
        ``graph=follow``) and, with ``channels_last``, NDHWC convolution weights."""
        traceable_resamples(self)
        self.channels_last = bool(channels_last)
        if self.channels_last:
            to_channels_last(self)

    def _set_graph_mode(self, graph: str) -> None:
        if graph not in GRAPH_MODES:
            raise ConfigError(f"vae.graph={graph!r} must be one of {', '.join(GRAPH_MODES)}")
        self.graph = graph

    def set_graph(self, policy: GraphPolicy) -> None:
        """Run the steady decode calls under ``policy`` (ignored with ``graph=eager``)."""
        if self.graph != "eager":
            super().set_graph(policy)

    def _set_latent_stats(self, mean, std, z_dim: int, expected: str) -> None:
        """Per-channel latent mean/std of the DiT's latent space (checked against ``z_dim``)."""
        self._latents_mean = tuple(float(v) for v in mean)
        self._latents_std = tuple(float(v) for v in std)
        if not len(self._latents_mean) == len(self._latents_std) == z_dim:
            raise ConfigError(f"vae.z_dim={z_dim}: the latent mean/std have "
                              f"{len(self._latents_mean)} channels ({expected})")  # fmt: skip
        self._stats: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def _build(
        self,
        state: dict[str, torch.Tensor] | None,
        source: str | None,
        seed: int,
        base_dim: int,
        z_dim: int,
        dim_mult: Sequence[int],
        num_res_blocks: int,
        temperal_downsample: Sequence[bool],
    ) -> None:
        """Create the modules: seeded random weights, or on meta and filled from ``state``."""
        dim_mult = [int(v) for v in dim_mult]
        temperal_upsample = [bool(v) for v in temperal_downsample][::-1]
        self.latent_channels = int(z_dim)
        self.spatial_factor = 2 ** (len(dim_mult) - 1)
        self.temporal_factor = 2 ** sum(temperal_upsample)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            with torch.device("meta" if state is not None else "cpu"):
                self.post_quant_conv = WanCausalConv3d(z_dim, z_dim, 1)
                self.decoder = WanDecoder3d(
                    dim=int(base_dim),
                    z_dim=int(z_dim),
                    dim_mult=dim_mult,
                    num_res_blocks=int(num_res_blocks),
                    temperal_upsample=temperal_upsample,
                )
        if state is not None:
            check_state_dict(self, state, source)
            self.load_state_dict(state, assign=True)
        self._num_convs = sum(isinstance(m, WanCausalConv3d) for m in self.decoder.modules())

    _warmed: set = frozenset()  # plans ``warm_up`` ran (a set of this decoder's once it ran)

    def reset(self) -> None:
        """Drop the causal-conv cache; the next ``decode_step`` starts a new clip."""
        self._feat_cache: list | None = None
        self._calls = 0  # decoder calls of this clip

    def _unnormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """DiT latent space -> VAE latent space: ``z = x * std + mean`` in fp32."""
        if latents.device not in self._stats:
            kw = dict(device=latents.device, dtype=torch.float32)
            self._stats[latents.device] = tuple(
                torch.tensor(v, **kw).view(1, -1, 1, 1, 1)
                for v in (self._latents_mean, self._latents_std)
            )
        mean, std = self._stats[latents.device]
        dtype = self.post_quant_conv.weight.dtype
        return torch.addcmul(mean, latents.float(), std).to(dtype)  # (B, C, T, h, w)

    def decode_chunk(self, latents: torch.Tensor, cache: list,
                     first: bool = False) -> tuple[torch.Tensor, list]:  # fmt: skip
        """One causal decoder call, as a function of tensors.

        Args:
            latents: (B, C, t, h, w) normalized (DiT-space) latents: a clip's first frame alone
                (``first=True``), then any number of frames (one call for t frames equals t
                calls of one: every causal conv reads the same past through the cache).
            cache: the per-conv cache of the previous call (``[None] * _num_convs`` first);
                not modified.
            first: the clip's first call (its first latent frame yields one video frame).

        Returns:
            (B, T_out, 3, H, W) frames in [0, 1] (T_out = 1 first, else ``temporal_factor`` t)
            and the new cache: from the third call of a clip on every entry is a two-frame
            tensor, so the call's shapes repeat and it can be compiled and captured.
        """
        cache = list(cache)
        x = self.post_quant_conv(conv_input(self._unnormalize(latents), self.channels_last))
        video = self.decoder(x, feat_cache=cache, feat_idx=[0], first_chunk=first)
        video = video.clamp(-1.0, 1.0).add(1.0).mul(0.5)  # (B, 3, T_out, H, W)
        return video.permute(0, 2, 1, 3, 4), cache

    @torch.no_grad()
    def warm_up(self, frames, batch, latent_hw, device, dtype) -> None:
        """Under ``graph=follow`` with a compiling or capturing policy: decode zeros of the
        blocks of ``frames`` (the schedule's first blocks) so that the steady calls' compile
        and capture happen here, then ``reset``."""
        if self.graph == "eager" or not (self._graph.captures or self._graph.compiles):
            return
        plan = (tuple(frames), batch, tuple(latent_hw), str(device), dtype, id(self._graph))
        if plan in self._warmed:  # a later session start: its graphs exist already
            return
        self._warmed = {*self._warmed, plan}
        self.reset()
        for n in frames:
            self.decode_step(torch.zeros(batch, self.latent_channels, n, *latent_hw,
                                         device=device, dtype=dtype))  # fmt: skip
            if self._calls > 2:  # a steady call ran: its graph exists
                break
        self.reset()

    @torch.no_grad()
    def decode_step(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode the next latent frames, continuing the clip's causal state.

        Args:
            latents: (B, C, T, h, w) normalized (DiT-space) Wan latents.

        Returns:
            (B, T_out, 3, H, W) frames in [0, 1]; T_out = 1 + 4 (T - 1) on the first call of a
            clip, 4 T after.
        """
        outs = []
        if self._feat_cache is None:
            frames, self._feat_cache = self.decode_chunk(
                latents[:, :, :1], [None] * self._num_convs, first=True
            )
            outs.append(frames)
            latents, self._calls = latents[:, :, 1:], 1
        if latents.shape[2] > 0:
            step = self.chunk_frames if self.chunk_frames > 0 else latents.shape[2]
            for part in latents.split(step, dim=2):
                steady = tuple(part.shape) if self._calls >= 2 else None  # the capture key
                frames, self._feat_cache = self.run_graph(
                    "wan_vae_decode", self.decode_chunk, part, self._feat_cache, shape_key=steady
                )
                outs.append(frames)
                self._calls += 1
        # own copy (a captured call rewrites its output), in the default layout
        return torch.cat(outs, dim=1).contiguous()
