"""Precision policies: the dtype of the DiT's block GEMMs and of the KV cache (``precision=``).

``precision=bf16`` changes nothing (weights and cache in the run's dtype). ``precision=fp8``
(``flashdreams.precision.fp8.Fp8Precision``) swaps the block linears for e4m3 ones. Both take
``kv_cache=fp8``: K/V stored in e4m3 with per-(token, head) scales, dequantized on read.
"""

from __future__ import annotations

import torch
from torch import nn

from flashdreams import ConfigError

KV_CACHE_DTYPES = {None: None, "fp8": torch.float8_e4m3fn}


class Precision:
    """The run's dtype everywhere (the reference the other policies are measured against).

    Args:
        kv_cache: ``null`` (K/V in the run's dtype) or ``fp8`` (e4m3 + per-(token, head)
            fp32 scales: about 0.53x the memory of a bf16 cache).
        tf32: True sets torch's float32 matmul precision to ``high`` (TF32 tensor cores) for
            the process when the model is prepared: the fp32 matmuls (the DiT's output head,
            ``dtype=float32`` runs) get faster and lose ~3 decimal digits. False leaves the
            process's setting alone (PyTorch's default is full fp32, as the reference code).
    """

    name = "bf16"

    def __init__(self, kv_cache: str | None = None, tf32: bool = False) -> None:
        if kv_cache not in KV_CACHE_DTYPES:
            raise ConfigError(f"precision.kv_cache={kv_cache!r} is not one of: null, fp8")
        self.kv_cache = kv_cache
        self.tf32 = bool(tf32)
        self.effective = self.name  # what the model runs after ``apply`` (stats.json header)

    @property
    def kv_dtype(self) -> torch.dtype | None:
        """Storage dtype of the KV cache buffers (None: the run's dtype)."""
        return KV_CACHE_DTYPES[self.kv_cache]

    def apply(self, model: nn.Module, device: torch.device) -> nn.Module:
        """Convert a loaded model for its target ``device`` (it may still be on the CPU)."""
        self.set_matmul_precision()
        return model

    def set_matmul_precision(self) -> None:
        """``tf32=true``: fp32 matmuls on TF32 tensor cores (process-wide, asked for)."""
        if self.tf32:
            torch.set_float32_matmul_precision("high")
