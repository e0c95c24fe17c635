"""Optional FlashAttention packages (flash-attn 2, FlashAttention-3 ``flash_attn_interface``,
flash-attn-4 ``flash_attn.cute``) on (B, L, H, D) tensors, their native layout.

None of them is a dependency: when the requested package is not importable, the device is not
CUDA, or a call carries a mask (these entry points take none), the call goes to pinned SDPA. The
first fallback of each kind is logged once, never raised.
"""

from __future__ import annotations

import importlib
import logging

from flashdreams import ConfigError
from flashdreams.attention.base import AttentionBackend
from flashdreams.attention.sdpa import SdpaAttention

log = logging.getLogger(__name__)

# version -> (module, function); "auto" tries them in this order
_PACKAGES = {
    "4": ("flash_attn.cute", "flash_attn_func"),
    "3": ("flash_attn_interface", "flash_attn_func"),
    "2": ("flash_attn", "flash_attn_func"),
}


def find_flash_attn(version: str):
    """(name, function) of the first importable package for ``version``, or (None, None)."""
    for v in ("4", "3", "2") if version == "auto" else (version,):
        module, func = _PACKAGES[v]
        try:
            return f"flash-attn {v}", getattr(importlib.import_module(module), func)
        except (ImportError, AttributeError, OSError, RuntimeError):
            continue
    return None, None


class FlashAttnAttention(AttentionBackend):
    """A FlashAttention package's kernel, with pinned SDPA as the clean fallback.

    Args:
        version: ``auto`` (4, then 3, then 2) | ``4`` | ``3`` | ``2``.
        fallback: SDPA kernel used when the package cannot run a call.
    """

    def __init__(self, version: str = "auto", fallback: str = "cudnn") -> None:
        version = str(version)
        if version != "auto" and version not in _PACKAGES:
            raise ConfigError(f"attention.version={version!r} is not one of auto, 4, 3, 2")
        self.sdpa = SdpaAttention(fallback)
        self.package, self._func = find_flash_attn(version)
        self.name = self.package.replace(" ", "") if self.package else self.sdpa.name
        self._logged: set[str] = set()
        if self._func is None:
            self._once("missing", "attention=flash_attn: no flash-attn package (version %s) is "
                       "installed; using SDPA (%s)", version, fallback)  # fmt: skip

    def _once(self, kind: str, msg: str, *args) -> None:
        if kind not in self._logged:
            self._logged.add(kind)
            log.info(msg, *args)

    def __call__(self, q, k, v, mask=None):
        if self._func is None:
            return self.sdpa(q, k, v, mask)
        if q.device.type != "cuda" or mask is not None:
            self._once("call", "%s takes no mask and runs on CUDA only; such calls use SDPA",
                       self.package)  # fmt: skip
            return self.sdpa(q, k, v, mask)
        out = self._func(q, k, v)
        return out[0] if isinstance(out, tuple) else out
