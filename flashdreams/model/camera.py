"""Camera branch of a camera-controlled Wan DiT (LingBot-World): ray encoder + block injector.

The DiT receives per latent pixel a ``camera_channels`` feature (LingBot-World: the 6-channel
ray map ``[origin, direction]`` of every video pixel, folded 8 x 8 to latent resolution, so
6 * 64 = 384 channels; built by ``flashdreams.conditioner.camera``). The encoder patchifies it
like the latents (1 x 2 x 2 -> 1536 features per token), projects it to the model width and adds
a SiLU MLP residual. Every block then modulates its residual stream between self-attention and
cross-attention::

    h = mlp2(silu(mlp1(p))) + p            p: (B, L, dim) encoded camera tokens
    x = (1 + scale(h)) * x + shift(h)

Checkpoint names of the LingBot-World release map onto these modules in
``flashdreams.io.keymap`` (``patch_embedding_wancamctrl`` -> ``camera_encoder.proj``, ...).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return layer(x.to(layer.weight.dtype))


class CameraEncoder(nn.Module):
    """Folded ray maps (B, C_cam, F, h, w) -> camera tokens (B, L, dim) in (f, h, w) order.

    Args:
        camera_channels: channels per latent pixel (384 = 6 ray channels x 8 x 8 pixels).
        dim: model width.
        patch_size: the DiT's (pt, ph, pw) patch.
    """

    def __init__(self, camera_channels: int, dim: int, patch_size: Sequence[int]) -> None:
        super().__init__()
        self.patch_size = tuple(patch_size)
        pt, ph, pw = self.patch_size
        self.proj = nn.Linear(camera_channels * pt * ph * pw, dim)
        self.mlp1 = nn.Linear(dim, dim)
        self.mlp2 = nn.Linear(dim, dim)

    def patchify(self, rays: torch.Tensor) -> torch.Tensor:
        """(B, C, F, H, W) -> (B, L, C * pt * ph * pw), features ordered (c, pt, ph, pw)."""
        b, c, f, h, w = rays.shape
        pt, ph, pw = self.patch_size
        x = rays.reshape(b, c, f // pt, pt, h // ph, ph, w // pw, pw)
        x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)  # (B, f, h, w, C, pt, ph, pw)
        return x.reshape(b, (f // pt) * (h // ph) * (w // pw), c * pt * ph * pw)

    def forward(self, rays: torch.Tensor) -> torch.Tensor:
        p = _linear(self.proj, self.patchify(rays))
        return p + self.mlp2(F.silu(self.mlp1(p)))


class CameraInjector(nn.Module):
    """Per-block camera modulation of the residual stream (after the self-attention residual)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mlp1, self.mlp2 = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.scale, self.shift = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cam: torch.Tensor) -> torch.Tensor:
        """x: (B, L, C) fp32 residual stream; cam: (B, L, C) camera tokens. Returns fp32."""
        p = cam.to(self.mlp1.weight.dtype)
        h = self.mlp2(F.silu(self.mlp1(p))) + p
        scale = (1.0 + self.scale(h)).float()  # 1 + scale in the weights' dtype, as the reference
        return scale * x + self.shift(h).float()
