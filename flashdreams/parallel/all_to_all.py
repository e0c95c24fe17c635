"""Ulysses all-to-all: sequence-sharded Q/K/V to head-sharded attention and back.

Before self-attention each rank trades its tokens' Q/K/V heads for its own heads of every
group member's tokens (one all-to-all for K and V together, one for Q), attends over the whole
sequence with a slice of the heads, and trades back. Heads are zero-padded to a multiple of the
degree (Wan 1.3B: 12 heads on 8 ranks -> 16, two per rank; ranks 6 and 7 hold pad heads, which
costs no latency: some rank holds two heads whatever the split); tokens are padded as
``layout.TokenLayout`` describes. The KV cache is sharded by heads: each rank stores its heads
of every token, so cached K/V never cross ranks.

With ``fp8=True`` (``parallel.fp8_all_to_all``) every exchange (Q, K/V and the attention output
O) sends float8 e4m3 with one float32 scale per (destination rank, tensor, head) instead of the
model's dtype: half the bytes of bf16 on the wire, at e4m3's rounding (relative error <= 2**-4
per element; the scales are exchanged beside the payload, a few bytes per head).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def local_heads(num_heads: int, degree: int) -> int:
    """Heads per rank after padding ``num_heads`` to a multiple of ``degree``."""
    return -(-num_heads // degree)


def pack_heads(xs: list[torch.Tensor], degree: int) -> torch.Tensor:
    """Send buffer (degree, N, B, Ls, Hl, D) of N tensors (B, Ls, H, D): head chunk j for rank j."""
    b, ls, h, d = xs[0].shape
    hl = local_heads(h, degree)
    send = xs[0].new_empty(degree, len(xs), b, ls, hl, d)
    for i, x in enumerate(xs):
        if hl * degree != h:
            x = F.pad(x, (0, 0, 0, hl * degree - h))
        send[:, i].copy_(x.view(b, ls, degree, hl, d).permute(2, 0, 1, 3, 4))
    return send


E4M3_MAX = 448.0  # largest finite float8 e4m3fn value


def all_to_all(send: torch.Tensor, group, fp8: bool = False) -> torch.Tensor:
    """Exchange dim-0 chunks of ``send`` with the group's ranks (chunk j goes to member j).

    ``send`` is (degree, ..., H, D) with heads second to last; ``fp8``: exchange it as e4m3
    with a scale per head of each leading index (see the module doc), returned in its dtype.
    """
    if fp8:
        return _all_to_all_fp8(send, group)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv


def quantize_heads(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(degree, [N,] B, L, H, D) -> (e4m3 payload as uint8, float32 scales (degree, [N,] H)).

    One scale per head of each leading (destination, tensor) index: its amax over B, L, D / 448.
    """
    lead = x.dim() - 4  # 1 (degree) or 2 (degree, N)
    amax = x.abs().float().amax(dim=(lead, lead + 1, x.dim() - 1))  # (degree, [N,] H)
    scale = (amax / E4M3_MAX).clamp_min(1e-12)
    view = scale.view(*scale.shape[:lead], 1, 1, scale.shape[-1], 1)
    payload = (x.float() / view).to(torch.float8_e4m3fn).view(torch.uint8)
    return payload, scale


def dequantize_heads(payload: torch.Tensor, scale: torch.Tensor, dtype) -> torch.Tensor:
    """Inverse of ``quantize_heads`` up to e4m3 rounding."""
    lead = payload.dim() - 4
    view = scale.view(*scale.shape[:lead], 1, 1, scale.shape[-1], 1)
    return (payload.view(torch.float8_e4m3fn).float() * view).to(dtype)


def _all_to_all_fp8(send: torch.Tensor, group) -> torch.Tensor:
    payload, scale = quantize_heads(send)
    recv_payload, recv_scale = torch.empty_like(payload), torch.empty_like(scale)
    dist.all_to_all_single(recv_payload, payload.contiguous(), group=group)
    dist.all_to_all_single(recv_scale, scale.contiguous(), group=group)
    return dequantize_heads(recv_payload, recv_scale, send.dtype)


def queries_to_heads(q: torch.Tensor, degree: int, group, fp8: bool = False) -> torch.Tensor:
    """(B, Ls, H, D) sequence-sharded queries -> (B, degree * Ls, Hl, D), source-rank-major.

    Pad token slots stay in (their outputs are discarded on the way back).
    """
    b, ls, _, d = q.shape
    recv = all_to_all(pack_heads([q], degree), group, fp8)  # (degree, 1, B, Ls, Hl, D)
    return recv[:, 0].transpose(0, 1).reshape(b, degree * ls, -1, d)


def heads_to_sequence(out: torch.Tensor, num_heads: int, degree: int, group,
                      fp8: bool = False) -> torch.Tensor:  # fmt: skip
    """Inverse of ``queries_to_heads``: (B, degree * Ls, Hl, D) -> (B, Ls, H, D)."""
    b, length, hl, d = out.shape
    ls = length // degree
    send = out.reshape(b, degree, ls, hl, d).transpose(0, 1).contiguous()
    recv = all_to_all(send, group, fp8)  # (degree: head chunk, B, Ls, Hl, D)
    return recv.permute(1, 2, 0, 3, 4).reshape(b, ls, degree * hl, d)[:, :, :num_heads]


def keys_to_heads(k, v, layout, num_frames: int, group,
                  fp8: bool = False) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(B, Ls, H, D) sequence-sharded K/V -> this rank's heads of the group's real tokens.

    Returns (B, F * group_tokens, Hl, D) each, frame-major (cache order), pads dropped.
    """
    b, _, _, d = k.shape
    recv = all_to_all(pack_heads([k, v], layout.ulysses), group, fp8)  # (u, 2, B, Ls, Hl, D)
    rows = recv.view(-1, recv.shape[-2], d)
    idx = layout.group_select(num_frames, b, 2, k.device)  # (2, B, F * m)
    picked = rows.index_select(0, idx.flatten()).view(2, b, idx.shape[-1], -1, d)
    return picked[0], picked[1]
