"""Latent preview: a fixed linear latent -> RGB map, upsampled by repetition. No weights to load."""

from __future__ import annotations

import torch

from flashdreams.vae.base import StreamingDecoder

# Wan 2.1 latent -> RGB preview factors (rows: latent channels; columns: R, G, B) and bias, as
# published in ComfyUI's latent_formats.Wan21; they act on the DiT's normalized latents and give
# RGB in about [-1, 1].
WAN21_RGB_FACTORS = (
    (-0.1299, -0.1692, 0.2932),
    (0.0671, 0.0406, 0.0442),
    (0.3568, 0.2548, 0.1747),
    (0.0372, 0.2344, 0.1420),
    (0.0313, 0.0189, -0.0328),
    (0.0296, -0.0956, -0.0665),
    (-0.3477, -0.4059, -0.2925),
    (0.0166, 0.1902, 0.1975),
    (-0.0412, 0.0267, -0.1364),
    (-0.1293, 0.0740, 0.1636),
    (0.0680, 0.3019, 0.1128),
    (0.0032, 0.0581, 0.0639),
    (-0.1251, 0.0927, 0.1699),
    (0.0060, -0.0633, 0.0005),
    (0.3477, 0.2275, 0.2950),
    (0.1984, 0.0913, 0.1861),
)
WAN21_RGB_BIAS = (-0.1835, -0.0868, -0.3360)


class LatentPreviewDecoder(StreamingDecoder):
    """Cheap preview frames: per-pixel linear projection, nearest upsampling in space and time.

    Frame convention as the real decoders: the first latent frame of a clip gives one frame,
    every later one ``temporal_factor`` copies of itself.

    Args:
        spatial_factor: pixels per latent pixel along H and W (8 matches the Wan VAE).
        temporal_factor: frames per latent frame after the first (4 matches the Wan VAE).
    """

    latent_channels = len(WAN21_RGB_FACTORS)

    def __init__(self, spatial_factor: int = 8, temporal_factor: int = 4) -> None:
        super().__init__()
        self.spatial_factor = int(spatial_factor)
        self.temporal_factor = int(temporal_factor)
        self.register_buffer("weight", torch.tensor(WAN21_RGB_FACTORS).T.contiguous(), False)
        self.register_buffer("bias", torch.tensor(WAN21_RGB_BIAS), persistent=False)
        self.reset()

    def reset(self) -> None:
        """Start a new clip: the next first latent frame yields a single frame."""
        self._started = False

    @torch.no_grad()
    def decode_step(self, latents: torch.Tensor) -> torch.Tensor:
        """Project, then repeat in time and space.

        Args:
            latents: (B, 16, T, h, w) normalized Wan latents.

        Returns:
            (B, T_out, 3, h * spatial_factor, w * spatial_factor) frames in [0, 1];
            T_out = 1 + temporal_factor (T - 1) on the first call of a clip, temporal_factor T
            after.
        """
        x = latents.transpose(1, 2).to(self.weight.dtype)  # (B, T, C, h, w)
        rgb = torch.einsum("btchw,rc->btrhw", x, self.weight)  # (B, T, 3, h, w)
        rgb = ((rgb + self.bias.view(1, 1, 3, 1, 1)) * 0.5 + 0.5).clamp(0.0, 1.0)
        frames = rgb.repeat_interleave(self.temporal_factor, dim=1)  # (B, T * tf, 3, h, w)
        if not self._started:
            self._started = True
            frames = frames[:, self.temporal_factor - 1 :]  # the first latent frame: one frame
        s = self.spatial_factor
        return frames.repeat_interleave(s, dim=3).repeat_interleave(s, dim=4)  # (B, T_out, 3, H, W)
