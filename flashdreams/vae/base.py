"""Protocol of a streaming latent decoder, as the rollout loop sees it; the decoders' file reader."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from flashdreams.io.checkpoint import CheckpointError, load_torch_file


class StreamingDecoder(nn.Module):
    """Decodes latents block by block, carrying its causal state across AR steps.

    Frame convention (Wan 2.1 family): T latent frames decode to ``1 + 4 * (T - 1)`` video
    frames over the whole clip; the first call yields ``1 + 4 * (T0 - 1)`` frames and every
    later call ``4 * T`` frames, so a block-by-block decode equals a full-clip decode.

    Attributes:
        latent_channels: channels of the latent (16 for Wan 2.1).
        spatial_factor: pixels per latent pixel along H and W (8 for Wan 2.1).
        temporal_factor: video frames per latent frame after the first (4 for Wan 2.1).
        produces_frames: False for decoders that return ``None`` (benchmarks of the DiT alone).
    """

    latent_channels: int = 16
    spatial_factor: int = 8
    temporal_factor: int = 4
    produces_frames: bool = True

    def reset(self) -> None:
        """Forget the streaming state; the next ``decode_step`` starts a new clip."""
        raise NotImplementedError

    def decode_step(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode the next latent frames of the clip.

        Args:
            latents: (B, C, T, h, w) new latent frames, in the model's latent space.

        Returns:
            (B, T_out, 3, H, W) float frames in [0, 1].
        """
        raise NotImplementedError


def read_tensor_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a decoder checkpoint file: ``.safetensors`` or a weights-only torch pickle.

    Args:
        path: the checkpoint file (``.safetensors``, ``.pth``, ``.pt``, ``.bin``).

    Returns:
        Key -> CPU tensor, keys as stored.

    Raises:
        CheckpointError: the file is missing, unreadable or holds no flat tensor dict.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} not found")
    if path.suffix == ".safetensors":
        return load_file(str(path), device="cpu")
    state = load_torch_file(path)
    if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"checkpoint {str(path)!r} does not hold a flat dict of tensors")
    return dict(state)
