"""The clean latents of a clip's frames, for models that re-run history (``DiT.context_plan``)."""

from __future__ import annotations

import torch


class LatentHistory:
    """Clean latents of every latent frame produced so far, by absolute frame index.

    Kept only for models with ``context_frames > 0``; one (B, C, 1, h, w) tensor per frame
    (an endless stream keeps them all: 48 x 44 x 80 fp32 is 0.7 MB a frame).
    """

    def __init__(self) -> None:
        self.frames: list[torch.Tensor] = []

    def reset(self) -> None:
        self.frames = []

    def record(self, start: int, latents: torch.Tensor) -> None:
        """Store the (B, C, F, h, w) clean latents of frames [start, start + F)."""
        del self.frames[start:]
        if start != len(self.frames):
            raise IndexError(f"history holds {len(self.frames)} frames, cannot record at {start}")
        self.frames.extend(latents[:, :, i : i + 1].detach() for i in range(latents.shape[2]))

    def gather(self, frames) -> torch.Tensor | None:
        """(B, C, n, h, w) latents of ``frames`` in that order (None when empty)."""
        if not frames:
            return None
        return torch.cat([self.frames[f] for f in frames], dim=2)
