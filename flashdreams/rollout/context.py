"""The clip's prompts and images, and the model context encoded from them (cached per prompt)."""

from __future__ import annotations

import torch

from flashdreams import ConfigError
from flashdreams.guidance.base import Guidance
from flashdreams.image_encoder.base import ImageEncoder
from flashdreams.model.base import DiT
from flashdreams.text_encoder.base import TextEncoder


class PromptContext:
    """Encodes prompts (and image tokens) into the model's context, once per prompt tuple.

    Args:
        model: the DiT (``prepare_context``).
        text_encoder: prompt encoder.
        image_encoder: image tokens for the DiT's image cross-attention.
        guidance: the guidance rule (``needs_negative``, ``prepare``).
        batch_size: videos generated together (one prompt and image each).
        negative_prompt: prompt of the unconditional prediction when guidance needs one.
        device: the run's device.
        dtype: the model's dtype.
    """

    def __init__(self, model: DiT, text_encoder: TextEncoder, image_encoder: ImageEncoder,
                 guidance: Guidance, *, batch_size: int, negative_prompt: str,
                 device: torch.device, dtype: torch.dtype) -> None:  # fmt: skip
        self.model, self.text_encoder, self.image_encoder = model, text_encoder, image_encoder
        self.guidance, self.batch_size, self.negative_prompt = guidance, batch_size, negative_prompt
        self.device, self.dtype = device, dtype
        self.prompts: list[str] = []
        self.images: list | None = None
        self.image_tokens: torch.Tensor | None = None
        self.cached: dict[tuple[str, ...], tuple] = {}

    def _check(self, items: list, what: str) -> list:
        if len(items) != self.batch_size:
            raise ConfigError(f"got {len(items)} {what} for rollout.batch_size={self.batch_size}")
        return list(items)

    def set_prompts(self, prompts: list[str]) -> None:
        """The prompts of the next forwards; the contexts of other prompts are freed."""
        self.prompts = self._check(prompts, "prompts")
        self.cached = {k: v for k, v in self.cached.items() if k == tuple(self.prompts)}

    def set_images(self, images: list | None) -> None:
        """The clip's images (one PIL image per video, or None); their tokens are encoded here."""
        if images is not None or self.image_tokens is not None:
            self.cached.clear()  # the image tokens are part of the cached context
        self.images = None if images is None else self._check(images, "images")
        self.image_tokens = None
        if self.images is not None:
            self.image_tokens = self.image_encoder.encode(self.images, self.device, self.dtype)

    def encode(self) -> tuple:
        """(conditional context, guidance state) of the current prompts."""
        key = tuple(self.prompts)
        if key not in self.cached:
            b, needs_neg = self.batch_size, self.guidance.needs_negative
            texts = self.prompts + [self.negative_prompt] * b if needs_neg else self.prompts
            emb = self.text_encoder.encode(texts, self.device, self.dtype)  # (B or 2B, L, C)
            cond = self.model.prepare_context(emb[:b], self.image_tokens)
            uncond = self.model.prepare_context(emb[b:], self.image_tokens) if needs_neg else None
            self.cached[key] = (cond, self.guidance.prepare(cond, uncond))
        return self.cached[key]
