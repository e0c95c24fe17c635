"""Channel-concat image conditioning of Wan 2.1 I2V: mask + VAE latents of [image, zeros...]."""

from __future__ import annotations

import torch

from flashdreams import ConfigError
from flashdreams.conditioner.base import Conditioner
from flashdreams.io.image import fit_image, image_to_tensor


class ConcatImageConditioner(Conditioner):
    """Wan 2.1 I2V conditioning, concatenated to the noisy latents (16 + 4 + 16 = in_dim 36).

    The clip ``[image, 0, 0, ...]`` (``1 + tf * (T - 1)`` video frames, tf the VAE's temporal
    factor) is VAE-encoded to T latent frames; a ``tf``-channel mask marks the video frames that
    are given (all ``tf`` sub-frames of latent frame 0, nothing after). The DiT input is
    ``[noisy latents | mask | image latents]`` along channels, as in Wan's and diffusers'
    ``WanImageToVideoPipeline``.

    Args:
        encoder: the VAE encoder (``encode(video) -> normalized latents``, ``temporal_factor``).
    """

    needs_image = True

    def __init__(self, encoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.num_channels = encoder.temporal_factor + encoder.mean.shape[1]
        self._y: torch.Tensor | None = None

    def prepare(self, images, *, height, width, num_frames, device) -> None:
        if not images:
            raise ConfigError("image=null: this recipe animates an input image; "
                              "pass image=path/to/first_frame.png")  # fmt: skip
        tf = self.encoder.temporal_factor
        first = image_to_tensor([fit_image(img, height, width) for img in images]).to(device)
        b = first.shape[0]
        video = first.new_zeros(b, 3, 1 + tf * (num_frames - 1), height, width)
        video[:, :, 0] = first  # (B, 3, T_video, H, W): the image, then black frames
        latents = self.encoder.encode(video)  # (B, C, T, h, w)
        mask = latents.new_zeros(b, tf, num_frames, *latents.shape[-2:])
        mask[:, :, 0] = 1.0  # the first video frame (tf sub-frames of latent frame 0) is given
        self._y = torch.cat([mask, latents], dim=1)  # (B, tf + C, T, h, w)

    def channels(self, start: int, num: int) -> torch.Tensor | None:
        if self._y is None:
            raise RuntimeError("ConcatImageConditioner.prepare was not called for this clip")
        return self._y[:, :, start : start + num]
