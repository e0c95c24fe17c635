"""FlashVSR v1.1: a one-step causal Wan 2.1 1.3B DiT conditioned on low-resolution video.

``OpenImagingLab/FlashVSR`` (weights ``JunhaoZhuang/FlashVSR-v1.1``,
``diffusion_pytorch_model_streaming_dmd.safetensors``, Wan original key names): the Wan 2.1
T2V-1.3B network (no image branch) run once per chunk at t = 1000 (x0 = noise - flow). The LR
video enters as the named input ``lr_features``: (B, lr_layers, tokens, dim) tokens of the LR
projector (``flashdreams.model.flashvsr.projector``, given by ``control=lr_video``), set ``i``
added to the token stream before block ``i`` (v1.1: one set, before block 0). The
cross-attention reads a fixed prompt tensor ([1, 512, 4096], ``text_encoder=prompt_tensor``)
through ``text_embedding``, computed once.

The release keeps the K/V its one denoising forward wrote (``commit_mode = "none"``) and
attends to the previous ``kv_ratio`` = 3 chunks of 2 latent frames plus the current chunk
(``cache=rolling`` with ``window_frames`` 8). Its self-attention is block-sparse (windows of
(2, 8, 8) tokens, a local range and the top-k of mean-pooled q.k): with ``sparse_ratio`` set,
the cached forwards attend with that mask (``flashdreams.model.flashvsr.sparse``): under
``attention=flex`` on tokens put in window order with a ``BlockMask`` of the kept 128-token
blocks (the fast path), under any other backend as an explicit (B, heads, Lq, Lk) mask (masked
SDPA: the exact reference at dense cost); ``sparse_ratio`` null: dense attention.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from flashdreams import ConfigError
from flashdreams.model.base import ConditionInput
from flashdreams.model.flashvsr.sparse import (
    block_mask,
    flex_block_mask,
    kept_fraction,
    token_mask,
    window_order,
)
from flashdreams.model.wan import WanBlock, WanDiT


@dataclass
class LRStep:
    """What the blocks read during one forward (set by ``FlashVSRDiT.forward``)."""

    features: torch.Tensor | None = None  # (B, lr_layers, L, dim)
    grid: tuple[int, int] = (0, 0)  # token grid (h, w)
    sparse_ratio: float | None = None  # None: dense self-attention
    local_range: int = 11
    block_sparse: bool = False  # attention=flex: window-ordered tokens + a BlockMask


class FlashVSRBlock(WanBlock):
    """A Wan block that first adds its layer's LR features to the token stream (layers >= 1;
    layer 0's are added to the patch tokens by ``FlashVSRDiT.condition_tokens``) and, with a
    ``sparse_ratio``, attends through the release's sparse mask in cached forwards."""

    def __init__(self, *args, step: LRStep, **kw) -> None:
        super().__init__(*args, **kw)
        self._step = step  # shared with the model (a plain object, not a submodule)

    def forward(self, x, e0, cross_kv, cos, sin, attn, cache=None, layer=0, mask=None, cam=None,
                h=None, next_table=None):  # fmt: skip
        step = self._step
        x, h = self._with_features(x, h, layer)
        if step.sparse_ratio is None or cache is None:
            return super().forward(x, e0, cross_kv, cos, sin, attn, cache, layer, mask, cam, h,
                                   next_table)  # fmt: skip
        q, k, v, amax = self.self_kv(x, e0, cos, sin, cache, layer, h)
        if step.block_sparse:
            y = self._block_sparse(q, k, v, attn, amax)
        else:
            allowed = token_mask(q, k, step.grid, step.sparse_ratio, step.local_range)
            y = attn.self_attention(q, k, v, allowed, amax)
            # a query block with no kept key block gives zeros (no softmax over nothing)
            y = torch.where(allowed.any(-1).transpose(1, 2)[..., None], y, 0)
        x, q = self.self_attn_out(x, y, e0, cam)
        return self.cross_out_ffn(x, self.cross_attn.attend(q, cross_kv, attn), e0, next_table)

    def write_kv(self, x, e0, cross_kv, cos, sin, attn, cache, layer=0, mask=None, cam=None,
                 h=None) -> None:  # fmt: skip
        """The LR features added as in ``forward``, then ``WanBlock.write_kv`` (the sparse mask
        selects keys for the attention only, not what the cache stores)."""
        x, h = self._with_features(x, h, layer)
        super().write_kv(x, e0, cross_kv, cos, sin, attn, cache, layer, mask, cam, h)

    def _with_features(self, x, h, layer: int):
        """``x`` plus this layer's LR features (layers >= 1 that have them), and norm1's
        handed-over output ``h``, which is then stale (None)."""
        feats = self._step.features
        if feats is not None and 0 < layer < feats.shape[1]:
            return x + feats[:, layer].float(), None
        return x, h

    def flops(self, q_tokens, kv_tokens, tokens_per_frame, context_tokens):
        """The Wan block's FLOPs (the LR features are an addition); with a ``sparse_ratio``
        (the cached forwards the rollout runs), the self-attention over the kept window blocks
        only (at most ``kept_fraction`` of it) plus the window scores of the mean-pooled q, k."""
        out = super().flops(q_tokens, kv_tokens, tokens_per_frame, context_tokens)
        ratio = self._step.sparse_ratio
        if ratio is None:
            return out
        width = self.self_attn.q.out_features
        dense = 4 * q_tokens * kv_tokens * width
        scores = 2 * (q_tokens // 128) * (kv_tokens // 128) * width
        kept = dense * kept_fraction(tokens_per_frame, kv_tokens, ratio)
        out["attention"] += kept + scores - dense
        return out

    def _block_sparse(self, q, k, v, attn, amax) -> torch.Tensor:
        """The sparse attention on 128-token window blocks: q, k, v permuted into window order,
        a FlexAttention ``BlockMask`` of the kept blocks, the output permuted back."""
        step = self._step
        hw = step.grid[0] * step.grid[1]
        blocks = block_mask(q, k, step.grid, step.sparse_ratio, step.local_range)
        pq, back = window_order(q.shape[1] // hw, step.grid, q.device)
        pk, _ = window_order(k.shape[1] // hw, step.grid, q.device)
        mask = flex_block_mask(blocks, q.shape[1], k.shape[1])
        y = attn.self_attention(q[:, pq], k[:, pk], v[:, pk], mask, amax)
        return y[:, back]


class FlashVSRDiT(WanDiT):
    """FlashVSR's causal DiT (Wan 2.1 T2V-1.3B shape; released sizes by default).

    Args:
        dim, num_heads, num_layers, ffn_dim, in_dim, out_dim, text_dim, freq_dim, patch_size,
            eps, cross_attn_norm, text_len, rope_max_pos: the Wan DiT's (see ``WanDiT``).
        lr_layers: sets of LR features the forward adds, one before each of the first
            ``lr_layers`` blocks (the projector's ``layer_num``: 1 in v1.1).
        sparse_ratio: the release's ``sparse_ratio`` (2.0 stable, 1.5 faster); None = dense.
        local_range: the release's ``local_range`` in windows (11 stable, 9 sharper).
    """

    commit_mode = "none"  # the one step at t = 1000 writes the K/V later chunks attend to

    def __init__(
        self,
        dim: int = 1536,
        num_heads: int = 12,
        num_layers: int = 30,
        ffn_dim: int = 8960,
        in_dim: int = 16,
        out_dim: int = 16,
        text_dim: int = 4096,
        freq_dim: int = 256,
        patch_size: Sequence[int] = (1, 2, 2),
        eps: float = 1e-6,
        cross_attn_norm: bool = True,
        text_len: int = 512,
        rope_max_pos: int = 1024,
        lr_layers: int = 1,
        sparse_ratio: float | None = None,
        local_range: int = 11,
    ) -> None:
        super().__init__(dim=dim, num_heads=num_heads, num_layers=num_layers, ffn_dim=ffn_dim,
                         in_dim=in_dim, out_dim=out_dim, text_dim=text_dim, freq_dim=freq_dim,
                         patch_size=patch_size, eps=eps, cross_attn_norm=cross_attn_norm,
                         image_dim=None, text_len=text_len, rope_max_pos=rope_max_pos)  # fmt: skip
        if not 1 <= lr_layers <= num_layers:
            raise ConfigError(f"model.lr_layers={lr_layers} must be in [1, {num_layers}] "
                              "(model.num_layers)")  # fmt: skip
        if tuple(self.patch_size) != (1, 2, 2):
            raise ConfigError(f"model.patch_size={list(self.patch_size)} must be [1, 2, 2]: "
                              "the LR projector gives one token per 16 x 16 pixels")  # fmt: skip
        if sparse_ratio is not None and not sparse_ratio > 0:
            raise ConfigError(f"model.sparse_ratio={sparse_ratio} must be > 0 (or null: dense)")
        if local_range < 1:
            raise ConfigError(f"model.local_range={local_range} must be >= 1")
        self.lr_layers = lr_layers
        self._step = LRStep(sparse_ratio=sparse_ratio, local_range=int(local_range))
        block = (dim, ffn_dim, num_heads, eps, cross_attn_norm, False)
        self.blocks = torch.nn.ModuleList(FlashVSRBlock(*block, step=self._step)
                                          for _ in range(num_layers))  # fmt: skip

    # ---------------------------------------------------------------- contract
    def inputs(self) -> dict[str, ConditionInput]:
        layers, dim = self.lr_layers, self.dim

        def shape(b: int, f: int, hw: tuple[int, int]) -> tuple[int, ...]:
            return (b, layers, f * (hw[0] // 2) * (hw[1] // 2), dim)

        return {"lr_features": ConditionInput(
            "lr_features", shape, doc="LR projector tokens of the input video: control=lr_video")}  # fmt: skip

    def set_attention(self, attention) -> None:
        from flashdreams.parallel.base import SequenceParallel

        if self.lr_layers > 1 and type(attention.sequence) is not SequenceParallel:
            raise ConfigError(f"model.lr_layers={self.lr_layers}: per-block LR features need "
                              "parallel=single (they are not sharded with the tokens)")  # fmt: skip
        if self._step.sparse_ratio is not None and type(attention.sequence) is not SequenceParallel:
            raise ConfigError(f"model.sparse_ratio={self._step.sparse_ratio}: the sparse mask "
                              "needs every token of a chunk; use parallel=single")  # fmt: skip
        from flashdreams.attention.flex import FlexAttention

        self._step.block_sparse = isinstance(attention.backend, FlexAttention)
        super().set_attention(attention)

    # ---------------------------------------------------------------- forward
    def condition_tokens(self, tokens: torch.Tensor, inputs: dict[str, torch.Tensor],
                         grid: tuple[int, int, int]) -> torch.Tensor:  # fmt: skip
        """Patch tokens + the LR features of layer 0 (the release adds them before block 0)."""
        feats = inputs.get("lr_features")
        return tokens if feats is None else tokens + feats[:, 0].float()

    def forward(self, x, timestep, context, frame_positions=None, cache=None, mask=None,
                inputs=None, expert=0):  # fmt: skip
        """``WanDiT.forward`` with ``lr_features`` (B, lr_layers, F * h/2 * w/2, dim) added
        before the first ``lr_layers`` blocks (absent: an unconditioned forward)."""
        feats = (inputs or {}).get("lr_features")
        if feats is not None:
            b, _, f, h, w = x.shape
            want = (b, self.lr_layers, f * (h // 2) * (w // 2), self.dim)
            if tuple(feats.shape) != want:
                raise ConfigError(f"input 'lr_features' has shape {tuple(feats.shape)}, the "
                                  f"model needs {want} (control.lr_layers must equal "
                                  "model.lr_layers)")  # fmt: skip
        self._step.features = feats
        self._step.grid = (x.shape[3] // 2, x.shape[4] // 2)
        try:
            return super().forward(x, timestep, context, frame_positions, cache, mask, inputs,
                                   expert)  # fmt: skip
        finally:
            self._step.features = None
