"""CLIP ViT-H/14 image encoder of Wan 2.1 I2V via transformers' ``CLIPVisionModel``.

Wan cross-attends to the penultimate layer's hidden states of all 257 tokens (class token +
16 x 16 patches of a 224 x 224 image). Two preprocessings: ``crop`` (diffusers'
``WanImageToVideoPipeline.encode_image``: shortest edge to 224, center crop) and ``squash``
(the Wan reference code's CLIP, which Matrix-Game's release runs: the frame in [-1, 1] resized
bicubic to 224 x 224 whatever its aspect ratio, no crop, then CLIP's mean / std).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig, CLIPVisionModel

from flashdreams import ConfigError
from flashdreams.image_encoder.base import ImageEncoder
from flashdreams.io.checkpoint import as_dtype, resolve_path
from flashdreams.io.image import fit_image, image_to_tensor

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
        preprocess: ``crop`` (the processor: shortest edge, center crop) or ``squash`` (the
            whole frame resized bicubic to the tower's input size, the processor's mean / std).
        frame_size: ``squash`` only: (height, width) the image is first fitted to, as the video
            frame the reference code hands its CLIP (None: the image as given).
    """

    def __init__(self, checkpoint: str | None = None, processor: str | None = None,
                 dtype: str = "float32", config: dict | None = None, seed: int = 0,
                 preprocess: str = "crop", frame_size: list[int] | None = None) -> None:  # fmt: skip
        if preprocess not in ("crop", "squash"):
            raise ConfigError(f"image_encoder.preprocess={preprocess!r} is not one of "
                              "['crop', 'squash']")  # fmt: skip
        if frame_size is not None and (len(frame_size) != 2 or min(frame_size) < 1):
            raise ConfigError(f"image_encoder.frame_size={list(frame_size)} must be "
                              "[height, width] (or null)")  # fmt: skip
        self.preprocess = preprocess
        self.frame_size = None if frame_size is None else (int(frame_size[0]), int(frame_size[1]))
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
        pixels = self.pixels(images).to(device=device, dtype=self.model.dtype)
        out = self.model(pixel_values=pixels, output_hidden_states=True)
        return out.hidden_states[-2].to(dtype)

    def pixels(self, images) -> torch.Tensor:
        """(B, 3, S, S) normalized tower input of B PIL images (``preprocess``)."""
        if self.preprocess == "crop":
            return self.processor(images=images, return_tensors="pt")["pixel_values"]
        if self.frame_size is not None:
            images = [fit_image(img, *self.frame_size) for img in images]
        size = self.model.config.image_size
        out = []
        for img in images:  # one at a time: the frames may differ in size
            frame = image_to_tensor([img])  # (1, 3, H, W) in [-1, 1]
            out.append(F.interpolate(frame, size=(size, size), mode="bicubic", align_corners=False))
        x = torch.cat(out).mul(0.5).add(0.5)
        mean = torch.tensor(self.processor.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(self.processor.image_std).view(1, 3, 1, 1)
        return (x - mean) / std
