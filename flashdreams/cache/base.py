"""Protocol of a block KV cache for block-causal AR attention."""

from __future__ import annotations

import torch

from flashdreams import ConfigError
from flashdreams.cache.scatter import write_rows
from flashdreams.precision.fp8 import FP8, dequantize, quantize_rowwise
from flashdreams.precision.fp8_tensor import running_amax


class KV(tuple):
    """What a cache's ``update`` returns: ``(k, v)``, the (B, Lk, H, D) keys and values a
    block's queries attend to, and ``amax``: for caches with ``track_amax`` the (|K| bound,
    |V| bound) as (1,) fp32 tensors (a quantizing attention's ``kv_amax``), else None."""

    def __new__(cls, k: torch.Tensor, v: torch.Tensor,
                amax: tuple[torch.Tensor, torch.Tensor] | None = None) -> KV:  # fmt: skip
        kv = super().__new__(cls, (k, v))
        kv.amax = amax
        return kv


def kv_amax(kv) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The bounds of an ``update`` result (a stand-in cache may return a plain (k, v))."""
    return kv.amax if isinstance(kv, KV) else None


class KVCache:
    """Static per-layer K/V buffers laid out (B, L, H, D), written in place.

    Per-AR-step protocol (the rollout loop drives it):

    1. ``begin_block(start_frame, num_frames)`` selects the token slots of the block that starts
       at absolute frame ``start_frame`` and the range of valid keys for its forwards.
    2. Every forward of that block (each denoising step, then the commit at t = 0) calls
       ``update(layer, k, v)`` in every layer: this writes the block's K/V into its slots,
       overwriting what the previous forward of the same block wrote, and returns the keys and
       values the block's queries attend to (sink + window + the block itself).

    Keys are stored after RoPE at absolute positions, so slot order never matters to attention.
    Buffers are allocated once; only index tensors and the valid length change, which is what
    graph capture needs.

    Args:
        num_layers: transformer layers.
        num_heads: attention heads.
        head_dim: dims per head.
        tokens_per_frame: latent tokens per frame (h * w after patching).
        frames_per_block: latent frames of the run's largest AR block (the block schedule's:
            a rolling window must hold it).
        total_frames: latent frames of the whole rollout (a full cache holds them all; no cache
            allocates more), or None for an endless stream.
        batch_size: batch.
        device: buffer device.
        dtype: dtype of the K/V that ``update`` returns (and of the buffers by default).
        kv_dtype: storage dtype of the buffers; ``torch.float8_e4m3fn`` stores e4m3 with one
            fp32 scale per (token, head), quantized on write and dequantized on read.
        track_amax: keep, per layer, the largest |K| and |V| written since ``reset`` (one fp32
            scalar each, updated on the device by every write) and return it with the K/V of
            ``update`` (``KV.amax``), for the attention's ``kv_amax`` argument. It bounds the valid
            range's amax, so FP8 attention with per-tensor scales skips a pass over the cache.
    """

    capacity_frames: int
    #: old frames make room for new ones (an endless stream fits); a finite run is given the
    #: capacity it needs, never more
    rolls: bool = False

    def __init__(
        self,
        *,
        num_layers: int,
        num_heads: int,
        head_dim: int,
        tokens_per_frame: int,
        frames_per_block: int,
        total_frames: int | None,
        batch_size: int = 1,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        kv_dtype: torch.dtype | None = None,
        track_amax: bool = False,
    ) -> None:
        self.num_layers = num_layers
        self.tokens_per_frame = tokens_per_frame
        self.frames_per_block = frames_per_block
        self.total_frames = total_frames
        self.capacity_frames = self._capacity()
        shape = (batch_size, self.capacity_frames * tokens_per_frame, num_heads, head_dim)
        self.dtype, store = dtype, kv_dtype or dtype
        self.k = [torch.zeros(shape, device=device, dtype=store) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=store) for _ in range(num_layers)]
        self.k_scale: list[torch.Tensor] | None = None  # (B, L, H, 1) fp32 when stored in e4m3
        self.v_scale: list[torch.Tensor] | None = None
        if store == FP8:
            self.k_scale = [torch.ones(shape[:-1] + (1,), device=device) for _ in self.k]
            self.v_scale = [torch.ones(shape[:-1] + (1,), device=device) for _ in self.v]
        self.k_amax: list[torch.Tensor] | None = None  # (1,) fp32 per layer with track_amax
        self.v_amax: list[torch.Tensor] | None = None
        if track_amax:
            self.k_amax = [torch.zeros(1, device=device) for _ in range(num_layers)]
            self.v_amax = [torch.zeros(1, device=device) for _ in range(num_layers)]
        self.write_index = torch.zeros(0, dtype=torch.long, device=device)
        # one index buffer per block length, kept for the cache's life: a captured graph bakes
        # in the buffer's address, so a block of another length (an image frame committed
        # before 3-frame blocks) must not replace the buffer the graph reads
        self._index_buffers: dict[int, torch.Tensor] = {}
        self.valid_tokens = 0
        self.filled_frames = 0

    def _capacity(self) -> int:
        """Frames the buffers hold."""
        raise NotImplementedError

    def capacity_for(self, total_frames: int | None) -> int:
        """Frames a cache of this policy and settings holds for a run of ``total_frames``
        (None: an endless stream), without building it (a server sizes sessions with it)."""
        own = self.total_frames
        self.total_frames = total_frames
        try:
            return self._capacity()
        finally:
            self.total_frames = own

    def sizer(self) -> KVCache:
        """A copy of this cache's settings without its buffers, for ``capacity_for`` after the
        cache itself is freed."""
        twin = object.__new__(type(self))
        plain = (int, float, bool, str, type(None))
        twin.__dict__.update({k: v for k, v in vars(self).items() if isinstance(v, plain)})
        return twin

    def frame_slot(self, frame: int) -> int:
        """Buffer slot of absolute latent frame ``frame``."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget all blocks (buffers keep their memory; contents become invalid)."""
        self.valid_tokens = 0
        self.filled_frames = 0
        for amax in (self.k_amax or []) + (self.v_amax or []):
            amax.zero_()  # in place: captured graphs keep reading these buffers

    @property
    def is_steady(self) -> bool:
        """True once the valid key range no longer grows (shapes are static from here on)."""
        return self.filled_frames >= self.capacity_frames

    def begin_context(self, num_frames: int) -> None:
        """Prepare a reconstituted context of ``num_frames`` history frames (``DiT.context_plan``):
        only caches built for it can (``cache=context``)."""
        raise ConfigError(f"the model re-runs history frames before each block, which "
                          f"{type(self).__name__} cannot hold; use cache=context")  # fmt: skip

    def begin_block(self, start_frame: int, num_frames: int) -> None:
        """Select slots and valid keys for the block [start_frame, start_frame + num_frames)."""
        slots = [self.frame_slot(f) for f in range(start_frame, start_frame + num_frames)]
        tpf = self.tokens_per_frame
        idx = torch.tensor(slots, dtype=torch.long)[:, None] * tpf + torch.arange(tpf)[None]
        idx = idx.flatten().to(self.write_index.device, non_blocking=True)
        buffer = self._index_buffers.get(idx.numel())
        if buffer is None:
            buffer = self._index_buffers[idx.numel()] = torch.empty_like(idx)
        buffer.copy_(idx)
        self.write_index = buffer
        self.filled_frames = min(
            max(self.filled_frames, start_frame + num_frames), self.capacity_frames
        )
        self.valid_tokens = self.filled_frames * tpf

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> KV:
        """Write this block's K/V (B, L, H, D) and return the attended K/V (B, Lk, H, D)."""
        self.write(layer, self.write_index, k, v)  # e4m3 storage: quantized here
        k, v = self.read(layer)  # the valid range (dequantized from e4m3)
        amax = None if self.k_amax is None else (self.k_amax[layer], self.v_amax[layer])
        return KV(k, v, amax)

    def write(self, layer: int, index: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store K/V (B, n, H, D) in the token slots ``index`` (n,) of ``layer``."""
        if self.k_amax is not None:
            running_amax(self.k_amax[layer], k)
            running_amax(self.v_amax[layer], v)
        for buffers, scales, x in ((self.k, self.k_scale, k), (self.v, self.v_scale, v)):
            if scales is None:
                write_rows(buffers[layer], index, x)
                continue
            q, scale = quantize_rowwise(x)  # (B, n, H, D) e4m3, (B, n, H, 1) fp32
            buffers[layer].view(torch.uint8).index_copy_(1, index, q.view(torch.uint8))
            scales[layer].index_copy_(1, index, scale)

    def read(
        self, layer: int, index: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of ``layer`` in ``dtype``: the valid range (B, Lk, H, D), or the slots ``index``."""
        out = []
        for buffers, scales in ((self.k, self.k_scale), (self.v, self.v_scale)):
            x = self._select(buffers[layer], index)
            if scales is not None:
                x = dequantize(x, self._select(scales[layer], index), self.dtype)
            out.append(x)
        return out[0], out[1]

    def _select(self, t: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        if index is None:
            return t[:, : self.valid_tokens]
        if t.dtype == FP8:  # index kernels take the bytes; e4m3 has none of its own on CPU
            return t.view(torch.uint8).index_select(1, index).view(FP8)
        return t.index_select(1, index)
