"""Cosmos' 3-D rotary embedding: per-axis NTK-scaled bases, rotate-half layout.

The head dim splits as Wan's (44 / 42 / 42 for 128: frame, height, width). Each axis has its
own base ``10000 * ratio ** (d / (d - 2))`` (Cosmos' "extrapolation ratio": 3.0 on height and
width for Predict2.5, so a 704x1280 clip sees the angles of a smaller training grid), and the
frame angle may be modulated by the frame rate (``pos * base_fps / fps``). The rotation acts on
the two halves of the head dim (``[x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin]``), not on
interleaved pairs as Wan's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flashdreams import ConfigError
from flashdreams.model.layers import rope_axis_dims


def axis_inv_freqs(dim: int, ratio: float, theta: float = 10000.0) -> torch.Tensor:
    """Inverse frequencies (dim // 2,) fp64 of one axis with the NTK-scaled base."""
    base = theta * ratio ** (dim / (dim - 2))
    return 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64)[: dim // 2] / dim)


class CosmosRope3D:
    """Cos/sin tables over (frame, height, width) at absolute frame positions.

    Args:
        head_dim: dims per attention head.
        scale: extrapolation ratios (frame, height, width); Predict2.5: (1, 3, 3).
        fps_modulation: scale frame positions by ``base_fps / fps`` (off for Predict2.5).
        base_fps: the frame rate frame positions are expressed in when modulated.
        fps: the clip's frame rate (used only with ``fps_modulation``).
    """

    def __init__(self, head_dim: int, scale: Sequence[float] = (1.0, 3.0, 3.0),
                 fps_modulation: bool = False, base_fps: float = 24.0,
                 fps: float = 24.0) -> None:  # fmt: skip
        self.head_dim = head_dim
        self.dims = rope_axis_dims(head_dim)
        self.scale = tuple(float(r) for r in scale)
        if len(self.scale) != 3:
            raise ConfigError(f"model.rope_scale={list(scale)} needs 3 ratios (frame, height, "
                              "width)")  # fmt: skip
        self.frame_scale = float(base_fps) / float(fps) if fps_modulation else 1.0
        self._tables: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def _inv(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """Per-axis inverse frequencies on ``device``, made on first use (plain tensors, not
        buffers: a model built on the meta device needs no re-initialisation)."""
        if device not in self._tables:
            wide = torch.float32 if device.type == "mps" else torch.float64
            with torch.device("cpu"):  # not the meta device a model may be built under
                inv = [axis_inv_freqs(d, r) for d, r in zip(self.dims, self.scale, strict=True)]
            self._tables[device] = tuple(i.to(device=device, dtype=wide) for i in inv)
        return self._tables[device]

    def cos_sin(self, frame_positions: torch.Tensor, height: int,
                width: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Tables for the tokens of frames at ``frame_positions`` in (f, h, w) order.

        Returns:
            cos, sin: (F * height * width, head_dim // 2) fp32; the angles of the first half
            of the head dim (the second half repeats them).
        """
        inv_f, inv_h, inv_w = self._inv(frame_positions.device)
        dev, dt = inv_f.device, inv_f.dtype
        num_f = frame_positions.shape[0]
        ang_f = (frame_positions.to(dt) * self.frame_scale)[:, None] * inv_f[None]
        ang_h = torch.arange(height, device=dev, dtype=dt)[:, None] * inv_h[None]
        ang_w = torch.arange(width, device=dev, dtype=dt)[:, None] * inv_w[None]
        ang = torch.cat([
            ang_f[:, None, None, :].expand(num_f, height, width, -1),
            ang_h[None, :, None, :].expand(num_f, height, width, -1),
            ang_w[None, None, :, :].expand(num_f, height, width, -1),
        ], dim=-1).reshape(num_f * height * width, -1)  # fmt: skip
        return torch.cos(ang).float(), torch.sin(ang).float()


def apply_rope_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of the head dim in fp32.

    Args:
        x: (B, L, H, D) queries or keys.
        cos: (L, D // 2).
        sin: (L, D // 2).

    Returns:
        (B, L, H, D) rotated tensor in x's dtype.
    """
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
