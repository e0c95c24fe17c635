"""TAEHV encoder for Wan 2.1 latents (the ``encoder.*`` half of ``taew2_1``), streamed.

TAEHV's encoder (madebyollin/taehv) is a per-frame conv net of constant width 64 whose temporal
links are its MemBlocks (each also reads its own input one frame earlier) and its TPool layers
(``stride`` consecutive frames side by side in the channels, merged by a 1x1 conv). Layer order
(and so the checkpoint keys ``encoder.<index>.*``): conv, ReLU, then three levels of [TPool,
stride-2 conv, 3 MemBlocks] with TPool strides 2, 2, 1, then a conv to the latent channels.

Frames to latents: latent frame ``j`` reads video frames ``[4 j, 4 j + 4)``, a clip's last
frames padded by repeating its last frame (TAEHV's ``encode_video``, which NVIDIA's AV tokenizer
wrapper streams the same way). This differs from the Wan VAE's causal alignment (frame 0 alone,
then ``[4 j - 3, 4 j + 1)``): the encoder says so through ``lead_frames`` (video frames of latent
frame 0: 4 here, 1 for the Wan encoders), which ``HDMapControl`` reads.

The output is the DiT's normalized latent space as ``taew2_1`` gives it; ``raw_latents=True``
is for a file trained on Wan's raw latents (LightX2V's LightTAE): ``(z - mean) / std`` after.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from flashdreams import ConfigError
from flashdreams.io.checkpoint import as_dtype, check_state_dict, resolve_path
from flashdreams.vae.base import read_tensor_file, to_channels_last
from flashdreams.vae.taehv import MemBlock, _conv, register_wan21_stats

POOL_STRIDES = (2, 2, 1)  # TPool stride per level for Wan 2.1: 4 frames -> 1 latent frame


class TPool(nn.Module):
    """Merges each ``stride`` consecutive frames into one with a 1x1 conv over their channels."""

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(channels * stride, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N*T, C, H, W), frames of one clip consecutive -> (N*T/stride, C, H, W)."""
        return self.conv(x.reshape(-1, self.stride * x.shape[1], *x.shape[2:]))


def build_taehv_encoder(latent_channels: int, width: int,
                        strides: Sequence[int] = POOL_STRIDES) -> nn.Sequential:  # fmt: skip
    """The TAEHV encoder stack, indexed as the reference checkpoints expect."""
    layers: list[nn.Module] = [_conv(3, width), nn.ReLU()]
    for stride in strides:
        layers += [TPool(width, int(stride)),
                   nn.Conv2d(width, width, 3, stride=2, padding=1, bias=False)]  # fmt: skip
        layers += [MemBlock(width) for _ in range(3)]
    layers.append(_conv(width, latent_channels))
    return nn.Sequential(*layers)


class TAEHVEncoder(nn.Module):
    """Streaming TAEHV encoder: pixels in [-1, 1] -> normalized Wan 2.1 latents.

    The interface ``HDMapControl`` drives (shared with the Wan encoders): ``temporal_factor``,
    ``spatial_factor``, ``lead_frames``, ``input_dtype``, ``new_cache()`` and
    ``encode_step(x, cache)``.

    Args:
        checkpoint: ``taew2_1.pth`` / ``.safetensors`` (its ``encoder.*`` keys; the decoder's
            are ignored), local or ``hf://``; None = seeded random weights.
        latent_channels: latent channels (16 for Wan 2.1).
        width: the encoder's width (64 in every released TAEHV); smaller only for tests.
        seed: seed of the random weights.
        dtype: weight and compute dtype (bfloat16 on the GPU).
        channels_last: NHWC convolutions (same values).
        raw_latents: the file encodes Wan's raw latents (LightTAE): normalized after.
    """

    spatial_factor = 8
    temporal_factor = 4
    lead_frames = 4

    def __init__(self, checkpoint: str | None = None, latent_channels: int = 16, width: int = 64,
                 seed: int = 0, dtype: str = "float32", channels_last: bool = False,
                 raw_latents: bool = False) -> None:  # fmt: skip
        super().__init__()
        for key, value in (("channels_last", channels_last), ("raw_latents", raw_latents)):
            if not isinstance(value, bool):
                raise ConfigError(f"control.encoder.{key}={value!r} must be true or false")
        self.latent_channels = int(latent_channels)
        if checkpoint is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.encoder = build_taehv_encoder(self.latent_channels, int(width))
                for m in self.encoder.modules():  # variance-keeping: latents of unit scale
                    if isinstance(m, nn.Conv2d):
                        nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                        if m.bias is not None:
                            nn.init.zeros_(m.bias)
        else:
            with torch.device("meta"):
                self.encoder = build_taehv_encoder(self.latent_channels, int(width))
            state = read_tensor_file(resolve_path(checkpoint))
            state = {k: v.float() for k, v in state.items() if k.startswith("encoder.")}
            check_state_dict(self, state, str(checkpoint))
            self.load_state_dict(state, assign=True)
        self.to(as_dtype(dtype))
        self.channels_last = channels_last
        if channels_last:
            to_channels_last(self.encoder)
        self.raw_latents = raw_latents
        if raw_latents:
            register_wan21_stats(self, self.latent_channels, "control.encoder.raw_latents")
        self._memblocks = sum(isinstance(m, MemBlock) for m in self.encoder)

    @property
    def input_dtype(self) -> torch.dtype:
        return self.encoder[0].weight.dtype

    def new_cache(self) -> list:
        """The empty stream state: per MemBlock, its input one frame before the next step."""
        return [None] * self._memblocks

    def _run(self, x: torch.Tensor, cache: list) -> tuple[torch.Tensor, list]:
        """(N, T, 3, H, W) pixels in [0, 1] (T a multiple of 4) + per MemBlock the frame before
        -> (N, T / 4, C, h, w) latents as the file gives them and the new per-MemBlock frames."""
        n = x.shape[0]
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        h = x.flatten(0, 1).contiguous(memory_format=layout)
        lasts: list[torch.Tensor] = []
        for layer in self.encoder:
            if not isinstance(layer, MemBlock):
                h = layer(h).contiguous(memory_format=layout)
                continue
            frames = h.unflatten(0, (n, -1))  # (N, T', C, H, W)
            prev = cache[len(lasts)]
            prev = frames.new_zeros(frames[:, :1].shape) if prev is None else prev.unsqueeze(1)
            past = torch.cat([prev, frames[:, :-1]], dim=1).flatten(0, 1)
            lasts.append(frames[:, -1].clone(memory_format=torch.contiguous_format))
            h = layer(h, past.contiguous(memory_format=layout))
        return h.unflatten(0, (n, -1)), lasts

    def _normalized(self, z: torch.Tensor) -> torch.Tensor:
        """(N, T', C, h, w) -> (N, C, T', h, w) float32 latents in the DiT's space."""
        z = z.transpose(1, 2).float()
        if self.raw_latents:
            z = (z - self.latent_mean.float()) / self.latent_std.float()
        return z.contiguous()

    def encode_step(self, x: torch.Tensor, cache: list) -> tuple[torch.Tensor, list]:
        """One step of a streamed encode, as a function of tensors only.

        Args:
            x: (B, 3, T, H, W) pixels in [-1, 1], T a multiple of ``temporal_factor`` (latent
                frame j of the stream reads video frames [4 j, 4 j + 4)).
            cache: ``new_cache()`` first, then the previous step's; not modified.

        Returns:
            (B, C, T / 4, H / 8, W / 8) float32 normalized latents and the new cache.
        """
        if x.shape[2] % self.temporal_factor:
            raise ValueError(f"TAEHV encodes multiples of {self.temporal_factor} frames, got "
                             f"{x.shape[2]}")  # fmt: skip
        pixels = (x.transpose(1, 2).float() * 0.5 + 0.5).to(self.input_dtype)  # TAEHV: [0, 1]
        z, lasts = self._run(pixels, cache)
        return self._normalized(z), lasts

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """A whole clip in one parallel pass (the reference of the streamed path).

        Args:
            video: (B, 3, T, H, W) frames in [-1, 1]; the end is padded with the last frame
                to a multiple of 4 frames.

        Returns:
            (B, C, ceil(T / 4), H / 8, W / 8) float32 normalized latents.
        """
        pad = -video.shape[2] % self.temporal_factor
        if pad:
            video = torch.cat([video, video[:, :, -1:].expand(-1, -1, pad, -1, -1)], dim=2)
        return self.encode_step(video, self.new_cache())[0]
