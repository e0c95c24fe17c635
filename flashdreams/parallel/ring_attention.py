"""Ring attention: K/V chunks passed rank to rank, partial outputs merged by log-sum-exp.

Every rank of a ring holds the queries of its tokens and one chunk of the keys (its shard of
the KV cache, or of the block). In ``ring`` steps each rank attends its queries to the chunk in
hand while the next chunk is already in flight (non-blocking send to the next rank, receive
from the previous one), then folds the partial result into a running output with the chunk's
log-sum-exp. Chunks may differ in length between ranks (uneven token splits); every length is
known from the layout, so no sizes are exchanged.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_aten = torch.ops.aten
_HALF = (torch.float16, torch.bfloat16)


def attention_lse(q, k, v, kernel: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention that also returns the log-sum-exp of the scores.

    Args:
        q: (B, H, Lq, D) queries.
        k: (B, H, Lk, D) keys.
        v: (B, H, Lk, D) values.
        kernel: preferred CUDA kernel (``cudnn``, ``flash``, ``efficient``; ``auto``/``math``
            pick flash for half precision, else efficient).

    Returns:
        out (B, H, Lq, D) in q's dtype, lse (B, H, Lq) fp32.
    """
    b, h, lq, _ = q.shape
    if q.device.type != "cuda":
        out, lse = _aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[:2]
    elif kernel == "cudnn" and q.dtype in _HALF:
        out, lse = _aten._scaled_dot_product_cudnn_attention(q, k, v, None, True)[:2]
    elif kernel != "efficient" and q.dtype in _HALF:
        out, lse = _aten._scaled_dot_product_flash_attention(q, k, v)[:2]
    else:
        out, lse = _aten._scaled_dot_product_efficient_attention(q, k, v, None, True)[:2]
    return out, lse.reshape(b, h, -1)[..., :lq].float()


def merge(out, lse, part, part_lse):
    """Fold one chunk's (out, lse) into the running fp32 (out, lse); None starts the fold."""
    if out is None:
        return part.float(), part_lse
    new = torch.logaddexp(lse, part_lse)
    keep, add = torch.exp(lse - new).unsqueeze(-1), torch.exp(part_lse - new).unsqueeze(-1)
    out = out * keep + part.float() * add
    return out, new


def ring_attention(q, k, v, *, ranks: list[int], index: int, chunk_lengths: list[int], group,
                   kernel: str = "auto") -> torch.Tensor:  # fmt: skip
    """Attention of this rank's queries over the keys of every rank of its ring.

    Args:
        q: (B, Lq, H, D) this rank's queries.
        k: (B, Lk, H, D) this rank's chunk of the keys.
        v: (B, Lk, H, D) its values.
        ranks: global ranks of the ring, in ring order.
        index: this rank's position in ``ranks``.
        chunk_lengths: key count of each ring member's chunk (``chunk_lengths[index] == Lk``).
        group: the ring's process group.
        kernel: preferred kernel of ``attention_lse``.

    Returns:
        (B, Lq, H, D) attention output in q's dtype.
    """
    size = len(ranks)
    nxt, prv = ranks[(index + 1) % size], ranks[(index - 1) % size]
    qt = q.transpose(1, 2)
    cur_k, cur_v = k.contiguous(), v.contiguous()
    out = lse = None
    for step in range(size):
        pending = []
        if step + 1 < size:  # start moving the next chunk before computing on this one
            length = chunk_lengths[(index - step - 1) % size]
            shape = (k.shape[0], length, *k.shape[2:])
            nk, nv = k.new_empty(shape), v.new_empty(shape)
            pending = dist.batch_isend_irecv([
                dist.P2POp(dist.isend, cur_k, nxt, group, tag=0),
                dist.P2POp(dist.isend, cur_v, nxt, group, tag=1),
                dist.P2POp(dist.irecv, nk, prv, group, tag=0),
                dist.P2POp(dist.irecv, nv, prv, group, tag=1),
            ])  # fmt: skip
        part, part_lse = attention_lse(qt, cur_k.transpose(1, 2), cur_v.transpose(1, 2), kernel)
        out, lse = merge(out, lse, part, part_lse)
        for work in pending:
            work.wait()
        if pending:
            cur_k, cur_v = nk, nv
    return out.transpose(1, 2).to(q.dtype)
