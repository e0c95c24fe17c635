"""Ulysses all-to-all: sequence-sharded Q/K/V to head-sharded attention and back.

Before self-attention each rank trades its tokens' Q/K/V heads for its own heads of every
group member's tokens (one all-to-all for K and V together, one for Q), attends over the whole
sequence with a slice of the heads, and trades back. Heads are zero-padded to a multiple of the
degree (Wan 1.3B: 12 heads on 8 ranks -> 16, two per rank; ranks 6 and 7 hold pad heads, which
costs no latency: some rank holds two heads whatever the split); tokens are padded as
``layout.TokenLayout`` describes. The KV cache is sharded by heads: each rank stores its heads
of every token, so cached K/V never cross ranks.
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


def all_to_all(send: torch.Tensor, group) -> torch.Tensor:
    """Exchange dim-0 chunks of ``send`` with the group's ranks (chunk j goes to member j)."""
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv


def queries_to_heads(q: torch.Tensor, degree: int, group) -> torch.Tensor:
    """(B, Ls, H, D) sequence-sharded queries -> (B, degree * Ls, Hl, D), source-rank-major.

    Pad token slots stay in (their outputs are discarded on the way back).
    """
    b, ls, _, d = q.shape
    recv = all_to_all(pack_heads([q], degree), group)  # (degree, 1, B, Ls, Hl, D)
    return recv[:, 0].transpose(0, 1).reshape(b, degree * ls, -1, d)


def heads_to_sequence(out: torch.Tensor, num_heads: int, degree: int, group) -> torch.Tensor:
    """Inverse of ``queries_to_heads``: (B, degree * Ls, Hl, D) -> (B, Ls, H, D)."""
    b, length, hl, d = out.shape
    ls = length // degree
    send = out.reshape(b, degree, ls, hl, d).transpose(0, 1).contiguous()
    recv = all_to_all(send, group)  # (degree: head chunk, B, Ls, Hl, D)
    return recv.permute(1, 2, 0, 3, 4).reshape(b, ls, degree * hl, d)[:, :, :num_heads]


def keys_to_heads(k, v, layout, num_frames: int, group) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, Ls, H, D) sequence-sharded K/V -> this rank's heads of the group's real tokens.

    Returns (B, F * group_tokens, Hl, D) each, frame-major (cache order), pads dropped.
    """
    b, _, _, d = k.shape
    recv = all_to_all(pack_heads([k, v], layout.ulysses), group)  # (u, 2, B, Ls, Hl, D)
    rows = recv.view(-1, recv.shape[-2], d)
    idx = layout.group_select(num_frames, b, 2, k.device)  # (2, B, F * m)
    picked = rows.index_select(0, idx.flatten()).view(2, b, idx.shape[-1], -1, d)
    return picked[0], picked[1]
