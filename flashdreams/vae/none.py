"""A decoder that decodes nothing, for benchmarks of the DiT alone."""

from __future__ import annotations

import torch

from flashdreams.vae.base import StreamingDecoder


class NoDecoder(StreamingDecoder):
    """Skips decoding: ``decode_step`` returns None and no frames are written.

    The rollout checks ``produces_frames`` and leaves its video sinks out.
    """

    produces_frames = False

    def reset(self) -> None:
        """Nothing to forget."""

    def decode_step(self, latents: torch.Tensor) -> None:
        """Ignore the latents.

        Args:
            latents: (B, C, T, h, w) latent frames, unused.

        Returns:
            None.
        """
        return None
