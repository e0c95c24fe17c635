"""Split-KV attention in one launch: the keys cut into ``S`` equal chunks become ``S`` batch
entries of a single attention call (the queries repeated), and the ``S`` partial outputs are
merged by their log-sum-exp.

Why: an AR step of a 1.3B Wan model attends 4680 queries x 12 heads, i.e. 444 query tiles of 128
rows. On a 132-SM Hopper GPU that is 3.36 waves of one tile per SM: the fourth wave runs a third
full, and the kernel reaches ~84 % of the rate it has at 40 heads. Cutting the keys in two gives
888 shorter tiles (6.7 waves, 96 % full). Two separate launches would not help (each keeps its
own partial last wave), so the chunks go in as a batch: one launch, one merge.

The chunk views are free when K/V are contiguous along the key axis (the KV cache is); the
queries are copied ``S`` times (Lq x H x D, small next to the keys).
"""

from __future__ import annotations

import math

import torch

from flashdreams import ConfigError
from flashdreams.kernels import cuda_kernels, triton_kernels
from flashdreams.parallel.ring_attention import attention_lse
from flashdreams.parallel.ring_attention import merge as merge_lse

#: query rows per tile assumed by ``choose_splits`` (cuDNN and FlashAttention use 128 at D=128)
TILE_M = 128


def choose_splits(batch: int, heads: int, lq: int, lk: int, sms: int, *, max_splits: int = 4,
                  min_chunk: int = 2048, tile_m: int = TILE_M, gain: float = 0.08) -> int:  # fmt: skip
    """Number of key chunks that best fills the GPU's last wave of query tiles.

    ``S`` is taken only where the keys divide into ``S`` chunks of at least ``min_chunk`` and the
    wave fill improves by more than ``gain`` over one chunk (each extra chunk costs a merge and
    shorter tiles). Measured on an H200: 12 heads x 4680 queries (fill 0.84 -> 0.96 with 2) gain;
    40 heads (0.93 -> 0.99 with 3) lose 6-10 %, hence a threshold above 0.06.
    """
    tiles = batch * heads * math.ceil(lq / tile_m)

    def fill(s: int) -> float:
        waves = tiles * s / sms
        return waves / math.ceil(waves)

    best = 1
    for s in range(2, max_splits + 1):
        if lk % s or lk // s < min_chunk:
            continue
        if fill(s) > fill(best) + gain:
            best = s
    return best


def merge_torch(out: torch.Tensor, lse: torch.Tensor, splits: int) -> torch.Tensor:
    """(B*S, H, Lq, D) partial outputs and (B*S, H, Lq) log-sum-exps -> (B, Lq, H, D) fp32,
    folded chunk by chunk with ring attention's ``merge``."""
    bs, h, lq, d = out.shape
    out, lse = out.view(bs // splits, splits, h, lq, d), lse.reshape(bs // splits, splits, h, lq)
    acc = acc_lse = None
    for s in range(splits):
        acc, acc_lse = merge_lse(acc, acc_lse, out[:, s], lse[:, s])
    return acc.transpose(1, 2)


@triton_kernels
def _merge_kernel(triton, tl):
    @triton.jit
    def merge_splits(o_ptr, lse_ptr, out_ptr, lq, heads,
                     so_b, so_h, so_l, so_d, sl_b, sl_h, sl_l, st_b, st_l, st_h,
                     S: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
        pid_l, bh = tl.program_id(0), tl.program_id(1)
        b, h = bh // heads, bh % heads
        rows = pid_l * BLOCK + tl.arange(0, BLOCK)
        live = rows < lq
        cols = tl.arange(0, D)
        top = tl.full([BLOCK], float("-inf"), tl.float32)
        for s in tl.static_range(S):
            lse = tl.load(lse_ptr + (b * S + s) * sl_b + h * sl_h + rows * sl_l, mask=live,
                          other=0.0)  # fmt: skip
            top = tl.maximum(top, lse)
        acc = tl.zeros([BLOCK, D], tl.float32)
        den = tl.zeros([BLOCK], tl.float32)
        for s in tl.static_range(S):
            lse = tl.load(lse_ptr + (b * S + s) * sl_b + h * sl_h + rows * sl_l, mask=live,
                          other=0.0)  # fmt: skip
            w = tl.exp(lse - top)
            den += w
            o = tl.load(o_ptr + (b * S + s) * so_b + h * so_h + rows[:, None] * so_l
                        + cols[None, :] * so_d, mask=live[:, None], other=0.0)  # fmt: skip
            acc += w[:, None] * o.to(tl.float32)
        acc = acc / den[:, None]
        tl.store(out_ptr + b * st_b + rows[:, None] * st_l + h * st_h + cols[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=live[:, None])  # fmt: skip

    return merge_splits


def merge(out: torch.Tensor, lse: torch.Tensor, splits: int, dtype: torch.dtype) -> torch.Tensor:
    """Log-sum-exp merge of ``splits`` partial outputs into (B, Lq, H, D) ``dtype`` (one fused
    Triton kernel on CUDA, torch ops elsewhere)."""
    bs, h, lq, d = out.shape
    kernel = cuda_kernels(_merge_kernel, out) if not d & (d - 1) else None
    if kernel is None:
        return merge_torch(out, lse, splits).to(dtype)
    res = torch.empty(bs // splits, lq, h, d, device=out.device, dtype=dtype)
    block = 64
    grid = (-(-lq // block), (bs // splits) * h)
    kernel[grid](out, lse, res, lq, h, *out.stride(), *lse.stride(), *res.stride()[:3],
                 S=splits, D=d, BLOCK=block, num_warps=4)  # fmt: skip
    return res


def sdpa_lse(kernel: str = "cudnn"):
    """``attend`` of ``split_kv_attention`` through SDPA's log-sum-exp entry points."""

    def attend(q, k, v):
        return attention_lse(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), kernel)

    return attend


def split_kv_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, splits: int,
                       attend=None) -> torch.Tensor:  # fmt: skip
    """Softmax attention of (B, Lq, H, D) queries over (B, Lk, H, D) keys computed as ``splits``
    equal key chunks batched into one kernel launch and merged by log-sum-exp.

    Args:
        attend: ``(q, k, v) -> (out, lse)`` on (B', L, H, D) inputs, returning out as
            (B', H, Lq, D) (any strides) and the fp32 log-sum-exp as (B', H, Lq); default
            SDPA's cuDNN kernel.

    Equal to one attention call up to the bf16 rounding of the partial outputs.
    """
    b, lq, h, d = q.shape
    lk = k.shape[1]
    if lk % splits:
        raise ValueError(f"split_kv_attention: {lk} keys do not split into {splits} chunks")
    chunk = lk // splits
    ks = k.reshape(b * splits, chunk, h, d)  # a view when K is contiguous along the keys
    vs = v.reshape(b * splits, chunk, h, d)
    qs = q.unsqueeze(1).expand(b, splits, lq, h, d).reshape(b * splits, lq, h, d)
    out, lse = (attend or sdpa_lse())(qs, ks, vs)
    return merge(out, lse, splits, q.dtype)


class KvSplits:
    """The ``kv_splits`` setting of an attention backend: 1, a fixed count, or ``auto``
    (``choose_splits`` from the shape and the GPU's SM count), resolved once per shape."""

    def __init__(self, setting: int | str, owner: str) -> None:
        if setting != "auto" and not (isinstance(setting, int) and 1 <= setting <= 8):
            raise ConfigError(f"{owner}.kv_splits={setting!r} is not auto or 1..8")
        self.setting = setting
        self._cache: dict[tuple, int] = {}

    def __call__(self, q: torch.Tensor, k: torch.Tensor) -> int:
        """Key chunks for this call's shape (1: one plain call)."""
        if self.setting == 1 or q.device.type != "cuda":
            return 1
        key = (q.shape, k.shape[1], q.device.index)
        if key not in self._cache:
            b, lq, h, _ = q.shape
            lk = k.shape[1]
            if self.setting == "auto":
                sms = torch.cuda.get_device_properties(q.device).multi_processor_count
                self._cache[key] = choose_splits(b, h, lq, lk, sms)
            else:
                self._cache[key] = self.setting if lk % self.setting == 0 else 1
        return self._cache[key]
