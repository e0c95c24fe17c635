"""Context parallelism on torch.distributed: the shared policy behind ulysses, ring and usp.

Per forward, with ``u`` ranks per all-to-all group and ``r`` per ring (``u * r`` = world):

1. ``scatter``: every rank keeps its slice of every frame's tokens (``layout.TokenLayout``);
   patchify, time embedding and RoPE tables are computed for the whole block on each rank.
2. Blocks run on the shard. In self-attention the KV stand-in's ``update`` sends K/V to their
   owners (all-to-all to heads when ``u > 1``; pad tokens dropped) and then writes this rank's
   KV cache share; the attention call moves Q the same way, attends (over the ring of K/V
   chunks when ``r > 1``) and moves the output back. Cross-attention needs no traffic: the
   text K/V are replicated and queries are independent.
3. ``gather``: the head's per-token output (a few channels) is all-gathered and unsharded, so
   every rank holds the same flow prediction and steps the same scheduler with the same noise.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from flashdreams import ConfigError
from flashdreams.attention.base import Attention, AttentionBackend
from flashdreams.cache.base import KV
from flashdreams.parallel.all_to_all import (
    heads_to_sequence,
    keys_to_heads,
    local_heads,
    overlapped_attention,
    queries_to_heads,
)
from flashdreams.parallel.base import ParallelPolicy, SequenceParallel
from flashdreams.parallel.layout import TokenLayout
from flashdreams.parallel.ring_attention import ring_attention

log = logging.getLogger(__name__)

_GROUPS: dict[tuple[int, ...], object] = {}  # subgroups, created once per world (collective)


def _group(ranks: list[int]):
    """The process group of ``ranks`` (every rank must ask for every group, in one order)."""
    if len(ranks) == dist.get_world_size():
        return dist.group.WORLD
    key = tuple(ranks)
    if key not in _GROUPS:
        _GROUPS[key] = dist.new_group(list(ranks))
    return _GROUPS[key]


class ContextParallel(ParallelPolicy):
    """Tokens sharded over all ranks; self-attention by all-to-all (ulysses) x ring.

    Args:
        ulysses_degree: ranks per all-to-all group (null: world size / ring_degree).
        ring_degree: ranks per ring (null: world size / ulysses_degree).
        timeout_s: seconds a collective may wait for a peer; past it this rank fails, naming
            itself, and the launcher ends the job.
        fp8_all_to_all: Ulysses exchanges (Q, K/V, O) as float8 e4m3 with per-head scales
            (half the bytes of bf16; needs ulysses_degree > 1).
        async_qkv: Ulysses exchanges issued asynchronously and overlapped with the compute
            around them (``all_to_all.py``: K with V's packing, V with K's row pick, each head
            chunk's Q/O with another chunk's attention); same values; needs ulysses_degree > 1.
    """

    name = "context"

    def __init__(self, ulysses_degree: int | None = None, ring_degree: int | None = None,
                 timeout_s: float = 600.0, fp8_all_to_all: bool = False,
                 async_qkv: bool = False) -> None:  # fmt: skip
        self.ulysses_degree, self.ring_degree = ulysses_degree, ring_degree
        self.timeout_s = timeout_s
        self.fp8_all_to_all = bool(fp8_all_to_all)
        self.async_qkv = bool(async_qkv)
        self.ulysses = self.ring = 1
        self.ulysses_group = self.ring_group = None
        self.ring_ranks: list[int] = [0]
        self._owns_group = False
        self._layouts: dict[int, TokenLayout] = {}

    # ------------------------------------------------------------------ process group
    def setup(self, device):
        if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            device = self._join(device)
        if dist.is_initialized():
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        if not self.is_main:
            logging.getLogger().setLevel(logging.ERROR)  # only rank 0 logs (errors: all)
        self.ulysses, self.ring = self._degrees()
        for key in ("fp8_all_to_all", "async_qkv"):
            if getattr(self, key) and self.world_size > 1 and self.ulysses == 1:
                raise ConfigError(f"parallel.{key}=true needs an all-to-all: parallel="
                                  f"{self.name} runs ulysses_degree 1 (use ulysses or usp)")  # fmt: skip
        if self.world_size > 1:
            self._make_groups()
            log.info("%s: rank %d of %d, ulysses %d x ring %d, %s", self.name, self.rank,
                     self.world_size, self.ulysses, self.ring, dist.get_backend())  # fmt: skip
        return device

    def _join(self, device):
        """init_process_group from torchrun's env: nccl on CUDA, gloo on CPU, bounded timeout."""
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=self.timeout_s),
                                device_id=device if device.type == "cuda" else None)  # fmt: skip
        self._owns_group = True
        return device

    def _degrees(self) -> tuple[int, int]:
        w, u, r = self.world_size, self.ulysses_degree, self.ring_degree
        for key, value in (("ulysses_degree", u), ("ring_degree", r)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"parallel.{key}={value} must be a positive integer or null")
        if u is None and r is None:
            u = w
        for key, given in (("ring_degree", r), ("ulysses_degree", u)):
            if given is not None and w % given:
                raise ConfigError(f"parallel.{key}={given} does not divide the world size {w} "
                                  "(torchrun --nproc_per_node)")  # fmt: skip
        u, r = (w // r, r) if u is None else (u, w // u if r is None else r)
        if u * r != w:
            raise ConfigError(f"parallel.ulysses_degree={u} x parallel.ring_degree={r} must "
                              f"equal the world size {w} (torchrun --nproc_per_node)")  # fmt: skip
        return u, r

    def _make_groups(self) -> None:
        u, r = self.ulysses, self.ring
        for g in range(r):
            ranks = list(range(g * u, (g + 1) * u))
            group = _group(ranks) if u > 1 else None
            if self.rank in ranks:
                self.ulysses_group = group
        for j in range(u):
            ranks = [g * u + j for g in range(r)]
            group = _group(ranks) if r > 1 else None
            if self.rank in ranks:
                self.ring_group, self.ring_ranks = group, ranks

    def teardown(self) -> None:
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
            _GROUPS.clear()
            self._owns_group = False

    def broadcast(self, obj):
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    # ------------------------------------------------------------------ model wiring
    def layout(self, tokens_per_frame: int) -> TokenLayout:
        """Token ownership for frames of ``tokens_per_frame`` tokens (memoized)."""
        if tokens_per_frame not in self._layouts:
            self._layouts[tokens_per_frame] = TokenLayout(
                tokens_per_frame, self.ulysses, self.ring, self.rank
            )
        return self._layouts[tokens_per_frame]

    def attention(self, backend: AttentionBackend) -> Attention:
        if self.world_size == 1:
            return Attention(backend)
        return ContextParallelAttention(backend, ShardedSequence(self))

    def cache_factory(self, factory):
        if self.world_size == 1:
            return factory

        def local_share(**dims):
            dims["tokens_per_frame"] = self.layout(dims["tokens_per_frame"]).group_tokens()
            dims["num_heads"] = local_heads(dims["num_heads"], self.ulysses)
            return factory(**dims)

        return local_share


class ShardedSequence(SequenceParallel):
    """The model hook of ``ContextParallel``; holds the state of the forward in flight."""

    def __init__(self, policy: ContextParallel) -> None:
        self.policy = policy
        self.layout: TokenLayout | None = None
        self.frames = 0
        self.cached = False

    def scatter(self, tokens, cos, sin, cache, num_frames):
        self.layout = self.policy.layout(tokens.shape[1] // num_frames)
        self.frames, self.cached = num_frames, cache is not None
        idx = self.layout.shard(num_frames, tokens.device)
        sharded = tokens.index_select(1, idx), cos.index_select(0, idx), sin.index_select(0, idx)
        return (*sharded, KVExchange(self, cache))

    def gather(self, out, num_frames):
        world, (b, length, c) = self.policy.world_size, out.shape
        full = out.new_empty(world * b, length, c)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(full, out.contiguous())
        rows = full.view(world, b, length, c).transpose(0, 1).reshape(b, world * length, c)
        return rows.index_select(1, self.layout.unshard(num_frames, out.device))

    def total(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of ``x`` (B, Ls, ...) over the real tokens of every rank (pads dropped), fp32."""
        if self.layout.has_pad:
            x = x.index_select(1, self.layout.local_select(self.frames, x.device))
        out = x.float().sum()
        dist.all_reduce(out)  # every rank holds a disjoint share of the sequence
        return out

    def keys(self, k, v) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's K/V (B, Ls, H, D) -> the keys it stores and attends with."""
        lay, p = self.layout, self.policy
        if p.ulysses > 1:
            return keys_to_heads(k, v, lay, self.frames, p.ulysses_group, p.fp8_all_to_all,
                                 overlap=p.async_qkv)  # fmt: skip
        if lay.has_pad:
            idx = lay.local_select(self.frames, k.device)
            return k.index_select(1, idx), v.index_select(1, idx)
        return k, v

    def self_attention(self, q, k, v, mask, inner: AttentionBackend):
        """Sequence-sharded queries (B, Ls, H, D) against the keys from ``keys``."""
        p, lay = self.policy, self.layout
        num_heads = q.shape[2]
        if mask is not None:
            mask = self._mask(mask)

        def attend(q, k, v):
            if p.ring == 1:
                return inner(q, k, v, mask)
            frames = k.shape[1] // lay.group_tokens()
            lengths = [frames * lay.group_tokens(g) for g in range(p.ring)]
            return ring_attention(q, k, v, ranks=p.ring_ranks, index=lay.group,
                                  chunk_lengths=lengths, group=p.ring_group,
                                  kernel=getattr(inner, "backend", "auto"))  # fmt: skip

        if p.ulysses > 1 and p.async_qkv:
            return overlapped_attention(
                q, lambda qc, a, z: attend(qc, k[:, :, a:z], v[:, :, a:z]),
                p.ulysses, p.ulysses_group, p.fp8_all_to_all,
            )  # fmt: skip
        if p.ulysses > 1:
            q = queries_to_heads(q, p.ulysses, p.ulysses_group, p.fp8_all_to_all)
        out = attend(q, k, v)
        if p.ulysses > 1:
            out = heads_to_sequence(out, num_heads, p.ulysses, p.ulysses_group, p.fp8_all_to_all)
        return out

    def _mask(self, mask: torch.Tensor) -> torch.Tensor:
        """The (L, L) mask of a full-sequence forward, restricted to this rank's rows/columns."""
        if self.policy.ring > 1 or self.cached:
            raise NotImplementedError(
                f"parallel={self.policy.name}: masked attention runs with parallel=ulysses "
                "on cache-free forwards only"
            )
        rows = self.layout.group_queries(self.frames, mask.device)
        cols = self.layout.group_keys(self.frames, mask.device)
        return mask.index_select(0, rows).index_select(1, cols)


class KVExchange:
    """Stands in for the KV cache in a sharded forward: moves K/V, then caches this rank's share.

    Args:
        hook: the forward's ``ShardedSequence``.
        cache: the real (rank-local) KV cache, or None in cache-free forwards.
    """

    def __init__(self, hook: ShardedSequence, cache) -> None:
        self.hook, self.cache = hook, cache

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        k, v = self.hook.keys(k, v)
        if self.cache is None:
            return KV(k, v)
        return self.cache.update(layer, k, v)


class ContextParallelAttention(Attention):
    """The configured backend across ranks: self-attention sharded, cross-attention local.

    The blocks call ``self_attention`` with the keys the KV stand-in (``KVExchange``) returned,
    which already moved them to their owners; cross-attention to the replicated text/image K/V
    runs the backend on this rank's queries, which is exact: queries attend independently.
    """

    def __init__(self, backend: AttentionBackend, hook: ShardedSequence) -> None:
        super().__init__(backend, hook)

    @property
    def name(self) -> str:
        return f"{self.sequence.policy.name}+{self.backend.name}"

    @property
    def kv_written_at_update(self) -> bool:
        return False  # the self-attention call may complete the K/V exchange (async_qkv)

    def self_attention(self, q, k, v, mask=None, kv_amax=None):
        return self.sequence.self_attention(q, k, v, mask, self.backend)
