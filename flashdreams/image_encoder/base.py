"""Protocol of an image encoder (I2V image tokens for the DiT's cross-attention)."""

from __future__ import annotations

import torch


class ImageEncoder:
    """Turns the clip's input images into tokens the DiT's image cross-attention reads.

    The base class is also the ``none`` option: it produces no tokens.

    Attributes:
        image_dim: width of a token (1280 for CLIP ViT-H/14); None when no tokens are produced.
    """

    image_dim: int | None = None

    def encode(self, images: list, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        """Encode B PIL images (as given, before any resize) to (B, tokens, image_dim), or None."""
        return None
