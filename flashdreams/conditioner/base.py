"""Protocol of an image conditioner (I2V latent conditioning), as the rollout loop sees it.

The base class is also the no-op conditioner of text-to-video recipes.
"""

from __future__ import annotations

import torch
from torch import nn


class Conditioner(nn.Module):
    """Turns the clip's input image into latent conditioning of the DiT.

    Two mechanisms, either or both:

    * prefix frames: clean latent frames placed before the first generated block. The loop
      commits them to the KV cache at t = 0 and emits them with AR step 0; generated blocks start
      at frame ``num_prefix_frames`` (Causal-Forcing I2V: the encoded image is frame 0).
    * extra channels: a (B, num_channels, T, h, w) tensor concatenated to the DiT input along
      channels, sliced to each forward's frames (Wan I2V: 4 mask + 16 image-latent channels).

    * replaced frames: latent frames overwritten in every forward's input, with timestep 0 on
      their tokens (Wan 2.2 TI2V: the encoded image is frame 0 of a bidirectional clip).

    Per clip the loop calls ``prepare(images, ...)`` once, then ``prefix()`` at step 0,
    ``replace(x, start)``, ``timesteps(t, start)`` and ``channels(start, num)`` for every forward,
    and ``replace`` once more on a block's final latents.

    A conditioner may also steer a control branch of the DiT (camera-controlled models): then
    ``control(start, num)`` gives the features of every forward (the model's ``control``
    argument), ``set_control(control)`` receives each step's live control (keys, ...) before
    the step, and ``state()`` reports what was applied (sent with the server's step message).

    Attributes:
        num_prefix_frames: latent frames the condition supplies before block 0.
        num_channels: channels concatenated to the DiT input (its ``in_dim - out_dim``).
        needs_image: whether a clip cannot start without an input image.
        optional_image: whether an input image is used when given (a clip may start without).
        control_channels: channels of ``control`` features (the model's ``camera_channels``).
    """

    num_prefix_frames: int = 0
    num_channels: int = 0
    needs_image: bool = False
    optional_image: bool = False
    control_channels: int = 0

    def prepare(
        self, images: list | None, *, height: int, width: int, num_frames: int,
        device: torch.device,
    ) -> None:  # fmt: skip
        """Encode the clip's images (PIL, one per video) for a clip of ``num_frames`` latents."""

    def check_frames(self, num_frames: int) -> object:
        """Fail in one line, before any model loads, if a clip of ``num_frames`` latent frames
        cannot be conditioned (e.g. a pose file too short); nothing to check by default."""
        return None

    def prefix(self) -> torch.Tensor | None:
        """(B, C, num_prefix_frames, h, w) clean latents, or None."""
        return None

    def channels(self, start: int, num: int) -> torch.Tensor | None:
        """(B, num_channels, num, h, w) extra input channels of frames [start, start + num)."""
        return None

    def replace(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """(B, C, F, h, w) latents of frames [start, start + F) with the given frames put in."""
        return x

    def timesteps(self, t: torch.Tensor, start: int) -> torch.Tensor:
        """(B, F) per-frame timesteps of frames [start, start + F); given frames get 0."""
        return t

    def control(self, start: int, num: int) -> torch.Tensor | None:
        """(B, control_channels, num, h, w) control features of frames [start, start + num)."""
        return None

    def set_control(self, control: dict | None) -> None:
        """The live control of the next step (validated by the session), or None."""

    def state(self) -> dict | None:
        """JSON-able summary of the control applied last (e.g. the camera pose), or None."""
        return None
