"""Protocol of an image conditioner (latent conditioning from the clip's input image).

The base class is also the no-op conditioner of text-to-video recipes.
"""

from __future__ import annotations

import torch
from torch import nn

from flashdreams.model.base import ConditionInput


class Conditioner(nn.Module):
    """Turns the clip's input image into latent conditioning of the DiT.

    Three mechanisms, any of them:

    * prefix frames: clean latent frames placed before the first generated block. The loop
      commits them to the KV cache at t = 0 and emits them with AR step 0; generated blocks start
      at frame ``num_prefix_frames`` (Causal-Forcing I2V: the encoded image is frame 0).
    * named inputs: tensors of each forward's frames handed to the model by name
      (``provides()`` / ``inputs(start, num)``; Wan I2V: ``image_latents``, 4 mask + 16
      image-latent channels that the model concatenates to its input).
    * replaced frames: latent frames overwritten in every forward's input, with timestep 0 on
      their tokens (Wan 2.2 TI2V: the encoded image is frame 0 of a bidirectional clip).

    Per clip the loop calls ``prepare(images, ...)`` once, then ``prefix()`` at step 0,
    ``replace(x, start)``, ``timesteps(t, start)`` and ``inputs(start, num)`` for every forward,
    and ``replace`` once more on a block's final latents. Live control is not a conditioner's
    business: see ``flashdreams.control``.

    Attributes:
        num_prefix_frames: latent frames the condition supplies before block 0.
        needs_image: whether a clip cannot start without an input image.
        optional_image: whether an input image is used when given (a clip may start without).
    """

    num_prefix_frames: int = 0
    needs_image: bool = False
    optional_image: bool = False

    def provides(self) -> dict[str, ConditionInput]:
        """Named inputs this conditioner gives the model (none here)."""
        return {}

    def prepare(
        self, images: list | None, *, height: int, width: int, num_frames: int,
        device: torch.device,
    ) -> None:  # fmt: skip
        """Encode the clip's images (PIL, one per video) for a clip of ``num_frames`` latents."""

    def check_frames(self, num_frames: int) -> object:
        """Fail in one line, before any model loads, if a clip of ``num_frames`` latent frames
        cannot be conditioned; nothing to check by default."""
        return None

    def prefix(self) -> torch.Tensor | None:
        """(B, C, num_prefix_frames, h, w) clean latents, or None."""
        return None

    def inputs(self, start: int, num: int) -> dict[str, torch.Tensor]:
        """Named tensors of frames [start, start + num) (see ``provides``)."""
        return {}

    def replace(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """(B, C, F, h, w) latents of frames [start, start + F) with the given frames put in."""
        return x

    def timesteps(self, t: torch.Tensor, start: int) -> torch.Tensor:
        """(B, F) per-frame timesteps of frames [start, start + F); given frames get 0."""
        return t
