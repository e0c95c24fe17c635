"""First-frame conditioning: the encoded input image is latent frame 0 of the stream."""

from __future__ import annotations

import torch

from flashdreams import ConfigError
from flashdreams.conditioner.base import Conditioner
from flashdreams.io.image import fit_image, image_to_tensor


class FirstFrameConditioner(Conditioner):
    """Causal-Forcing's I2V: the image, VAE-encoded alone, becomes the first clean latent frame.

    The loop commits it to the KV cache at t = 0 before block 0 and emits it with block 0, so
    the decoded video starts with (the VAE reconstruction of) the image. No channels are added
    to the DiT input: any T2V causal model can be conditioned this way.

    Args:
        encoder: the VAE encoder (``encode(video) -> normalized latents``).
    """

    num_prefix_frames = 1
    needs_image = True

    def __init__(self, encoder) -> None:
        super().__init__()
        self.encoder = encoder
        self._prefix: torch.Tensor | None = None

    def prepare(self, images, *, height, width, num_frames, device) -> None:
        if not images:
            raise ConfigError("image=null: this recipe starts the video from an input image; "
                              "pass image=path/to/first_frame.png")  # fmt: skip
        pixels = image_to_tensor([fit_image(img, height, width) for img in images])
        video = pixels.unsqueeze(2).to(device)  # (B, 3, 1, H, W)
        self._prefix = self.encoder.encode(video)  # (B, C, 1, h, w)

    def prefix(self) -> torch.Tensor | None:
        return self._prefix
