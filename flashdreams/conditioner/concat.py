"""Channel-concat image conditioning of Wan 2.1 I2V: mask + VAE latents of [image, zeros...]."""

from __future__ import annotations

import torch

from flashdreams import ConfigError
from flashdreams.conditioner.base import Conditioner
from flashdreams.io.image import fit_image, image_to_tensor
from flashdreams.model.base import ConditionInput


class ConcatImageConditioner(Conditioner):
    """Wan 2.1 I2V conditioning, concatenated to the noisy latents (16 + 4 + 16 = in_dim 36).

    The clip ``[image, 0, 0, ...]`` (``1 + tf * (T - 1)`` video frames, tf the VAE's temporal
    factor) is VAE-encoded to T latent frames; a ``tf``-channel mask marks the video frames that
    are given (all ``tf`` sub-frames of latent frame 0, nothing after). The DiT input is
    ``[noisy latents | mask | image latents]`` along channels, as in Wan's and diffusers'
    ``WanImageToVideoPipeline``. The model receives ``[mask | image latents]`` as its
    ``image_latents`` input and concatenates it to the noisy latents.

    Args:
        encoder: the VAE encoder (``encode(video) -> normalized latents``, ``temporal_factor``).
    """

    needs_image = True

    def __init__(self, encoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.num_channels = encoder.temporal_factor + encoder.mean.shape[1]
        self._y: torch.Tensor | None = None

    def provides(self) -> dict[str, ConditionInput]:
        return {"image_latents": ConditionInput.per_latent_pixel("image_latents",
                                                                 self.num_channels)}  # fmt: skip

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

    def inputs(self, start: int, num: int) -> dict[str, torch.Tensor]:
        """``image_latents`` of frames [start, start + num); frames past the prepared clip
        (endless streams) repeat its last frame (mask 0, latents of black frames)."""
        if self._y is None:
            raise RuntimeError("ConcatImageConditioner.prepare was not called for this clip")
        frames = self._y.shape[2]
        y = self._y[:, :, start : start + num]
        if start + num > frames:
            past = start + num - max(frames, start)
            y = torch.cat([y, self._y[:, :, -1:].expand(-1, -1, past, -1, -1)], dim=2)
        return {"image_latents": y}
