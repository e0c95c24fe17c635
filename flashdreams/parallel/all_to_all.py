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

With ``overlap=True`` (``parallel.async_qkv``) the exchanges are issued with ``async_op=True``
and waited on only when their result is needed, so the work queued in between runs while the
bytes move: K's exchange is in flight while V is packed, V's while K's rows are picked, and
``ShardedSequence`` attends one chunk of its heads while the next chunk's queries and the
previous chunk's output are on the wire. Every value is the same as the synchronous path's
(the fp8 scales are per head, so splitting by tensor or head changes no scale).
"""

from __future__ import annotations

from collections.abc import Callable

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


class Pending:
    """An all-to-all in flight: ``wait()`` returns what ``all_to_all`` would have returned.

    Holds the send and receive buffers until then, so nothing in flight is freed or reused.
    """

    def __init__(self, works: list, buffers: tuple, finish: Callable[[], torch.Tensor]) -> None:
        self.works, self.buffers, self.finish = works, buffers, finish

    def wait(self) -> torch.Tensor:
        for work in self.works:
            work.wait()
        out = self.finish()
        self.works, self.buffers = [], ()
        return out


def start_all_to_all(send: torch.Tensor, group, fp8: bool = False) -> Pending:
    """``all_to_all`` issued with ``async_op=True``; ``.wait()`` on the result gives its value."""
    if fp8:
        payload, scale = (t.contiguous() for t in quantize_heads(send))
        recv_payload, recv_scale = torch.empty_like(payload), torch.empty_like(scale)
        works = [dist.all_to_all_single(recv_payload, payload, group=group, async_op=True),
                 dist.all_to_all_single(recv_scale, scale, group=group, async_op=True)]  # fmt: skip
        dtype = send.dtype
        return Pending(works, (payload, scale, recv_payload, recv_scale),
                       lambda: dequantize_heads(recv_payload, recv_scale, dtype))  # fmt: skip
    send = send.contiguous()
    recv = torch.empty_like(send)
    work = dist.all_to_all_single(recv, send, group=group, async_op=True)
    return Pending([work], (send, recv), lambda: recv)


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


def keys_to_heads(k, v, layout, num_frames: int, group, fp8: bool = False,
                  overlap: bool = False) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(B, Ls, H, D) sequence-sharded K/V -> this rank's heads of the group's real tokens.

    Returns (B, F * group_tokens, Hl, D) each, frame-major (cache order), pads dropped.
    ``overlap``: K and V as two asynchronous exchanges (V packed while K moves, K's rows
    picked while V moves) instead of one.
    """
    b, _, _, d = k.shape
    u = layout.ulysses
    if overlap:
        moving = [start_all_to_all(pack_heads([k], u), group, fp8)]
        moving.append(start_all_to_all(pack_heads([v], u), group, fp8))
        idx = layout.group_select(num_frames, b, 1, k.device).flatten()  # (B * F * m,)
        k, v = (_pick(p.wait(), idx, b) for p in moving)  # k's rows picked before v's wait
        return k, v
    recv = all_to_all(pack_heads([k, v], u), group, fp8)  # (u, 2, B, Ls, Hl, D)
    picked = _pick(recv, layout.group_select(num_frames, b, 2, k.device).flatten(), 2 * b)
    return picked[:b], picked[b:]


def _pick(recv: torch.Tensor, idx: torch.Tensor, rows: int) -> torch.Tensor:
    """Token rows ``idx`` of a receive buffer (..., Hl, D) as (rows, -1, Hl, D)."""
    flat = recv.view(-1, recv.shape[-2], recv.shape[-1])
    return flat.index_select(0, idx).view(rows, -1, recv.shape[-2], recv.shape[-1])


def overlapped_attention(q: torch.Tensor, attend: Callable[[torch.Tensor, int, int], torch.Tensor],
                         degree: int, group, fp8: bool = False,
                         chunks: int = 2) -> torch.Tensor:  # fmt: skip
    """``queries_to_heads`` -> attention -> ``heads_to_sequence``, pipelined over head chunks.

    This rank's ``Hl`` heads are split into ``chunks`` (at most ``Hl``) contiguous groups; every
    group's query exchange is issued at once, and each group is attended as soon as its queries
    arrive, its output sent back asynchronously while the next group is attended.

    Args:
        q: (B, Ls, H, D) sequence-sharded queries.
        attend: ``attend(q_heads, first, stop)``: attention of queries (B, degree * Ls,
            stop - first, D) for local heads ``first:stop`` (the callee slices its K/V).
        degree, group, fp8: as ``queries_to_heads``.
        chunks: head groups.

    Returns:
        (B, Ls, H, D), equal to the unpipelined path's.
    """
    b, ls, h, d = q.shape
    hl = local_heads(h, degree)
    n = min(chunks, hl)
    spans = [(hl * i // n, hl * (i + 1) // n) for i in range(n)]
    send = pack_heads([q], degree)  # (degree, 1, B, Ls, Hl, D)
    queries = [start_all_to_all(send[..., a:z, :], group, fp8) for a, z in spans]
    outputs = []
    for (a, z), moving in zip(spans, queries, strict=True):
        qc = moving.wait()[:, 0].transpose(0, 1).reshape(b, degree * ls, z - a, d)
        out = attend(qc, a, z).reshape(b, degree, ls, z - a, d).transpose(0, 1)
        outputs.append(start_all_to_all(out, group, fp8))
    recv = torch.cat([moving.wait() for moving in outputs], dim=-2)  # (degree, B, Ls, Hl, D)
    return recv.permute(1, 2, 0, 3, 4).reshape(b, ls, degree * hl, d)[:, :, :h]
