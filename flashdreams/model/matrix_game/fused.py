"""The action modules' per-head q/k norm + RoPE and their attention along frames, one pass each.

Compiled, an action module's non-GEMM work came out as ~15 Inductor kernels per call (on an
H200 at 352x640, ~6 ms of a 64 ms step over the 15 action blocks' 45 calls): the RMS norm of
each 64-dim head and the frame RoPE of the mouse q/k ran at ~28 us where their bytes take ~5,
and each of the two attentions along frames was a products kernel, a softmax kernel and a
weighted-sum kernel with fp32 intermediates written between them. Here:

    head_norm_rope(q, k, cos, sin, eps)
        RMS norm of every head (no weight: the release's module never applies its own),
        rounded to the model dtype, then RoPE of interleaved pairs at the token's frame
        angle; q and k (or q alone) in one launch, read in place from the fused q/k/v
        projection's output.
    frame_attention(q, k, v, mask)
        softmax attention of every (token, head) along frames, with an online softmax over
        the key frames: q, k and v are read once (k / v from the cache's window in place) and
        the output is written once, in the model dtype (the projection it feeds reads that).

Rounding follows the unfused modules (norm in fp32, rounded; the rotation in fp32, rounded; the
attention in fp32, rounded once at the end). Without CUDA or Triton, for other dtypes or
layouts, the unfused torch math runs; it is also the reference the tests compare the kernels
with. Custom ops, so ``torch.compile`` keeps each kernel whole inside the compiled regions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from flashdreams.kernels import cuda_kernels, next_pow2, triton_kernels
from flashdreams.model.layers import apply_rope

# (rows per program, warps) of each kernel; None: the built-in choice
TUNE: dict[str, tuple[int, int] | None] = {"head": None, "frames": None}


@triton_kernels
def _kernels(triton, tl):
    @triton.jit
    def head_one(src, src_row, c, s, r, jj, live, head_d, eps):
        # (rows, heads, pairs) tiles of int32 words, one bf16 pair each (even element in the
        # low half); a bf16's bits shifted up 16 are its fp32 value
        word = tl.load(src + r[:, None, None] * src_row + jj[None, :, :], mask=live, other=0)
        x0 = (word << 16).to(tl.float32, bitcast=True)
        x1 = (word & -65536).to(tl.float32, bitcast=True)
        inv = tl.rsqrt(tl.sum(x0 * x0 + x1 * x1, 2) / head_d + eps)[:, :, None]
        y0 = (x0 * inv).to(tl.bfloat16).to(tl.float32)  # the norm rounds to the model dtype
        y1 = (x1 * inv).to(tl.bfloat16).to(tl.float32)
        o0 = (y0 * c - y1 * s).to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32)
        o1 = (y0 * s + y1 * c).to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32)
        return (o1 << 16) | (o0 & 65535)

    @triton.jit
    def head_rows(q_ptr, k_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, rows, seq, per_frame,
                  heads, q_row, k_row, eps, HAS_K: tl.constexpr, HALF: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):  # fmt: skip
        r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        h = tl.arange(0, BLOCK_H)
        p = tl.arange(0, HALF)
        jj = h[:, None] * HALF + p[None, :]  # (heads, pairs) word index within the row
        live = (r < rows)[:, None, None] & (h < heads)[None, :, None]
        # the token's frame angle: one rotation per (row, pair) for all heads
        rot = ((r % seq) // per_frame)[:, None] * HALF + p[None, :]
        c = tl.load(cos_ptr + rot, mask=(r < rows)[:, None], other=1.0)[:, None, :]
        s = tl.load(sin_ptr + rot, mask=(r < rows)[:, None], other=0.0)[:, None, :]
        out_row = heads * HALF  # words per output row (contiguous (B, L, H, D))
        dst = r[:, None, None] * out_row + jj[None, :, :]
        tl.store(qo_ptr + dst, head_one(q_ptr, q_row, c, s, r, jj, live, 2 * HALF, eps), mask=live)
        if HAS_K:
            ko = head_one(k_ptr, k_row, c, s, r, jj, live, 2 * HALF, eps)
            tl.store(ko_ptr + dst, ko, mask=live)

    @triton.jit
    def frame_rows(q_ptr, k_ptr, v_ptr, m_ptr, o_ptr, rows, frames, per_frame, key_frames,
                   heads, head_d, qb, qf, qs, qh, kb, kg, ks, kh, vb, vg, vs, vh, scale,
                   HAS_MASK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
                   BLOCK_D: tl.constexpr):  # fmt: skip
        # BLOCK_R (token, all heads) rows; row r = ((b * F) + f) * S + s
        r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        h = tl.arange(0, BLOCK_H)
        d = tl.arange(0, BLOCK_D)
        live_r = r < rows
        s = r % per_frame
        f = (r // per_frame) % frames
        b = r // (per_frame * frames)
        hd = (h < heads)[:, None] & (d < head_d)[None, :]
        live = live_r[:, None, None] & hd[None, :, :]
        q_off = (
            (b * qb + f * qf + s * qs)[:, None, None] + (h * qh)[None, :, None] + d[None, None, :]
        )
        q = tl.load(q_ptr + q_off, mask=live, other=0.0).to(tl.float32)
        k_row = (b * kb + s * ks)[:, None, None] + (h * kh)[None, :, None] + d[None, None, :]
        v_row = (b * vb + s * vs)[:, None, None] + (h * vh)[None, :, None] + d[None, None, :]
        m = tl.full([BLOCK_R, BLOCK_H], -1.0e30, tl.float32)  # finite: a masked first frame
        total = tl.zeros([BLOCK_R, BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_R, BLOCK_H, BLOCK_D], tl.float32)
        for g in range(0, key_frames):
            k = tl.load(k_ptr + k_row + g * kg, mask=live, other=0.0).to(tl.float32)
            score = tl.sum(q * k, 2) * scale
            if HAS_MASK:
                ok = tl.load(m_ptr + f * key_frames + g, mask=live_r, other=0)
                score = tl.where((ok != 0)[:, None], score, float("-inf"))
            m_new = tl.maximum(m, score)
            alpha = tl.exp(m - m_new)
            p = tl.exp(score - m_new)
            v = tl.load(v_ptr + v_row + g * vg, mask=live, other=0.0).to(tl.float32)
            acc = acc * alpha[:, :, None] + p[:, :, None] * v
            total = total * alpha + p
            m = m_new
        out = acc / total[:, :, None]
        o_off = r[:, None, None] * (heads * head_d) + (h * head_d)[None, :, None] + d[None, None, :]
        tl.store(o_ptr + o_off, out.to(o_ptr.dtype.element_ty), mask=live)

    return head_rows, frame_rows


# ------------------------------------------------------------------ per-head norm + RoPE
def head_norm_rope_reference(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                             eps: float) -> torch.Tensor:  # fmt: skip
    """The unfused math: RMS norm of each head (B, L, H, D) in fp32 without weight, rounded to
    t's dtype, then RoPE at the token's frame angle (cos / sin: (F, D/2), L = F * tokens)."""
    b, length, h, d = t.shape
    y = F.rms_norm(t.float(), (d,), eps=eps).to(t.dtype)
    f = cos.shape[0]
    return apply_rope(y.reshape(b, f, length // f * h, d), cos, sin).view(b, length, h, d)


def _words(t: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """A (B, L, H, D) bf16 tensor with packed heads as (int32 words, row stride in words): a
    view (the q or k slice of a fused projection's output) where the layout allows."""
    b, length, h, d = t.shape
    if t.stride(3) != 1 or t.stride(2) != d or (b > 1 and t.stride(0) != length * t.stride(1)):
        return None
    if t.stride(1) % 2 or t.storage_offset() % 2:
        return None
    flat = t.as_strided((b * length, h * d), (t.stride(1), 1))
    return flat.view(torch.int32), t.stride(1) // 2


@torch.library.custom_op("flashdreams::head_norm_rope", mutates_args=())
def head_norm_rope(q: torch.Tensor, k: torch.Tensor | None, cos: torch.Tensor,
                   sin: torch.Tensor, eps: float) -> list[torch.Tensor]:  # fmt: skip
    """``head_norm_rope_reference`` of (B, L, H, D) q and, if given, k (same shape) in one
    launch; returns [q] or [q, k], contiguous."""
    pair = [q] if k is None else [q, k]
    d = q.shape[-1]
    kernels = cuda_kernels(_kernels, q, k, cos)
    words = None
    half = d // 2
    fits = d % 2 == 0 and half & (half - 1) == 0 and q.shape[1] % cos.shape[0] == 0
    if kernels is not None and fits and all(t.dtype == torch.bfloat16 for t in pair):
        words = [_words(t) for t in pair]
    if words is None or any(w is None for w in words) or (k is not None and k.shape != q.shape):
        return [head_norm_rope_reference(t, cos, sin, eps) for t in pair]
    b, length, heads, _ = q.shape
    outs = [torch.empty(q.shape, device=q.device, dtype=q.dtype) for _ in pair]
    block_h = next_pow2(heads)
    # 1024 words per program (2 rows at the release's 16 x 32 pairs: 6.3 us for q + k on an
    # H200, 7.7 at 4 rows; scripts/bench_fusions.py --action)
    block_r, warps = TUNE["head"] or (max(1, min(8, 1024 // (block_h * half))), 4)
    (q_w, q_row), (k_w, k_row) = words[0], words[-1]
    kernels[0][(-(-b * length // block_r),)](
        q_w, k_w, cos.float().contiguous(), sin.float().contiguous(), outs[0].view(torch.int32),
        outs[-1].view(torch.int32), b * length, length, length // cos.shape[0], heads, q_row,
        k_row, eps, HAS_K=k is not None, HALF=half, BLOCK_R=block_r, BLOCK_H=block_h,
        num_warps=warps,
    )  # fmt: skip
    return outs


@head_norm_rope.register_fake
def _(q, k, cos, sin, eps):
    return [q.new_empty(q.shape)] if k is None else [q.new_empty(q.shape), k.new_empty(k.shape)]


# ------------------------------------------------------------------ attention along frames
def frame_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              mask: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """Softmax attention of each token along frames in fp32, as batched matmuls.

    Args:
        q: (B, F, S, H, D) queries of F frames of S positions (one per token).
        k: (B, G, S, H, D) keys of G frames: one per position (the mouse: each token attends
            to its own position in every frame) or S = 1, one per frame, shared by all the
            frame's positions (the keyboard).
        v: like ``k``.
        mask: (F, G) boolean frame mask (True = may attend), or None.

    Returns:
        (B, F, S, H, D) fp32.
    """
    scale = q.shape[-1] ** -0.5
    q, k, v = q.float(), k.float(), v.float()
    scores = q.permute(0, 2, 3, 1, 4) @ k.permute(0, 2, 3, 4, 1) * scale  # (B, S, H, F, G)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(dim=-1) @ v.permute(0, 2, 3, 1, 4)).permute(0, 3, 1, 2, 4)


def frame_attention_unfused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            mask: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """The torch math in q's dtype, for modules without the fused kernels: eager, the batched
    matmuls of ``frame_attention_reference``; compiled, explicit products and a softmax over
    the few key frames, which Inductor fuses into a few kernels reading the K/V in place (SDPA
    would need a transposed copy of each and one tiny attention per token and head)."""
    if not torch.compiler.is_compiling():
        return frame_attention_reference(q, k, v, mask).to(q.dtype)
    scale = q.shape[-1] ** -0.5
    scores = (q.float().unsqueeze(2) * k.float().unsqueeze(1)).sum(-1) * scale  # (B, F, G, S, H)
    if mask is not None:
        scores = scores.masked_fill(~mask[None, :, :, None, None], float("-inf"))
    weights = scores.softmax(dim=2).unsqueeze(-1)
    return (weights * v.float().unsqueeze(1)).sum(2).to(q.dtype)


@torch.library.custom_op("flashdreams::frame_attention", mutates_args=())
def frame_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    mask: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """``frame_attention_reference`` (shapes as there) rounded to q's dtype: (B, F, S, H, D),
    contiguous; k / v may be strided views (a cache's window, a fused projection's slice)."""
    kernels = cuda_kernels(_kernels, q, k, v, mask)
    same = q.dtype == k.dtype == v.dtype and q.dtype in (torch.bfloat16, torch.float16)
    unit = all(t.stride(-1) == 1 for t in (q, k, v))
    fits = k.shape == v.shape and k.shape[2] in (1, q.shape[2]) and k.shape[0] == q.shape[0]
    if kernels is None or not same or not unit or not fits:
        return frame_attention_reference(q, k, v, mask).to(q.dtype).contiguous()  # as the fake
    b, frames, per_frame, heads, d = q.shape
    key_frames = k.shape[1]
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    block_h, block_d = next_pow2(heads), next_pow2(d)
    # one (token, all heads) row per program at the release's 16 x 64 (on an H200 the mouse
    # 13.5 us, 16.2 at 4 rows; the keyboard 10.8 us, 13.7 at 4 rows even with each key frame
    # loaded once per program: the loop over key frames is latency-bound; bench_fusions.py
    # --action)
    block_r, warps = TUNE["frames"] or (max(1, min(8, 1024 // (block_h * block_d))), 4)
    one = k.shape[2] == 1  # the keyboard: one key per frame for every position
    m = None if mask is None else mask.to(torch.int8).contiguous()
    rows = b * frames * per_frame
    kernels[1][(-(-rows // block_r),)](
        q, k, v, out if m is None else m, out, rows, frames, per_frame, key_frames, heads, d,
        q.stride(0), q.stride(1), q.stride(2), q.stride(3),
        k.stride(0), k.stride(1), 0 if one else k.stride(2), k.stride(3),
        v.stride(0), v.stride(1), 0 if one else v.stride(2), v.stride(3), d**-0.5,
        HAS_MASK=m is not None, BLOCK_R=block_r, BLOCK_H=block_h, BLOCK_D=block_d,
        num_warps=warps,
    )  # fmt: skip
    return out


@frame_attention.register_fake
def _(q, k, v, mask=None):
    return q.new_empty(q.shape)


@register_flop_formula(torch.ops.flashdreams.frame_attention)
def _frame_attention_flops(q_shape, k_shape, v_shape, mask_shape=None, **kwargs) -> int:
    """PyTorch's FLOP counter: the scores and the weighted sum, 2 FLOPs per (query token,
    head, key frame, dim) each (what ``ActionModule.flops`` charges)."""
    b, frames, per_frame, heads, d = q_shape
    return 4 * b * frames * per_frame * heads * k_shape[1] * d
