"""Cosmos-Predict2.5 Video2World / Image2World conditioning: the first latent frames are given.

As ``Cosmos2_5_PredictBasePipeline``: the last ``4 * (n - 1) + 1`` frames of an input video
(or one input image, n = 1) are VAE-encoded into n latent frames (n = 1 or 2). Before every
forward they replace the first n latent frames of the input, their tokens get a near-zero
timestep (``conditional_timestep``, 0.0001 as a sigma), and the DiT's ``condition_mask``
channel is 1 on them. The pipeline also replaces the prediction on those frames by the ground
truth velocity; the solver acts per element and the frames are put back before every forward
and once more at the end, so the generated frames do not depend on it and it is left out.
Without an image or video the recipe is Text2World (nothing is given, the mask is all zeros).
"""

from __future__ import annotations

import imageio_ffmpeg
import numpy as np
import torch
from PIL import Image

from flashdreams import ConfigError
from flashdreams.conditioner.base import Conditioner
from flashdreams.io.image import fit_image, image_to_tensor
from flashdreams.model.base import ConditionInput


def read_last_frames(path: str, count: int) -> list[Image.Image]:
    """The last ``count`` RGB frames of a video file (all of them when it has fewer)."""
    reader = imageio_ffmpeg.read_frames(str(path))
    try:
        width, height = next(reader)["size"]
        frames: list[bytes] = []
        for raw in reader:
            frames = [*frames[-(count - 1) :], raw] if count > 1 else [raw]
    finally:
        reader.close()
    shape = (height, width, 3)
    return [Image.fromarray(np.frombuffer(f, np.uint8).reshape(shape)) for f in frames]


class CosmosVideoConditioner(Conditioner):
    """Given first latent frames: Video2World (``video``) or Image2World (``image=``).

    Args:
        encoder: the VAE encoder (``encode(video) -> normalized latents``), Wan 2.1's.
        video: an input video file (Video2World); None: only an image, if any, is given.
        num_latent_frames: latent frames taken from the video (1 or 2: its last 1 or 5
            frames); an image always gives 1.
        conditional_timestep: timestep of the given frames on the [0, 1000] scale (the
            pipelines' 0.0001 as a sigma); None: they keep the block's timestep (OmniDreams'
            Self-Forcing student, ``conditional_frame_timestep=-1``: only the frames and the
            condition mask are given).
        temporal_stride: video frames per latent frame after the first (the VAE's 4).
        spatial_stride: pixels per latent pixel (the VAE's 8).
        needs_image: a clip cannot start without ``image=`` (Image2World recipes).
    """

    optional_image = True

    def __init__(self, encoder, video: str | None = None, num_latent_frames: int = 2,
                 conditional_timestep: float | None = 0.1, temporal_stride: int = 4,
                 spatial_stride: int = 8, needs_image: bool = False) -> None:  # fmt: skip
        super().__init__()
        self.needs_image = needs_image
        if num_latent_frames not in (1, 2):
            raise ConfigError(f"conditioner.num_latent_frames={num_latent_frames} must be 1 or 2")
        self.encoder = encoder
        self.video = video
        self.num_latent_frames = num_latent_frames
        self.conditional_timestep = (None if conditional_timestep is None
                                     else float(conditional_timestep))  # fmt: skip
        self.temporal_stride = temporal_stride
        self.spatial_stride = spatial_stride
        self._given: torch.Tensor | None = None  # (B, C, n, h, w) encoded frames
        self._latent_hw: tuple[int, int] | None = None  # set by prepare
        self._device: torch.device | str = "cpu"

    def provides(self) -> dict[str, ConditionInput]:
        """Named DiT inputs this conditioner gives (``inputs``)."""
        return {"condition_mask": ConditionInput.per_latent_pixel("condition_mask", 1)}

    @property
    def num_given(self) -> int:
        """Latent frames given at the start of the clip (0: Text2World)."""
        return 0 if self._given is None else self._given.shape[2]

    def prepare(self, images, *, height, width, num_frames, device) -> None:
        self._given = None
        self._latent_hw = (height // self.spatial_stride, width // self.spatial_stride)
        self._device = device
        if images and self.video:
            raise ConfigError("give either image= or conditioner.video, not both")
        if self.video:
            count = self.temporal_stride * (self.num_latent_frames - 1) + 1
            frames = read_last_frames(self.video, count)
            if len(frames) < count:
                raise ConfigError(f"conditioner.video={self.video!r} has {len(frames)} frames, "
                                  f"{count} needed for {self.num_latent_frames} latent frames")  # fmt: skip
            pixels = image_to_tensor([fit_image(f, height, width) for f in frames])  # (T, 3, H, W)
            video = pixels.permute(1, 0, 2, 3).unsqueeze(0)  # (1, 3, T, H, W)
        elif images:
            pixels = image_to_tensor([fit_image(img, height, width) for img in images])
            video = pixels.unsqueeze(2)  # (B, 3, 1, H, W)
        else:
            return
        if num_frames is not None and num_frames <= (video.shape[2] - 1) // self.temporal_stride:
            raise ConfigError(f"a clip of {num_frames} latent frames leaves none to generate")
        self._given = self.encoder.encode(video.to(device)).float()  # (B, C, n, h, w)

    def _count(self, start: int, num: int) -> int:
        """How many of frames [start, start + num) are given (they come first)."""
        return min(max(self.num_given - start, 0), num)

    def replace(self, x: torch.Tensor, start: int) -> torch.Tensor:
        count = self._count(start, x.shape[2])
        if count == 0:
            return x
        given = self._given[:, :, start : start + count].to(x.dtype)
        return torch.cat([given.expand(x.shape[0], -1, -1, -1, -1), x[:, :, count:]], dim=2)

    def timesteps(self, t: torch.Tensor, start: int) -> torch.Tensor:
        count = self._count(start, t.shape[1])
        if count == 0 or self.conditional_timestep is None:
            return t
        return torch.cat([torch.full_like(t[:, :count], self.conditional_timestep),
                          t[:, count:]], dim=1)  # fmt: skip

    def inputs(self, start: int, num: int) -> dict[str, torch.Tensor]:
        """``condition_mask`` (1, 1, num, h, w), broadcast over the batch: 1 on the given frames
        among [start, start + num), zeros when none is given (every forward gets it, so a
        captured graph always reads the same inputs)."""
        if self._latent_hw is None:
            return {}
        mask = torch.zeros(1, 1, num, *self._latent_hw, device=self._device)
        mask[:, :, : self._count(start, num)] = 1.0
        return {"condition_mask": mask}
