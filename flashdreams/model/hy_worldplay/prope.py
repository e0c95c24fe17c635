"""Projective positional encoding (PRoPE) of HY-WorldPlay's second attention branch.

Every latent frame is a camera with a world-to-camera matrix ``W`` and normalized pinhole
intrinsics ``K`` (focal lengths only: the principal point is dropped). With
``P = lift(K) @ W`` (image <- world, 4x4) the branch transforms, per frame and per group of 4
channels of each head, the queries by ``P^T``, the keys and values by ``P^-1`` and the
attention output by ``P`` (PRoPE, Li et al. 2025). Keys and values depend only on their own
frame's camera, so they can be cached like RoPE keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FOCAL_FLOOR = 1e-6  # zero focal lengths (graph pre-capture stand-ins) stay finite


@dataclass
class PropeMatrices:
    """Per-frame transforms of one forward: (B, F, 4, 4) fp32 each."""

    q: torch.Tensor  # P^T
    kv: torch.Tensor  # P^-1
    o: torch.Tensor  # P


def _lift(m3: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(*m3.shape[:-2], 4, 4, dtype=m3.dtype, device=m3.device)
    out[..., :3, :3] = m3
    out[..., 3, 3] = 1.0
    return out


def _invert_rigid(w2c: torch.Tensor) -> torch.Tensor:
    """Inverse of a rigid 4x4 transform through its rotation's transpose."""
    rot_t = w2c[..., :3, :3].transpose(-1, -2)
    out = torch.zeros_like(w2c)
    out[..., :3, :3] = rot_t
    out[..., :3, 3] = -(rot_t @ w2c[..., :3, 3:]).squeeze(-1)
    out[..., 3, 3] = 1.0
    return out


def prope_matrices(viewmats: torch.Tensor, intrinsics: torch.Tensor) -> PropeMatrices:
    """The PRoPE transforms of every frame.

    Args:
        viewmats: (B, F, 4, 4) world-to-camera matrices.
        intrinsics: (B, F, 3, 3) normalized intrinsics (fx / width, fy / height, ...): only
            ``[0, 0]`` and ``[1, 1]`` are read.
    """
    w2c = viewmats.float()
    fx = intrinsics[..., 0, 0].float().clamp_min(FOCAL_FLOOR)
    fy = intrinsics[..., 1, 1].float().clamp_min(FOCAL_FLOOR)
    zeros = torch.zeros_like(fx)
    ones = torch.ones_like(fx)
    k = torch.stack([fx, zeros, zeros, zeros, fy, zeros, zeros, zeros, ones], -1)
    k_inv = torch.stack([1 / fx, zeros, zeros, zeros, 1 / fy, zeros, zeros, zeros, ones], -1)
    p = _lift(k.unflatten(-1, (3, 3))) @ w2c
    p_inv = _invert_rigid(w2c) @ _lift(k_inv.unflatten(-1, (3, 3)))
    return PropeMatrices(q=p.transpose(-1, -2), kv=p_inv, o=p)


def apply_tiled(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Apply a per-frame 4x4 ``matrix`` to every group of 4 channels of ``x``.

    Args:
        x: (B, L, H, D) tokens of F frames in frame-major order (L = F * S), D % 4 == 0.
        matrix: (B, F, 4, 4).

    Returns:
        (B, L, H, D) in x's dtype (computed in fp32).
    """
    b, length, heads, dim = x.shape
    frames = matrix.shape[1]
    groups = x.float().reshape(b, frames, length // frames, heads, dim // 4, 4)
    if torch.compiler.is_compiling():
        out = _tiled_pointwise(matrix.float(), groups)
    else:
        out = torch.einsum("bfij,bfshgj->bfshgi", matrix.float(), groups)
    return out.reshape(b, length, heads, dim).to(x.dtype)


def _tiled_pointwise(matrix: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """``apply_tiled``'s product as 16 multiply-adds per group of 4, written out so Inductor
    fuses it with the casts around it into one memory-bound kernel. As an einsum, Inductor
    hands this K = 4 product to cuBLAS as a batched fp32 GEMM, which runs on CUDA cores
    (H200, HY-WorldPlay fast recipe: 600 such calls, ~129 ms of a 1.41 s step).

    Args:
        matrix: (B, F, 4, 4) fp32; groups: (B, F, S, H, G, 4) fp32.
    """
    m = matrix[:, :, None, None, None]  # (B, F, 1, 1, 1, 4, 4)
    rows = []
    for i in range(4):
        acc = m[..., i, 0] * groups[..., 0]
        for j in range(1, 4):
            acc = acc + m[..., i, j] * groups[..., j]
        rows.append(acc)
    return torch.stack(rows, dim=-1)
