"""PyTorch scaled_dot_product_attention with an optionally pinned kernel."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from flashdreams import ConfigError
from flashdreams.attention.base import AttentionBackend
from flashdreams.attention.split_kv import KvSplits, sdpa_lse, split_kv_attention

_BACKENDS = {
    "auto": None,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}


class SdpaAttention(AttentionBackend):
    """SDPA on (B, L, H, D) tensors; ``backend`` pins the kernel on CUDA.

    On CPU, or when a mask is given to a kernel that cannot take one, the pin is lifted and
    PyTorch picks a kernel that can run (a clean fallback, never an error).

    ``kv_splits`` (cuDNN and flash on CUDA, unmasked calls): cut the keys into that many equal
    chunks run as one batched launch and merged by log-sum-exp (``split_kv``), which fills the
    last wave of query tiles when few heads x queries leave it part empty; ``auto`` picks the
    count from the shape and the GPU's SM count, 1 turns it off.
    """

    def __init__(self, backend: str = "auto", kv_splits: int | str = 1) -> None:
        if backend not in _BACKENDS:
            raise ConfigError(f"attention.backend={backend!r} is not one of {sorted(_BACKENDS)}")
        self.splits_for = KvSplits(kv_splits, "attention")
        if kv_splits != 1 and backend not in ("cudnn", "flash"):
            raise ConfigError(f"attention.kv_splits={kv_splits!r} needs attention.backend=cudnn "
                              f"or flash (got {backend!r})")  # fmt: skip
        self.backend = backend
        self.kv_splits = kv_splits
        self.name = f"sdpa_{backend}" + ("" if kv_splits == 1 else f"_split{kv_splits}")

    def _context(self, q: torch.Tensor, masked: bool) -> contextlib.AbstractContextManager:
        kernel = _BACKENDS[self.backend]
        if kernel is None or q.device.type != "cuda":
            return contextlib.nullcontext()
        if masked and kernel == SDPBackend.FLASH_ATTENTION:
            return contextlib.nullcontext()
        return sdpa_kernel([kernel, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])

    def __call__(self, q, k, v, mask=None, kv_amax=None):
        self._route("sdpa")
        if mask is None and self.kv_splits != 1:
            splits = self.splits_for(q, k)
            if splits > 1:
                return split_kv_attention(q, k, v, splits, sdpa_lse(self.backend))
        with self._context(q, mask is not None):
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
            )
        return out.transpose(1, 2)
