"""Optional FlashAttention packages (flash-attn 2, FlashAttention-3 ``flash_attn_interface``,
flash-attn-4 ``flash_attn.cute``) on (B, L, H, D) tensors, their native layout.

None of them is a dependency: when the requested package is not importable, the device is not
CUDA, a call carries a mask (these entry points take none), or the package raises on a shape
(an unsupported GPU, head size or dtype: from then on that shape goes straight to SDPA), the call
goes to pinned SDPA. The first fallback of each kind is logged once, never raised, and every
call is counted by route (``routes()``: ``flash_attn`` or ``fallback:<reason>``).
"""

from __future__ import annotations

import importlib
import logging
from functools import partial

import torch

from flashdreams import ConfigError
from flashdreams.attention.base import AttentionBackend
from flashdreams.attention.sdpa import SdpaAttention
from flashdreams.attention.split_kv import KvSplits, split_kv_attention

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


def _tiled(fwd, tile, q, k, v, return_lse=False):
    """flash-attn 4's forward with an explicit tile; ``(out, lse)`` as its public function."""
    with torch.no_grad():
        out, lse = fwd(q, k, v, tile_mn=tile, return_lse=return_lse)[:2]
    return (out, lse) if return_lse else out


class FlashAttnAttention(AttentionBackend):
    """A FlashAttention package's kernel, with pinned SDPA as the clean fallback.

    Args:
        version: ``auto`` (4, then 3, then 2) | ``4`` | ``3`` | ``2``.
        fallback: SDPA kernel used when the package cannot run a call.
        kv_splits: flash-attn 4 only: the keys in that many equal chunks batched into one launch
            and merged by log-sum-exp (``split_kv``; its own split-KV is not built for sm90);
            ``auto`` picks the count from the shape and the SM count; 1 turns it off.
        tile: flash-attn 4 only: ``[tile_m, tile_n]`` of its forward kernel in place of the
            package's per-architecture choice (through its internal ``_flash_attn_fwd``).
        min_keys: calls over fewer keys than this (the 512 text tokens of cross-attention) go to
            the SDPA fallback kernel; 0 sends every unmasked call to the package.
    """

    #: ``routes()``: "flash_attn" (the package's kernel, split or not) or the SDPA fallback's
    #: ``fallback:<reason>``: ``no_package``, ``not_cuda``, ``masked``, ``short_keys`` (under
    #: ``min_keys``), ``unsupported`` (the package raised on this shape, now or before)
    kernel_routes = ("flash_attn",)
    known_routes = ("flash_attn", *(f"fallback:{r}" for r in ("no_package", "not_cuda", "masked",
                                                               "short_keys", "unsupported")))  # fmt: skip

    def __init__(self, version: str = "auto", fallback: str = "cudnn",
                 kv_splits: int | str = 1, tile: list[int] | None = None,
                 min_keys: int = 0) -> None:  # fmt: skip
        version = str(version)
        if int(min_keys) < 0:
            raise ConfigError(f"attention.min_keys={min_keys!r} must be >= 0")
        self.min_keys = int(min_keys)
        if version != "auto" and version not in _PACKAGES:
            raise ConfigError(f"attention.version={version!r} is not one of auto, 4, 3, 2")
        self._logged: set[str] = set()
        self._failed: set[tuple] = set()  # shapes the package raised on: SDPA runs them
        self.splits_for = KvSplits(kv_splits, "attention")
        # the fallback splits the keys the same way (where its kernel returns a log-sum-exp)
        self.sdpa = SdpaAttention(fallback, kv_splits if fallback in ("cudnn", "flash") else 1)
        self.backend = self.sdpa.backend  # the SDPA kernel of log-sum-exp paths (ring attention)
        self.package, self._func = find_flash_attn(version)
        self.name = self.package.replace(" ", "") if self.package else self.sdpa.name
        self.route_label = self.name if self.package else "flash_attn"
        self.kv_splits = kv_splits if self.package == "flash-attn 4" else 1
        if tile is not None and (len(tile) != 2 or any(int(t) % 16 for t in tile)):
            raise ConfigError(f"attention.tile={list(tile)!r} is not [tile_m, tile_n], multiples "
                              "of 16")  # fmt: skip
        self.tile = tuple(int(t) for t in tile) if tile is not None else None
        if self.tile is not None and self.package == "flash-attn 4":
            from flash_attn.cute.interface import _flash_attn_fwd

            self._func = partial(_tiled, _flash_attn_fwd, self.tile)
        if self.package and kv_splits != 1 and self.kv_splits == 1:
            self._once("splits", "attention.kv_splits is implemented for flash-attn 4 (and the "
                       "SDPA fallback) only; %s runs unsplit", self.package)  # fmt: skip
        if self._func is None:
            self.kernel_unavailable = f"no flash-attn package (version {version}) is installed"
            self._once("missing", "attention: no flash-attn package (version %s) is installed; "
                       "using SDPA (%s)", version, fallback)  # fmt: skip

    def _once(self, kind: str, msg: str, *args) -> None:
        if kind not in self._logged:
            self._logged.add(kind)
            log.info(msg, *args)

    def _declines(self, q, mask) -> str | None:
        """Why the package's kernel is not asked at all (not installed, not CUDA, a mask: a
        ``routes()`` reason), or None."""
        if self._func is None:
            return "no_package"
        if q.device.type != "cuda" or mask is not None:
            self._once("call", "%s takes no mask and runs on CUDA only; such calls use SDPA",
                       self.package)  # fmt: skip
            return "masked" if mask is not None else "not_cuda"
        return None

    def __call__(self, q, k, v, mask=None, kv_amax=None):
        why = self._declines(q, mask)
        if why is not None:
            self._route(f"fallback:{why}")
            return self.sdpa(q, k, v, mask)
        shape = (tuple(q.shape), k.shape[1], q.dtype)
        if shape in self._failed or k.shape[1] < self.min_keys:
            self._route("fallback:unsupported" if shape in self._failed else "fallback:short_keys")
            return self.sdpa(q, k, v)
        try:
            if self.kv_splits != 1:
                splits = self.splits_for(q, k)
                if splits > 1:
                    out = split_kv_attention(q, k, v, splits, self._attend_lse)
                    self._route("flash_attn")
                    return out
            out = self._func(q, k, v)
            self._route("flash_attn")
            return out[0] if isinstance(out, tuple) else out
        except torch.OutOfMemoryError:
            raise
        except Exception as err:  # the package declines this GPU / shape / dtype: SDPA takes it
            if q.is_cuda and torch.cuda.is_current_stream_capturing():
                raise  # the first call of a shape runs eagerly (warm-up); never hide a capture
            self._failed.add(shape)
            self._route("fallback:unsupported")
            self._once(f"failed {shape}", "%s cannot run q %s over %d keys (%s: %s); SDPA (%s) "
                       "takes these calls", self.package, list(q.shape), k.shape[1],
                       type(err).__name__, str(err).splitlines()[0] if str(err) else "",
                       self.sdpa.backend)  # fmt: skip
            return self.sdpa(q, k, v)

    def _attend_lse(self, q, k, v):
        out, lse = self._func(q, k, v, return_lse=True)
        return out.transpose(1, 2), lse
