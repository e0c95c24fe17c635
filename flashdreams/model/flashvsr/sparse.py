"""FlashVSR's locality-constrained sparse self-attention, as an explicit mask.

The release (``wan_video_dit.py``) partitions a chunk's tokens into 3-D windows of (2, 8, 8)
tokens (one 128-token block of its block-sparse kernel), mean-pools q and k per window, scores
every query window against every key window (cache + chunk) per head (``q.k / sqrt(d)``),
forbids key windows outside a ``local_range`` x ``local_range`` neighbourhood of window
positions (any frame), softmaxes over key windows, and keeps, per head and query frame pair,
the ``topk`` largest entries of that (query windows x key windows) map, where
``topk = int(n^2 * sparse_ratio * 768 * 1280 / (H * W)) - 1`` for ``n`` windows per frame
pair and an H x W output. Each query block then attends densely to its kept key blocks.

``block_mask`` computes the same window mask; ``token_mask`` expands it to a (B, heads, Lq, Lk)
boolean mask in the tokens' natural (frame, h, w) order, so any attention that takes a per-head
mask (SDPA) computes the release's sparse attention exactly (at dense cost: the reference path).
``window_order`` + ``flex_block_mask`` are the fast path: tokens permuted so each window is one
128-token block, and a FlexAttention ``BlockMask`` listing the kept key blocks of each query
block (``attention=flex``).
"""

from __future__ import annotations

import functools
import inspect

import torch

from flashdreams import ConfigError

WINDOW = (2, 8, 8)  # frames, token rows, token columns of one window (a 128-token block)


def local_mask(rows: int, cols: int, local_range: int, device=None) -> torch.Tensor:
    """(rows cols, rows cols) window-position neighbourhood: offsets in
    [-r // 2, r - 1 - r // 2] along both axes (the release's ``normal_slide`` mask)."""
    r = torch.arange(rows, device=device)
    c = torch.arange(cols, device=device)
    rr, cc = (t.reshape(-1) for t in torch.meshgrid(r, c, indexing="ij"))
    half = local_range // 2
    dr = rr[None, :] - rr[:, None]
    dc = cc[None, :] - cc[:, None]
    ok = (dr >= -half) & (dr <= local_range - 1 - half)
    return ok & (dc >= -half) & (dc <= local_range - 1 - half)


@functools.lru_cache(maxsize=32)
def tiled_local_mask(rows: int, cols: int, local_range: int, tiles: tuple[int, int],
                     device=None) -> torch.Tensor:  # fmt: skip
    """``local_mask`` repeated over (query frame pairs, key frame pairs): the neighbourhood
    holds whatever the frames. Cached per shape: every layer of every chunk asks for the same
    one (read-only)."""
    return local_mask(rows, cols, local_range, device).repeat(*tiles)


def pool(x: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """(B, F h w, H, D) tokens -> (B, F/2 * h/8 * w/8, H, D) window means, windows in
    (frame pair, row, column) order."""
    b, length, heads, d = x.shape
    h, w = grid_hw
    wf, wh, ww = WINDOW
    f = length // (h * w)
    x = x.float().view(b, f // wf, wf, h // wh, wh, w // ww, ww, heads, d)
    return x.mean(dim=(2, 4, 6)).reshape(b, -1, heads, d)


def topk_count(grid_hw: tuple[int, int], sparse_ratio: float) -> int:
    """The release's ``topk`` for a token grid (output = 16 x the token grid): it depends on
    the grid's area only."""
    h, w = grid_hw
    n = WINDOW[0] * h * w // 128  # windows per frame pair
    ratio = sparse_ratio * 768 * 1280 / (16 * h * 16 * w)
    return int(n * n * ratio) - 1


def kept_fraction(tokens_per_frame: int, kv_tokens: int, sparse_ratio: float) -> float:
    """At most this fraction of the (query window, key window) blocks is attended: ``block_mask``
    keeps ``topk_count`` of each query frame pair's (windows per pair x key windows) entries
    (fewer where the local range allows fewer)."""
    entries = (WINDOW[0] * tokens_per_frame // 128) * (kv_tokens // 128)
    keep = min(entries - 1, topk_count((1, tokens_per_frame), sparse_ratio))
    return max(keep, 0) / entries


def block_mask(q: torch.Tensor, k: torch.Tensor, grid_hw: tuple[int, int], sparse_ratio: float,
               local_range: int) -> torch.Tensor:  # fmt: skip
    """(B, heads, query windows, key windows) boolean mask of the release's sparse attention.

    Args:
        q: (B, Lq, H, D) queries of whole frame pairs (after norm and RoPE).
        k: (B, Lk, H, D) keys the queries attend to (cache + chunk), whole frame pairs.
        grid_hw: the token grid (h, w), multiples of 8.
    """
    h, w = grid_hw
    if h % WINDOW[1] or w % WINDOW[2]:
        raise ConfigError(f"model.sparse_ratio: the output {16 * h}x{16 * w} must be multiples of "
                          "128 (rollout.height, rollout.width), the sparse windows' size")  # fmt: skip
    if (q.shape[1] // (h * w)) % WINDOW[0]:
        raise ConfigError(f"model.sparse_ratio: a block of {q.shape[1] // (h * w)} latent frames "
                          "is not whole frame pairs (the sparse windows' depth); use even "
                          "rollout.frames_per_block and rollout.first_block_frames")  # fmt: skip
    qw, kw = pool(q, grid_hw), pool(k, grid_hw)  # (B, nq, H, D), (B, nk, H, D)
    scores = torch.einsum("bqhd,bkhd->bhqk", qw, kw) / qw.shape[-1] ** 0.5
    per = (h // WINDOW[1]) * (w // WINDOW[2])  # windows per frame pair
    local = tiled_local_mask(h // WINDOW[1], w // WINDOW[2], local_range,
                             (qw.shape[1] // per, kw.shape[1] // per), q.device)  # fmt: skip
    probs = scores.masked_fill(~local, float("-inf")).softmax(dim=-1)
    b, heads, nq, nk = probs.shape
    flat = probs.view(b, heads, nq // per, per * nk)  # per query frame pair
    keep = min(flat.shape[-1] - 1, topk_count(grid_hw, sparse_ratio))
    threshold = flat.topk(keep + 1, dim=-1).values[..., -1:]
    return (flat > threshold).view(b, heads, nq, nk)


def token_windows(frames: int, grid_hw: tuple[int, int], device=None) -> torch.Tensor:
    """(frames h w,) window index of every token in natural (frame, h, w) order."""
    h, w = grid_hw
    f = torch.arange(frames, device=device).view(-1, 1, 1) // WINDOW[0]
    r = torch.arange(h, device=device).view(1, -1, 1) // WINDOW[1]
    c = torch.arange(w, device=device).view(1, 1, -1) // WINDOW[2]
    rows, cols = h // WINDOW[1], w // WINDOW[2]
    return ((f * rows + r) * cols + c).reshape(-1)


def token_mask(q: torch.Tensor, k: torch.Tensor, grid_hw: tuple[int, int], sparse_ratio: float,
               local_range: int) -> torch.Tensor:  # fmt: skip
    """(B, heads, Lq, Lk) boolean mask of the release's sparse attention in natural order."""
    blocks = block_mask(q, k, grid_hw, sparse_ratio, local_range)
    hw = grid_hw[0] * grid_hw[1]
    iq = token_windows(q.shape[1] // hw, grid_hw, q.device)
    ik = token_windows(k.shape[1] // hw, grid_hw, q.device)
    return blocks[:, :, iq[:, None], ik[None, :]]


@functools.lru_cache(maxsize=32)
def window_order(
    frames: int, grid_hw: tuple[int, int], device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(frames h w,) permutation putting tokens in window order (window i's 128 tokens are
    positions [128 i, 128 i + 128): the release's ``WindowPartition3D`` order) and its inverse.
    Cached per shape (read-only): the layers of a forward share them, so a forward's host work
    is the mask, not index arithmetic, and a captured forward reads tensors made before capture."""
    order = torch.argsort(token_windows(frames, grid_hw, device), stable=True)
    return order, torch.argsort(order)


@functools.cache
def _skips_q_blocks() -> bool:
    """Whether this torch's ``BlockMask.from_kv_blocks`` takes ``compute_q_blocks``."""
    from torch.nn.attention.flex_attention import BlockMask

    return "compute_q_blocks" in inspect.signature(BlockMask.from_kv_blocks).parameters


def flex_block_mask(blocks: torch.Tensor, lq: int, lk: int):
    """A FlexAttention ``BlockMask`` of 128-token window blocks (tokens in window order):
    every kept block full, so the compiled kernel evaluates no per-token mask; the mask_mod
    reads the same block table, for the eager (CPU) path, which applies it to every score."""
    from torch.nn.attention.flex_attention import BlockMask

    counts = blocks.sum(-1, dtype=torch.int32)  # (B, H, nq)
    order = torch.argsort((~blocks).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    none = torch.zeros_like(counts)

    def mask_mod(b, h, q_idx, kv_idx):
        return blocks[b, h, q_idx // 128, kv_idx // 128]

    # the transposed (query-block) tables serve only a backward pass: skipped where torch can
    skip = {"compute_q_blocks": False} if _skips_q_blocks() else {}
    return BlockMask.from_kv_blocks(none, torch.zeros_like(order), counts, order,
                                    BLOCK_SIZE=128, mask_mod=mask_mod, seq_lengths=(lq, lk),
                                    **skip)  # fmt: skip
