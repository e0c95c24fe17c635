"""A Wan block's q/k RMS norm + RoPE as one pass (``qk_norm_rope``).

The q/k RMS norm runs across all heads of a token's row, then RoPE rotates interleaved pairs
of each head. Inductor's region for this math keeps near 0.8 TB/s (the pair shuffles of RoPE).
The kernel reads each rotated bf16 pair as one 32-bit word and unpacks it with two bit
operations, so its loads and stores stay contiguous and vectorized; its tiles are (rows, heads,
pairs), so a row's cos/sin are loaded once for all heads; q and k go through one launch.

Rounding follows the unfused modules step by step (the RMS norm rounded to the model dtype,
times the weight in the model dtype, rotated in fp32 and rounded). Without CUDA or Triton, or
where the layout does not fit the kernel, the unfused math runs; it is also the reference the
GPU tests compare the kernel with. A custom op, so ``torch.compile`` keeps the kernel whole.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flashdreams.kernels import as_rows, cuda_kernels, next_pow2, triton_kernels
from flashdreams.model.layers import apply_rope

# (rows per tile, warps); None: chosen from the row width (scripts/bench_fusions.py sweeps it)
TUNE: dict[str, tuple[int, int] | None] = {"qk": None}


def _config(block_j: int) -> tuple[int, int]:
    """Rows per tile (1024 words per tile at most 4 rows) and warps (256 words each, 4 to 8)."""
    if TUNE["qk"] is not None:
        return TUNE["qk"][:2]
    block_r = max(1, min(4, 1024 // block_j))
    return block_r, min(8, max(4, block_j * block_r // 256))


@triton_kernels
def _kernels(triton, tl):
    @triton.jit
    def qk_one(src, src_row, w_ptr, dst, c, s, r, jj, live, live_w, cols, eps):
        # (rows, heads, pairs) tiles: one int32 word = one rotated pair of bf16 values (even
        # element in the low half); a bf16's bits shifted up 16 are its fp32 value
        word = tl.load(
            src + r[:, None, None] * src_row + jj[None, :, :],
            mask=live,
            other=0,
            eviction_policy="evict_first",
        )
        x0 = (word << 16).to(tl.float32, bitcast=True)
        x1 = (word & -65536).to(tl.float32, bitcast=True)
        ss = tl.sum(tl.sum(x0 * x0 + x1 * x1, 2), 1)
        inv = tl.rsqrt(ss / cols + eps)[:, None, None]
        wword = tl.load(w_ptr + jj, mask=live_w, other=0, eviction_policy="evict_last")[None]
        w0 = (wword << 16).to(tl.float32, bitcast=True)
        w1 = (wword & -65536).to(tl.float32, bitcast=True)
        # the norm rounds to bf16, the weight multiplies in bf16 (as the RMSNorm module)
        y0 = ((x0 * inv).to(tl.bfloat16).to(tl.float32) * w0).to(tl.bfloat16).to(tl.float32)
        y1 = ((x1 * inv).to(tl.bfloat16).to(tl.float32) * w1).to(tl.bfloat16).to(tl.float32)
        o0 = (y0 * c - y1 * s).to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32)
        o1 = (y0 * s + y1 * c).to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32)
        out = (o1 << 16) | (o0 & 65535)
        tl.store(dst + r[:, None, None] * (cols // 2) + jj[None, :, :], out, mask=live)

    @triton.jit
    def qk_rows(q_ptr, k_ptr, wq_ptr, wk_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr,
                rows, cols, seq, q_row, k_row, eps,
                HALF: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr):  # fmt: skip
        BLOCK_H: tl.constexpr = BLOCK_J // HALF
        r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        h = tl.arange(0, BLOCK_H)
        p = tl.arange(0, HALF)
        jj = h[:, None] * HALF + p[None, :]  # (heads, pairs) word index within the row
        live_w = (h < (cols // 2) // HALF)[:, None]
        live = (r < rows)[:, None, None] & live_w[None, :, :]
        rot = (r % seq)[:, None] * HALF + p[None, :]  # one rotation per (row, pair) for all heads
        c = tl.load(
            cos_ptr + rot, mask=(r < rows)[:, None], other=0.0, eviction_policy="evict_last"
        )[:, None, :]
        s = tl.load(
            sin_ptr + rot, mask=(r < rows)[:, None], other=0.0, eviction_policy="evict_last"
        )[:, None, :]
        qk_one(q_ptr, q_row, wq_ptr, qo_ptr, c, s, r, jj, live, live_w, cols, eps)
        qk_one(k_ptr, k_row, wk_ptr, ko_ptr, c, s, r, jj, live, live_w, cols, eps)

    return qk_rows


def qk_norm_rope_reference(q, k, weight_q, weight_k, cos, sin, heads, eps):
    """The unfused math of ``qk_norm_rope`` (RMSNorm modules, then ``apply_rope``)."""
    out = []
    for x, w in ((q, weight_q), (k, weight_k)):
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype) * w.to(x.dtype)
        out.append(apply_rope(y.unflatten(-1, (heads, -1)), cos, sin))
    return out[0], out[1]


@torch.library.custom_op("flashdreams::qk_norm_rope", mutates_args=())
def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, weight_q: torch.Tensor,
                 weight_k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """RMS norm of (B, L, C) q and k across all heads times their weights, then RoPE of
    interleaved pairs with (L, D/2) cos/sin; returns (B, L, H, D) q and k."""
    b, seq, cols = q.shape
    head = cols // heads
    words = None
    kernel = cuda_kernels(_kernels, q, k)
    if kernel is not None and q.dtype == k.dtype == torch.bfloat16 and k.shape == q.shape:
        words = [_words(t) for t in (q, k)]
    half = head // 2  # pairs per head: a power of two for the kernel's (rows, heads, pairs) tiles
    if words is None or any(w is None for w in words) or head % 2 or half & (half - 1):
        return qk_norm_rope_reference(q, k, weight_q, weight_k, cos, sin, heads, eps)
    qo = torch.empty(b, seq, heads, head, device=q.device, dtype=q.dtype)
    ko = torch.empty_like(qo)
    block_j = next_pow2(cols // 2)
    block_r, warps = _config(block_j)  # one tile per program
    (q2, k2), (wq, wk) = words, (_words(w.to(q.dtype).clone()) for w in (weight_q, weight_k))
    kernel[(-(-b * seq // block_r),)](
        q2, k2, wq, wk, cos.float().contiguous(), sin.float().contiguous(),
        qo.view(torch.int32), ko.view(torch.int32), b * seq, cols, seq, q2.stride(0),
        k2.stride(0), eps, HALF=half, BLOCK_R=block_r, BLOCK_J=block_j, num_warps=warps,
    )  # fmt: skip
    return qo, ko


def _words(t: torch.Tensor) -> torch.Tensor | None:
    """bf16 rows (..., C) as int32 words of two values each (a view where the layout allows)."""
    rows = as_rows(t) if t.dim() == 3 else t.contiguous()
    if (rows.dim() == 2 and rows.stride(0) % 2) or rows.storage_offset() % 2:
        return None
    return rows.view(torch.int32)


@qk_norm_rope.register_fake
def _(q, k, weight_q, weight_k, cos, sin, heads, eps):
    shape = (*q.shape[:-1], heads, q.shape[-1] // heads)
    return q.new_empty(shape), q.new_empty(shape)
