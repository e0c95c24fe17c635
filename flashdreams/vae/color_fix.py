"""Colour correction of decoded frames against reference frames (FlashVSR's ``color_fix``).

A super-resolution decoder's colours drift from the input's; the FlashVSR release corrects
every output frame against its low-resolution frame (upscaled to the output size), per frame
and channel, in [-1, 1], then clamps to [-1, 1]:

- ``adain``: the frame's per-channel mean and standard deviation (over H x W, population
  variance + 1e-5) replaced by the reference's (the release's default);
- ``wavelet``: the frame's high frequencies plus the reference's low frequencies, split by 5
  levels of a 3 x 3 binomial blur dilated 1, 2, 4, 8, 16 (replicate padding).

``ColorFixedDecoder`` applies it to any decoder's output; the reference is a named decoder input
(``lr_frames``: per latent frame the 4 video frames its decode yields, see ``vae/base.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flashdreams import ConfigError
from flashdreams.vae.base import StreamingDecoder

METHODS = ("none", "adain", "wavelet")
_BLUR = ((1, 2, 1), (2, 4, 2), (1, 2, 1))  # / 16: the 3 x 3 binomial kernel


def adain(content: torch.Tensor, style: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """(N, C, H, W) ``content`` with the per-(N, C) mean and std of ``style``."""

    def stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = x.flatten(2)
        std = (flat.var(-1, unbiased=False) + eps).sqrt()
        return flat.mean(-1)[..., None, None], std[..., None, None]

    c_mean, c_std = stats(content)
    s_mean, s_std = stats(style)
    return (content - c_mean) / c_std * s_std + s_mean


def wavelet_blur(x: torch.Tensor, radius: int) -> torch.Tensor:
    """(N, C, H, W) blurred by the 3 x 3 binomial kernel dilated ``radius`` (replicate pad)."""
    kernel = torch.tensor(_BLUR, dtype=x.dtype, device=x.device) / 16
    weight = kernel.expand(x.shape[1], 1, 3, 3)
    padded = F.pad(x, (radius,) * 4, mode="replicate")
    return F.conv2d(padded, weight, dilation=radius, groups=x.shape[1])


def wavelet_split(x: torch.Tensor, levels: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) frequencies of (N, C, H, W) ``x``: ``levels`` blurs of radius 1, 2, 4, ..."""
    low, high = x, torch.zeros_like(x)
    for level in range(levels):
        blurred = wavelet_blur(low, 2**level)
        high, low = high + (low - blurred), blurred
    return high, low


def wavelet(content: torch.Tensor, style: torch.Tensor, levels: int = 5) -> torch.Tensor:
    """``content``'s high frequencies + ``style``'s low frequencies (N, C, H, W)."""
    return wavelet_split(content, levels)[0] + wavelet_split(style, levels)[1]


def color_fix(frames: torch.Tensor, reference: torch.Tensor, method: str) -> torch.Tensor:
    """Correct (B, T, 3, H, W) ``frames`` in [0, 1] against ``reference`` (B, T, 3, H, W) in
    [-1, 1], frame by frame; returns frames in [0, 1] (computed in float32)."""
    if method == "none":
        return frames
    x = frames.float().flatten(0, 1) * 2 - 1
    ref = reference.float().flatten(0, 1)
    out = adain(x, ref) if method == "adain" else wavelet(x, ref)
    return ((out.clamp(-1, 1) + 1) / 2).view_as(frames).to(frames.dtype)


class ColorFixedDecoder(StreamingDecoder):
    """A decoder whose frames are colour-corrected against a named reference input.

    Args:
        decoder: the decoder (Hydra-instantiated from its own node).
        method: ``adain`` (the release's), ``wavelet`` or ``none``.
        reference: the named input holding the reference frames: (B, 3, 4 T, H, W) in [-1, 1]
            for T latent frames, the 4 video frames of each (its first call's output is the
            last ``T_out`` of them).
    """

    def __init__(self, decoder: StreamingDecoder, method: str = "adain",
                 reference: str = "lr_frames") -> None:  # fmt: skip
        super().__init__()
        if method not in METHODS:
            raise ConfigError(f"vae.method={method!r} must be one of {', '.join(METHODS)} "
                              "(vsr.color_fix)")  # fmt: skip
        self.decoder, self.method, self.reference = decoder, method, reference
        self.latent_channels, self.spatial_factor = decoder.latent_channels, decoder.spatial_factor
        self.temporal_factor = decoder.temporal_factor
        self.produces_frames = decoder.produces_frames

    def inputs(self) -> dict[str, str]:
        return {**self.decoder.inputs(),
                self.reference: "(B, 3, 4 T, H, W) reference frames in [-1, 1]"}  # fmt: skip

    def reset(self) -> None:
        self.decoder.reset()

    def set_graph(self, policy) -> None:
        self.decoder.set_graph(policy)

    def warm_up(self, frames, batch, latent_hw, device, dtype) -> None:
        self.decoder.warm_up(frames, batch, latent_hw, device, dtype)

    @torch.no_grad()
    def decode_step(self, latents: torch.Tensor, **inputs: torch.Tensor) -> torch.Tensor:
        own = {k: inputs[k] for k in self.decoder.inputs()}
        frames = self.decoder.decode_step(latents, **own)
        if frames is None or self.method == "none":
            return frames
        ref = inputs[self.reference][:, :, -frames.shape[1] :].transpose(1, 2)  # (B, T, 3, H, W)
        return color_fix(frames, ref.to(frames.device), self.method)
