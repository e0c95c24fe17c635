"""No image tokens (text-to-video models, or I2V models conditioned through latents only)."""

from __future__ import annotations

from flashdreams.image_encoder.base import ImageEncoder


class NoImageEncoder(ImageEncoder):
    """The token-less encoder of the base class, as a selectable option (``image_encoder=none``)."""
