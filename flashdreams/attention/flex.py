"""FlexAttention for masked full-sequence forwards (teacher-forced, block-causal references).

A dense (Lq, Lk) boolean mask is turned into a ``BlockMask`` once (cached per mask tensor), so
the kernel skips the key blocks a query block never sees: a block-causal mask over ``n`` blocks
does about half the work of the dense masked SDPA call. Unmasked calls (every cached AR step, the
bidirectional forward) go to the pinned SDPA kernel, which is faster there. A ``BlockMask`` given
as the mask is used as it is (a model's own block-sparse pattern: FlashVSR's windows).
"""

from __future__ import annotations

import warnings

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from flashdreams.attention.base import AttentionBackend
from flashdreams.attention.sdpa import SdpaAttention


class FlexAttention(AttentionBackend):
    """``flex_attention`` with a block-sparse mask; SDPA (``unmasked``) for unmasked calls.

    Args:
        unmasked: SDPA kernel for calls without a mask (``cudnn`` | ``flash`` | ``efficient`` | ...).
        block_size: FlexAttention's tile edge in tokens (128 on current GPUs).
        compile: compile the flex kernel on CUDA (the eager path is a slow reference; CPU always
            runs eagerly).
    """

    name = "flex"
    kernel_routes = known_routes = ("flex", "sdpa")  # unmasked calls: SDPA by design

    def __init__(self, unmasked: str = "cudnn", block_size: int = 128, compile: bool = True):
        self.sdpa = SdpaAttention(unmasked)
        self.block_size = block_size
        self.compile = compile
        self._masks: dict[tuple, BlockMask] = {}
        self._kernel = None

    def block_mask(self, mask: torch.Tensor) -> BlockMask:
        """The ``BlockMask`` of a dense (Lq, Lk) boolean mask (cached by tensor identity)."""
        key = (mask.data_ptr(), tuple(mask.shape), mask.device, mask._version)
        if key not in self._masks:
            if len(self._masks) >= 8:
                self._masks.clear()
            dense = mask.to(torch.bool)

            def mask_mod(b, h, q_idx, kv_idx):
                return dense[q_idx, kv_idx]

            lq, lk = dense.shape
            self._masks[key] = create_block_mask(mask_mod, None, None, lq, lk,
                                                 device=str(dense.device),
                                                 BLOCK_SIZE=self.block_size)  # fmt: skip
        return self._masks[key]

    def _flex(self, device: torch.device):
        if device.type != "cuda" or not self.compile:
            return flex_attention
        if self._kernel is None:
            self._kernel = torch.compile(flex_attention, dynamic=False)
        return self._kernel

    def __call__(self, q, k, v, mask=None, kv_amax=None):
        if mask is None:
            self._route("sdpa")
            return self.sdpa(q, k, v)
        self._route("flex")
        q_, k_, v_ = (t.transpose(1, 2) for t in (q, k, v))
        kernel = self._flex(q.device)
        with warnings.catch_warnings():  # the eager (CPU) path warns that it is unfused
            warnings.filterwarnings("ignore", message="flex_attention called without")
            block = mask if isinstance(mask, BlockMask) else self.block_mask(mask)
            out = kernel(q_, k_, v_, block_mask=block)
        return out.transpose(1, 2)
