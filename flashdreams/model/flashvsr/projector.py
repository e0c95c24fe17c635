"""FlashVSR's low-resolution projector (``Buffer_LQ4x_Proj``): LR pixels -> DiT-width tokens.

The LR video arrives already upscaled to the output size (bicubic, [-1, 1]). Each group of 4
frames is pixel-unshuffled by 16 x 16 (3 -> 768 channels, one position per DiT token), then two
causal Conv3d (kernel (4, 3, 3), temporal stride 2) with channel RMS norms and SiLU reduce it to
one latent frame of 3072-channel features, and per-layer Linears map them to the DiT width
(``layer_num``: 1 in the v1.1 release, whose features are added before block 0).

Streaming: the release refreshes each convolution's causal cache from the *current* group
before the convolution reads it (``cache = x[:, :, -2:]`` is set, then ``conv(x, cache)``), so a
group's front padding is its own last two frames and no state crosses groups. The projector is
therefore exactly group-local: latent frame ``j`` depends on LR frames ``4j+1 .. 4j+4`` only
(LR frame 0 feeds the release's warm-up group, whose output is discarded). ``LRProjector``
reproduces that behaviour; ``stream`` and ``forward`` are the same computation by construction,
and a test checks it. The state-dict names are the release's (``LQ_proj_in.ckpt``):
``conv1.weight``, ``conv1.bias``, ``norm1.gamma``, ``conv2.*``, ``norm2.gamma``,
``linear_layers.N.{weight,bias}``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flashdreams import ConfigError

#: LR frames per latent frame (the Wan VAE's temporal factor)
FRAMES_PER_LATENT = 4
#: spatial pixel-unshuffle factor (VAE factor 8 x patch 2: one position per DiT token)
UNSHUFFLE = 16


class ChannelRMSNorm(nn.Module):
    """RMS norm over the channel axis of (B, C, F, H, W): ``normalize * sqrt(C) * gamma``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


class GroupCausalConv3d(nn.Conv3d):
    """Conv3d (kernel (4, 3, 3), stride (2, 1, 1)) whose 2 front frames of temporal padding
    are the input's own last 2 frames (the release's cache refresh), spatial padding replicate."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        front = 2 * self.padding[0]
        x = torch.cat([x[:, :, -front:], x], dim=2) if front else x
        ph, pw = self.padding[1], self.padding[2]
        x = F.pad(x, (pw, pw, ph, ph, 0, 0), mode="replicate")
        return F.conv3d(x, self.weight, self.bias, self.stride, 0)


class LRProjector(nn.Module):
    """``Buffer_LQ4x_Proj`` with the release's shapes (3 -> 768 -> 2048 -> 3072 -> dim).

    Args:
        in_dim: LR channels (3).
        out_dim: DiT width (1536).
        layer_num: per-layer output Linears (1 in v1.1: added before block 0).
        hidden_dim1: width after the first convolution (2048).
        hidden_dim2: width after the second convolution (3072).
    """

    def __init__(self, in_dim: int = 3, out_dim: int = 1536, layer_num: int = 1,
                 hidden_dim1: int = 2048, hidden_dim2: int = 3072) -> None:  # fmt: skip
        super().__init__()
        if layer_num < 1:
            raise ConfigError(f"control.lr_layers={layer_num} must be >= 1")
        self.in_dim, self.out_dim, self.layer_num = in_dim, out_dim, layer_num
        unshuffled = in_dim * UNSHUFFLE * UNSHUFFLE
        conv = dict(kernel_size=(4, 3, 3), stride=(2, 1, 1), padding=(1, 1, 1))
        self.conv1 = GroupCausalConv3d(unshuffled, hidden_dim1, **conv)
        self.norm1 = ChannelRMSNorm(hidden_dim1)
        self.conv2 = GroupCausalConv3d(hidden_dim1, hidden_dim2, **conv)
        self.norm2 = ChannelRMSNorm(hidden_dim2)
        self.linear_layers = nn.ModuleList(nn.Linear(hidden_dim2, out_dim)
                                           for _ in range(layer_num))  # fmt: skip

    @staticmethod
    def unshuffle(x: torch.Tensor) -> torch.Tensor:
        """(B, C, F, H, W) -> (B, C * 16 * 16, F, H / 16, W / 16), channels (c, hh, ww)."""
        b, c, f, h, w = x.shape
        s = UNSHUFFLE
        x = x.view(b, c, f, h // s, s, w // s, s).permute(0, 1, 4, 6, 2, 3, 5)
        return x.reshape(b, c * s * s, f, h // s, w // s)

    def features(self, groups: torch.Tensor) -> torch.Tensor:
        """(B, 3, 4 n, H, W) LR frames -> (B, 3072, n, H / 16, W / 16), one latent frame per
        group of 4 frames, each group on its own (see the module doc)."""
        b, c, f, h, w = groups.shape
        n = f // FRAMES_PER_LATENT
        dtype = self.conv1.weight.dtype
        x = groups.to(dtype).view(b, c, n, FRAMES_PER_LATENT, h, w).transpose(1, 2)
        x = self.unshuffle(x.reshape(b * n, c, FRAMES_PER_LATENT, h, w))  # groups as batch
        x = F.silu(self.norm1(self.conv1(x)))  # (B n, 2048, 2, h, w)
        x = F.silu(self.norm2(self.conv2(x)))  # (B n, 3072, 1, h, w)
        return x.view(b, n, *x.shape[1:]).squeeze(3).transpose(1, 2)

    def forward(self, groups: torch.Tensor) -> torch.Tensor:
        """(B, 3, 4 n, H, W) LR frames (in [-1, 1], at the output size) -> (B, layer_num,
        n * H/16 * W/16, out_dim) tokens in (frame, h, w) order, one set per DiT layer."""
        if groups.shape[2] % FRAMES_PER_LATENT:
            raise ValueError(f"LR frames {groups.shape[2]} are not a multiple of 4")
        h, w = groups.shape[-2:]
        if h % UNSHUFFLE or w % UNSHUFFLE:
            raise ValueError(f"LR frames {h}x{w} are not multiples of {UNSHUFFLE}")
        x = self.features(groups).flatten(2).transpose(1, 2)  # (B, n h w, 3072)
        return torch.stack([lin(x) for lin in self.linear_layers], dim=1)

    def clip(self, video: torch.Tensor) -> torch.Tensor:
        """Whole clip, the release's way: (B, 3, 8k + 1 (or 4n + 1), H, W) LR frames -> the
        features of its ``(T - 1) // 4`` latent frames (frame 0 only warms the release's cache)."""
        n = (video.shape[2] - 1) // FRAMES_PER_LATENT
        return self(video[:, :, 1 : 1 + FRAMES_PER_LATENT * n])

    def stream(self, video: torch.Tensor, start: int, num: int) -> torch.Tensor:
        """Features of latent frames [start, start + num) of a clip's LR ``video``: LR frames
        ``4 start + 1 .. 4 (start + num)`` (what the release's ``stream_forward`` reads)."""
        lo = FRAMES_PER_LATENT * start + 1
        return self(video[:, :, lo : lo + FRAMES_PER_LATENT * num])
