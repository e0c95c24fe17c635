"""Wan 2.2 TI2V image conditioning: latent frame 0 is the encoded image, held at t = 0."""

from __future__ import annotations

import torch

from flashdreams.conditioner.base import Conditioner
from flashdreams.io.image import fit_image, image_to_tensor


class ReplaceFirstFrameConditioner(Conditioner):
    """TI2V: the VAE-encoded image replaces latent frame 0 of every forward's input, at t = 0.

    As Wan 2.2's TI2V reference (diffusers: ``expand_timesteps=True``): before each forward the
    first latent frame of the clip is overwritten by the encoded image and its tokens get
    timestep 0 while the others get t; the solver steps the whole latent and the image is put
    back once more at the end. Without an image the same recipe is text-to-video (nothing is
    replaced), so the image is optional. No channels are added to the DiT input.

    Args:
        encoder: the VAE encoder (``encode(video) -> normalized latents``).
        image_timestep: the timestep of the image frame's tokens (0 for Wan 2.2; HY-WorldPlay
            gives it 14).
    """

    optional_image = True

    def __init__(self, encoder, image_timestep: float = 0.0) -> None:
        super().__init__()
        self.encoder = encoder
        self.image_timestep = float(image_timestep)
        self._first: torch.Tensor | None = None  # (B, C, 1, h, w) encoded image

    def prepare(self, images, *, height, width, num_frames, device) -> None:
        self._first = None
        if images:
            pixels = image_to_tensor([fit_image(img, height, width) for img in images])
            self._first = self.encoder.encode(pixels.unsqueeze(2).to(device))  # (B, C, 1, h, w)

    def replace(self, x: torch.Tensor, start: int) -> torch.Tensor:
        if self._first is None or start > 0:
            return x
        return torch.cat([self._first.to(x.dtype), x[:, :, 1:]], dim=2)

    def timesteps(self, t: torch.Tensor, start: int) -> torch.Tensor:
        if self._first is None or start > 0:
            return t
        return torch.cat([torch.full_like(t[:, :1], self.image_timestep), t[:, 1:]], dim=1)
