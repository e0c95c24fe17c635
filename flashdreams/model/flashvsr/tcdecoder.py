"""FlashVSR's Tiny Conditional Decoder (``TCDecoder.ckpt``): TAEHV conditioned on the LR frames.

The release's ``build_tcdecoder(new_channels=[512, 256, 128, 128], new_latent_channels=16 + 768)``:
the TAEHV decoder (``flashdreams.vae.taehv``) widened, deepened by an identity-initialised 3x3
conv + ReLU after each of its top-level ReLUs, and fed, per latent frame, the 16 latent
channels after 768 channels of its 4 LR frames pixel-unshuffled by 8 x 8 (``(c, f, hh, ww)``
order). The release decodes ``LQ_video[:, :, :4 n + 1]`` for ``n`` latents, padding the front
with 3 copies of frame 0, so latent ``j`` reads LR frames ``4j - 3 .. 4j`` (latent 0: frame 0
four times). Key names: ``decoder.<index>.*`` of that deepened stack.

Streaming works as TAEHV's: per MemBlock, the last input frame of the previous call.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from flashdreams.vae.taehv import TAEHVDecoder, build_taehv_decoder

LR_CHANNELS = 3 * 4 * 8 * 8  # 4 LR frames x 8 x 8 pixels x RGB per latent pixel


def deepen(stack: nn.Sequential) -> nn.Sequential:
    """A (3x3 conv, ReLU) after every top-level ReLU, the conv as wide as the layer before."""
    layers: list[nn.Module] = []
    for layer in stack:
        layers.append(layer)
        if isinstance(layer, nn.ReLU) and len(layers) >= 2:
            prev = layers[-2]
            width = prev.out_channels if isinstance(prev, nn.Conv2d) else None
            if width is not None:
                conv = nn.Conv2d(width, width, 3, padding=1, bias=False)
                with torch.no_grad():
                    nn.init.dirac_(conv.weight)
                layers += [conv, nn.ReLU()]
    return nn.Sequential(*layers)


def lr_groups(lr: torch.Tensor, start: int, num: int) -> torch.Tensor:
    """(B, 3, 4 num, H, W) LR frames of latents [start, start + num) the way the release feeds
    them: latent j reads frames 4j - 3 .. 4j, frame 0 four times for latent 0.

    Args:
        lr: (B, 3, T, H, W) the clip's LR frames (at the output size, [-1, 1]).
    """
    idx = [max(0, 4 * j - 3 + i) for j in range(start, start + num) for i in range(4)]
    return lr[:, :, idx]


class TCDecoder(TAEHVDecoder):
    """Streaming TCDecoder: ``decode_step(latents, lr_frames=...)`` with the LR frames of those
    latents (its named decoder input, fed by ``control=lr_video``).

    Args:
        checkpoint: ``TCDecoder.ckpt`` (release names); None = random weights.
        channels: level widths (512, 256, 128, 128 in the release).
        latent_channels: the DiT's latent channels (16); the LR channels are added.
        seed: seed of the random weights.
        compile: ``torch.compile`` the per-block decode on CUDA (as ``vae=taehv``).
    """

    def __init__(self, checkpoint: str | None = None,
                 channels: Sequence[int] = (512, 256, 128, 128), latent_channels: int = 16,
                 seed: int = 0, compile: bool = False) -> None:  # fmt: skip
        super().__init__(checkpoint, channels, latent_channels + LR_CHANNELS, seed, compile)
        self.latent_channels = int(latent_channels)  # what the loop feeds; the LR is added here

    def _build(self, latent_channels: int, channels: Sequence[int]) -> nn.Sequential:
        return deepen(build_taehv_decoder(latent_channels, channels))

    def inputs(self) -> dict[str, str]:
        return {"lr_frames": "(B, 3, 4 T, 8 h, 8 w) LR frames 4j-3..4j of each latent j, [-1, 1]"}

    @staticmethod
    def condition(latents: torch.Tensor, lr_frames: torch.Tensor) -> torch.Tensor:
        """(B, 768 + C, T, h, w): pixel-unshuffled LR groups (B, 3, 4 T, 8 h, 8 w) + latents."""
        b, c, f, hh, ww = lr_frames.shape
        t, h, w = f // 4, hh // 8, ww // 8
        g = lr_frames.reshape(b, c, t, 4, h, 8, w, 8).permute(0, 1, 3, 5, 7, 2, 4, 6)
        g = g.reshape(b, c * 4 * 64, t, h, w)
        return torch.cat([g.to(latents.device, latents.dtype), latents], dim=1)

    @torch.no_grad()
    def decode_full(self, latents: torch.Tensor, lr_frames: torch.Tensor) -> torch.Tensor:
        """The whole clip in one pass: (B, 1 + 4 (T - 1), 3, H, W) frames in [0, 1]."""
        return super().decode_full(self.condition(latents, lr_frames))

    @torch.no_grad()
    def decode_step(self, latents: torch.Tensor, lr_frames: torch.Tensor) -> torch.Tensor:
        """The next latents of the clip with their LR frames (``lr_groups``)."""
        return super().decode_step(self.condition(latents, lr_frames))
