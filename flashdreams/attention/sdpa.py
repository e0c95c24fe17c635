"""PyTorch scaled_dot_product_attention with an optionally pinned kernel."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from flashdreams import ConfigError
from flashdreams.attention.base import AttentionBackend

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
    """

    def __init__(self, backend: str = "auto") -> None:
        if backend not in _BACKENDS:
            raise ConfigError(f"attention.backend={backend!r} is not one of {sorted(_BACKENDS)}")
        self.backend = backend
        self.name = f"sdpa_{backend}"

    def _context(self, q: torch.Tensor, masked: bool) -> contextlib.AbstractContextManager:
        kernel = _BACKENDS[self.backend]
        if kernel is None or q.device.type != "cuda":
            return contextlib.nullcontext()
        if masked and kernel == SDPBackend.FLASH_ATTENTION:
            return contextlib.nullcontext()
        return sdpa_kernel([kernel, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])

    def __call__(self, q, k, v, mask=None):
        with self._context(q, mask is not None):
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
            )
        return out.transpose(1, 2)
