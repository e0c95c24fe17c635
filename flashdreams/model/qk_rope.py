"""q/k RMS norm + RoPE of a Wan self-attention in one Triton pass per token.

Wan normalizes q and k over the whole width (all heads), scales by a learned weight, then
rotates interleaved pairs of each head's dims by the token's 3-D position. Inductor compiles
this as a reduction over the fused QKV output whose pair shuffles (``select``/``stack``) keep it
near 1 TB/s on an H200 (61 us per 1.3B block); one program per token that holds the row in
registers, reduces it, and writes the rotated pairs runs at copy speed.

Rounding follows the unfused modules step by step (norm in fp32 -> model dtype, times the
weight in the model dtype, rotation in fp32 -> model dtype), so the two agree to the last bit
in most elements. A custom op: ``torch.compile`` calls it as is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_KERNEL: object = False  # False: not built yet; None: no Triton


def _kernel():
    global _KERNEL
    if _KERNEL is False:
        try:
            import triton
            import triton.language as tl
        except ImportError:
            _KERNEL = None
            return None

        @triton.jit
        def qk_norm_rope(x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, tokens, x_row, heads, eps,
                         HEADS: tl.constexpr, HALF: tl.constexpr):  # fmt: skip
            row = tl.program_id(0)  # token index over B * L
            which = tl.program_id(1)  # 0: q, 1: k
            h = tl.arange(0, HEADS)[:, None, None]
            f = tl.arange(0, HALF)[None, :, None]
            p = tl.arange(0, 2)[None, None, :]
            col = h * (2 * HALF) + f * 2 + p  # (HEADS, HALF, 2) element of the row
            live = h < heads
            width = heads * 2 * HALF
            x = tl.load(x_ptr + row.to(tl.int64) * x_row + which * width + col, mask=live,
                        other=0.0).to(tl.float32)  # fmt: skip
            inv = tl.rsqrt(tl.sum(tl.sum(tl.sum(x * x, 2), 1), 0) / width + eps)
            w = tl.load(w_ptr + which * width + col, mask=live, other=0.0)
            y = (x * inv).to(w.dtype)  # the norm's output in the model dtype
            y = (y * w).to(tl.float32)  # times the weight, rounded to the model dtype
            even, odd = tl.split(y)  # (HEADS, HALF) each
            pos = row % tokens
            c = tl.load(cos_ptr + pos * HALF + tl.arange(0, HALF))[None, :]
            s = tl.load(sin_ptr + pos * HALF + tl.arange(0, HALF))[None, :]
            out = tl.join(even * c - odd * s, even * s + odd * c)  # (HEADS, HALF, 2)
            dst = out_ptr + (which * tl.num_programs(0) + row).to(tl.int64) * width + col
            tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=live)

        _KERNEL = qk_norm_rope
    return _KERNEL


def qk_norm_rope_reference(qk: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor,
                           sin: torch.Tensor, heads: int, eps: float) -> torch.Tensor:  # fmt: skip
    """The unfused math: ``qk`` (B, L, 2C) the q and k halves of the projection; weight (2C,)
    q's then k's norm scale; cos/sin (L, D/2). Returns (2, B, L, H, D)."""
    from flashdreams.model.layers import apply_rope

    width = qk.shape[-1] // 2
    out = []
    for i in range(2):
        x = qk[..., i * width : (i + 1) * width]
        y = F.rms_norm(x.float(), (width,), eps=eps).to(x.dtype) * weight[i * width :][:width]
        out.append(apply_rope(y.unflatten(-1, (heads, -1)), cos, sin))
    return torch.stack(out)


@torch.library.custom_op("flashdreams::qk_norm_rope", mutates_args=())
def qk_norm_rope(qk: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 heads: int, eps: float) -> torch.Tensor:  # fmt: skip
    """Normalized, rotated q and k as one (2, B, L, H, D) tensor (see the module docstring)."""
    b, seq, two_c = qk.shape
    half = two_c // 2 // heads // 2
    kernel = _kernel() if qk.is_cuda else None
    if kernel is None or qk.stride(-1) != 1 or half & (half - 1) or qk.shape[0] * seq == 0:
        return qk_norm_rope_reference(qk, weight, cos, sin, heads, eps)
    x = qk if qk.stride(0) == seq * qk.stride(1) or b == 1 else qk.contiguous()
    out = torch.empty(2, b, seq, heads, 2 * half, device=qk.device, dtype=qk.dtype)
    kernel[(b * seq, 2)](x, weight.to(qk.dtype).contiguous(), cos.float().contiguous(),
                         sin.float().contiguous(), out, seq, x.stride(1), heads, eps,
                         HEADS=triton_next_pow2(heads), HALF=half, num_warps=4)  # fmt: skip
    return out


def triton_next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


@qk_norm_rope.register_fake
def _(qk, weight, cos, sin, heads, eps):
    b, seq, two_c = qk.shape
    return qk.new_empty(2, b, seq, heads, two_c // 2 // heads)
