"""``offload=blocks``: transformer block weights in pinned CPU memory, streamed in per block.

The device holds two block-sized slots. While block i computes from one slot, a side CUDA
stream copies block i+1's weights into the other; events order the two streams:

    side stream:     wait free[s']  -> copy block i+1 -> record ready[s']
    compute stream:  wait ready[s]  -> block i        -> record free[s]

so a copy never overwrites a slot a running block still reads, and a block never starts before
its weights have arrived. The last block prefetches block 0 for the next forward, and the
per-prompt cross-attention K/V (``prepare_context``) walk the blocks the same way.

On CPU (no streams) the same code runs synchronously: host copies, slots, loads and pointer
swaps are all exercised, so tests can check outputs against the resident model.

Composes with: graph=eager, any attention backend, precision=bf16|fp8 (the e4m3 buffers are
streamed like weights), kv_cache=fp8. Not with graph=compile / cuda_graph /
compile_cuda_graph (rejected at build): CUDA graphs bake in the weight addresses that
offloading swaps, and compiled regions with swapped weights are untested.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from flashdreams import ConfigError

log = logging.getLogger(__name__)

OFFLOAD_MODES = ("none", "blocks")


def check_offload(mode: str, graph, idle_expert: bool = False) -> None:
    """One-line ``ConfigError`` for an unknown mode or a graph policy it does not compose with.

    ``graph`` is the graph policy: what it does with weights (``captures``: replays fixed
    addresses; ``compiles``: compiled regions) decides. ``idle_expert`` is
    ``model.offload_idle_expert`` (two-expert models), which moves weights between forwards as
    well; checked here, before any weights load.
    """
    if idle_expert and graph.captures:
        raise ConfigError("model.offload_idle_expert=true moves expert weights between forwards, "
                          "which captured CUDA graphs cannot follow; use graph=eager or compile")  # fmt: skip
    if mode not in OFFLOAD_MODES:
        raise ConfigError(f"offload={mode!r} is not one of: {', '.join(OFFLOAD_MODES)}")
    if mode == "blocks" and (graph.captures or graph.compiles):
        raise ConfigError(
            f"offload=blocks works with graph=eager only, not graph={graph.name} (CUDA graphs "
            "bake in the weight addresses it swaps per block; compiled regions are untested)"
        )


def _block_tensors(block: nn.Module) -> list[tuple[nn.Module, str, bool]]:
    """(module, name, is_parameter) of every parameter and buffer of a block, in a fixed order."""
    out = []
    for _, module in block.named_modules():
        out += [(module, n, True) for n, p in module._parameters.items() if p is not None]
        out += [(module, n, False) for n, b in module._buffers.items() if b is not None]
    return out


class BlockOffloader:
    """Streams ``model.blocks`` from host memory through two device slots (see module doc).

    Construction moves everything outside the blocks to ``device`` and the block weights to
    (pinned, on CUDA) host memory, then installs hooks on each block's forward and on its
    cross-attention ``context_kv``.

    Args:
        model: a DiT with ``blocks`` of identical structure (any device; CPU avoids a full
            device copy while loading).
        device: where the blocks compute.

    Attributes:
        num_loads: host-to-device block copies issued so far.
        host_bytes: bytes of block weights kept in host memory.
        slot_bytes: device bytes of the two slots.
    """

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.device = torch.device(device)
        self.blocks = list(model.blocks)
        self.context_methods = tuple(model.block_context_methods)
        self.entries = [_block_tensors(b) for b in self.blocks]
        signature = [self._signature(e) for e in self.entries]
        if any(s != signature[0] for s in signature):
            raise ConfigError("offload=blocks needs transformer blocks of identical shapes")
        cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if cuda else None
        self.host = [[self._to_host(self._get(m, n), cuda) for m, n, _ in e] for e in self.entries]
        self.slots = [[torch.empty_like(t, device=self.device) for t in self.host[0]]
                      for _ in range(2)]  # fmt: skip
        self.ready = [torch.cuda.Event() if cuda else None for _ in range(2)]
        self.free = [torch.cuda.Event() if cuda else None for _ in range(2)]
        self.loaded: list[int | None] = [None, None]  # block index held by each slot
        self.active: dict[int, int] = {}  # block -> slot while it computes
        self.num_loads = 0
        for i in range(len(self.blocks)):
            self._point(i, 0)  # drop the original copies; contents arrive with the first load
        model.to(self.device)  # the rest: embeddings, head (block tensors are already there)
        self._install()
        self.host_bytes = sum(t.numel() * t.element_size() for ts in self.host for t in ts)
        self.slot_bytes = 2 * sum(t.numel() * t.element_size() for t in self.slots[0])
        log.info("offload=blocks: %d blocks, %.2f GiB in host memory, %.2f GiB device slots",
                 len(self.blocks), self.host_bytes / 2**30, self.slot_bytes / 2**30)  # fmt: skip

    # ------------------------------------------------------------------ tensors
    @staticmethod
    def _get(module: nn.Module, name: str) -> torch.Tensor:
        return module._parameters.get(name, module._buffers.get(name))

    def _signature(self, entries) -> list[tuple]:
        return [(tuple(self._get(m, n).shape), self._get(m, n).dtype) for m, n, _ in entries]

    @staticmethod
    def _to_host(t: torch.Tensor, pin: bool) -> torch.Tensor:
        host = t.detach().to("cpu")
        return host.pin_memory() if pin else host.clone()  # its own memory, never a slot's

    def _point(self, block: int, slot: int) -> None:
        """Make block ``block``'s parameters and buffers the tensors of ``slot``."""
        for (module, name, is_param), t in zip(self.entries[block], self.slots[slot], strict=True):
            if is_param:
                module._parameters[name].data = t
            else:
                module._buffers[name] = t

    # ------------------------------------------------------------------ streaming
    def _load(self, block: int, slot: int) -> None:
        """Copy block ``block`` into ``slot`` once the block last computed there is done."""
        self.loaded[slot] = block
        self.num_loads += 1
        pairs = zip(self.slots[slot], self.host[block], strict=True)
        if self.stream is None:
            for dst, src in pairs:
                dst.copy_(src)
            return
        self.stream.wait_event(self.free[slot])
        with torch.cuda.stream(self.stream):
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)
            self.ready[slot].record(self.stream)

    def _enter(self, block: int) -> None:
        """Before block ``block`` computes: its weights resident, the next block's in flight."""
        if block in self.loaded:  # prefetched (the usual case) or still there
            slot = self.loaded.index(block)
        else:  # first use, or an out-of-order access: load now (blocks run one at a time)
            slot = 0
            self._load(block, slot)
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ready[slot])
        self._point(block, slot)
        self.active[block] = slot
        following = (block + 1) % len(self.blocks)
        if self.loaded[1 - slot] != following:
            self._load(following, 1 - slot)

    def _exit(self, block: int) -> None:
        slot = self.active.pop(block)
        if self.stream is not None:
            self.free[slot].record(torch.cuda.current_stream(self.device))

    def _install(self) -> None:
        for i, block in enumerate(self.blocks):
            block.register_forward_pre_hook(lambda _m, _a, i=i: self._enter(i))
            block.register_forward_hook(lambda _m, _a, _o, i=i: self._exit(i))
            for path in self.context_methods:  # the model's per-prompt methods (DiT contract)
                owner_path, _, name = path.rpartition(".")
                owner = block.get_submodule(owner_path) if owner_path else block
                setattr(owner, name, self._resident(i, getattr(owner, name)))

    def _resident(self, block: int, fn: Callable) -> Callable:
        """``fn`` (a method reading block ``block``'s weights) run with the block resident."""

        def call(*args, **kwargs):
            self._enter(block)
            try:
                return fn(*args, **kwargs)
            finally:
                self._exit(block)

        return call
