"""Building blocks of the Wan DiT: norms, RoPE, sinusoidal embeddings, modulation.

Numerics follow the Wan reference: norms, modulation and the residual stream run in fp32,
matmuls run in the weights' dtype (bf16 in production).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """RMS norm over the last dim with a learned scale (Wan's q/k norm across all heads)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return out * self.weight.to(x.dtype)


def layer_norm_fp32(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """LayerNorm computed in fp32 (with the module's affine parameters, if any)."""
    weight = None if norm.weight is None else norm.weight.float()
    bias = None if norm.bias is None else norm.bias.float()
    return F.layer_norm(x.float(), norm.normalized_shape, weight, bias, norm.eps)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per-frame adaLN modulation in fp32.

    Args:
        x: (B, F, S, C) normalized tokens, S tokens per frame.
        shift: (B, F, C).
        scale: (B, F, C).
    """
    return x * (1 + scale.unsqueeze(2)) + shift.unsqueeze(2)


def gated_residual(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None = None
) -> torch.Tensor:
    """``x + y [* gate]`` in fp32: (B, L, C) tokens, gate (B, F, C) per frame (S = L / F tokens
    each), None for a plain residual add."""
    if gate is None:
        return x.float() + y.float()
    y = y.float().unflatten(1, (gate.shape[1], -1)) * gate.float().unsqueeze(2)
    return x.float() + y.flatten(1, 2)


def sinusoidal_embedding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """Wan's timestep embedding: [cos, sin] of t * 10000^(-i/half), in fp32.

    Args:
        timesteps: (N,) float timesteps in [0, 1000].
        dim: embedding width (freq_dim, 256 for Wan).

    Returns:
        (N, dim) fp32 embedding.
    """
    half = dim // 2
    exponent = -math.log(10000.0) * torch.arange(half, device=timesteps.device, dtype=torch.float32)
    freqs = torch.exp(exponent / half)
    args = timesteps.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Split of the head dims between the (frame, height, width) RoPE axes: 44/42/42 for 128."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope_freqs(max_pos: int, dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Angles (max_pos, dim // 2) of 1-D RoPE along one axis, in fp64 for exact tables."""
    inv = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    return torch.outer(torch.arange(max_pos, dtype=torch.float64), inv)


class Rope3D:
    """3-D rotary embedding over (frame, height, width) at absolute frame positions.

    Height/width angles come from fp64 tables of ``max_pos`` rows cached per device (plain
    tensors, not buffers, so a model built on the meta device needs no re-initialisation). Frame
    angles are computed from the positions themselves in fp64, so frame positions are unbounded:
    an endless stream never runs out of RoPE range, and a position p gives exactly the angles a
    table row p would. Rotation acts on interleaved pairs of the head dim.
    """

    def __init__(self, head_dim: int, max_pos: int = 1024, theta: float = 10000.0) -> None:
        self.head_dim = head_dim
        self.max_pos = max_pos
        self.theta = theta
        self._tables: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def _angles(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        if device not in self._tables:
            dim_f, dim_h, dim_w = rope_axis_dims(self.head_dim)
            wide = torch.float32 if device.type == "mps" else torch.float64
            inv_f = 1.0 / self.theta ** (torch.arange(0, dim_f, 2, dtype=torch.float64) / dim_f)
            self._tables[device] = (
                inv_f.to(device=device, dtype=wide),
                rope_freqs(self.max_pos, dim_h, self.theta).float().to(device),
                rope_freqs(self.max_pos, dim_w, self.theta).float().to(device),
            )
        return self._tables[device]

    def cos_sin(
        self, frame_positions: torch.Tensor, height: int, width: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cos/sin tables for the tokens of frames at ``frame_positions`` (f, h, w order).

        Args:
            frame_positions: (F,) long absolute frame indices (device tensor), any value.
            height: latent tokens per column (at most ``max_pos``).
            width: latent tokens per row (at most ``max_pos``).

        Returns:
            cos, sin: (F * height * width, head_dim // 2) fp32.
        """
        inv_f, ang_h, ang_w = self._angles(frame_positions.device)
        num_f = frame_positions.shape[0]
        ang_f = frame_positions.to(inv_f.dtype)[:, None] * inv_f[None]  # exact in fp64
        parts = []
        for fn in (torch.cos, torch.sin):
            f = fn(ang_f).float()[:, None, None, :].expand(num_f, height, width, -1)
            h = fn(ang_h[:height])[None, :, None, :].expand(num_f, height, width, -1)
            w = fn(ang_w[:width])[None, None, :, :].expand(num_f, height, width, -1)
            parts.append(torch.cat([f, h, w], dim=-1).reshape(num_f * height * width, -1))
        return parts[0], parts[1]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of the head dim in fp32.

    Args:
        x: (B, L, H, D) queries or keys.
        cos: (L, D // 2).
        sin: (L, D // 2).

    Returns:
        (B, L, H, D) rotated tensor in x's dtype.
    """
    pairs = x.float().unflatten(-1, (-1, 2))  # (B, L, H, D/2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos = cos[None, :, None, :]
    sin = sin[None, :, None, :]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)


@torch.library.custom_op("flashdreams::linear_gelu_tanh", mutates_args=())
def linear_gelu_tanh(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``gelu_tanh(x @ weight.T + bias)`` as one GEMM on CUDA: cuBLASLt's GELU+bias epilogue
    (the tanh approximation, applied to the fp32 accumulator), so the (L, ffn_dim) hidden layer
    is written once instead of written, read and written again by a separate GELU kernel.

    A custom op, so ``torch.compile`` keeps it whole (Inductor would otherwise split the GEMM
    from its activation). On CPU: the same math with separate ops.
    """
    flat = x.reshape(-1, x.shape[-1])
    if x.is_cuda and flat.shape[0] > 1:
        out = torch._addmm_activation(bias, flat, weight.t(), use_gelu=True)
    else:
        out = F.gelu(F.linear(flat, weight, bias), approximate="tanh")
    return out.view(*x.shape[:-1], weight.shape[0])


@linear_gelu_tanh.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


class LinearGeluTanh(nn.Module):
    """``nn.Sequential(linear, nn.GELU("tanh"))`` as one ``linear_gelu_tanh`` call; shares the
    linear's parameters (a loaded checkpoint stays valid)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_gelu_tanh(x.to(self.weight.dtype), self.weight, self.bias)
