"""CLIP ViT-H/14 image encoder of Wan 2.1 I2V via transformers' ``CLIPVisionModel``.

Wan cross-attends to the penultimate layer's hidden states of all 257 tokens (class token +
16 x 16 patches of a 224 x 224 crop), as diffusers' ``WanImageToVideoPipeline.encode_image``.
"""

from __future__ import annotations

import logging

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from flashdreams.image_encoder.base import ImageEncoder
from flashdreams.io.checkpoint import as_dtype, resolve_path

log = logging.getLogger(__name__)

# The vision tower of Wan 2.1 I2V (open-clip xlm-roberta-large-vit-huge-14 / laion ViT-H-14).
VIT_H_14 = dict(
    hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
    patch_size=14, image_size=224, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=1024,
)  # fmt: skip


def clip_processor(path=None):
    """CLIP preprocessing (resize shortest edge 224 bicubic, center crop, CLIP mean/std).

    The PIL implementation is used on every machine, so results do not depend on whether
    torchvision is installed. ``path`` is a folder with ``preprocessor_config.json``.
    """
    try:  # transformers >= 5 names the PIL backend explicitly
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:  # transformers 4.x: the default class is the PIL one
        from transformers import CLIPImageProcessor as Processor
    return Processor.from_pretrained(path) if path is not None else Processor()


class CLIPImageEncoder(ImageEncoder):
    """Penultimate hidden states of a CLIP vision tower.

    Args:
        checkpoint: a transformers ``CLIPVisionModel`` folder (local or ``hf://``, e.g. the
            ``image_encoder`` folder of Wan2.1-I2V-14B-480P-Diffusers); None = seeded random
            weights of ``config``.
        processor: a folder with ``preprocessor_config.json`` (e.g. the ``image_processor``
            folder of the same repository); None = CLIP's defaults (224, bicubic, center crop).
        dtype: weight and compute dtype (the encoder runs once per clip).
        config: ``CLIPVisionConfig`` overrides for random weights (default: ViT-H/14).
        seed: seed of the random weights.
    """

    def __init__(self, checkpoint: str | None = None, processor: str | None = None,
                 dtype: str = "float32", config: dict | None = None, seed: int = 0) -> None:  # fmt: skip
        dtype = as_dtype(dtype)
        if checkpoint is not None:
            model = CLIPVisionModel.from_pretrained(resolve_path(checkpoint), dtype=dtype)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = CLIPVisionModel(CLIPVisionConfig(**{**VIT_H_14, **(config or {})}))
            log.warning("image_encoder.checkpoint=null: RANDOM CLIP weights (seed %d)", seed)
        self.model = model.to(dtype).eval().requires_grad_(False)
        self.processor = clip_processor(None if processor is None else resolve_path(processor))
        self.image_dim = self.model.config.hidden_size

    @torch.no_grad()
    def encode(self, images, device, dtype) -> torch.Tensor:
        """(B, 257, image_dim) penultimate hidden states of B PIL images."""
        if next(self.model.parameters()).device != device:
            self.model.to(device)
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        pixels = pixels.to(device=device, dtype=self.model.dtype)
        out = self.model(pixel_values=pixels, output_hidden_states=True)
        return out.hidden_states[-2].to(dtype)
