"""CUDA-graph capture of whole forwards, one graph per shape, replayed with static inputs."""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping
from typing import Any

import torch
from torch import nn

from flashdreams.graph.base import GraphPolicy
from flashdreams.graph.compile import compile_blocks, compile_static, inductor_options

log = logging.getLogger(__name__)


def _flatten(args) -> list[torch.Tensor]:
    """The tensors of ``args``, nested in lists, tuples and dicts (by sorted key)."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(_flatten(a))
        elif isinstance(a, dict):
            out.extend(_flatten([a[k] for k in sorted(a)]))
    return out


def _rebuild(args, tensors):
    it = iter(tensors)

    def walk(a):
        if isinstance(a, torch.Tensor):
            return next(it)
        if isinstance(a, (list, tuple)):
            return type(a)(walk(x) for x in a)
        if isinstance(a, dict):
            return {k: walk(a[k]) for k in sorted(a)}
        return a

    return [walk(a) for a in args]


def capture(fn, warmup: int = 1, pool=None, stream: torch.cuda.Stream | None = None):
    """Run ``fn()`` ``warmup`` times on a side stream, then capture one call of it as a CUDA
    graph (in ``pool``, on ``stream``); returns the graph and that call's static output."""
    stream = torch.cuda.Stream() if stream is None else stream
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, stream=stream):
        output = fn()
    return graph, output


class _Captured:
    """One captured forward: static input buffers, the graph, its static output."""

    def __init__(self, fn, args, pool, stream: torch.cuda.Stream, warmup: int) -> None:
        flat = _flatten(args)
        self.inputs = [t.clone() for t in flat]
        self.sources: list = [None] * len(flat)  # (tensor, version) last copied per input
        static_args = _rebuild(args, self.inputs)
        self.graph, self.output = capture(lambda: fn(*static_args), warmup, pool, stream)

    def replay(self, args, replayed: set[int] = frozenset()):
        """Copy changed inputs into the static buffers and replay. ``replayed``: ids of the
        static outputs of graphs (a replay rewrites them without bumping their version, so
        one fed back as an input, a control encoder's causal cache, is always copied)."""
        for i, (dst, src) in enumerate(zip(self.inputs, _flatten(args), strict=False)):
            last = self.sources[i]
            if (last is None or last[0] is not src or last[1] != src._version
                    or id(src) in replayed):  # fmt: skip
                dst.copy_(src, non_blocking=True)  # the prompt's K/V are copied once, not per call
                self.sources[i] = (src, src._version)
        self.graph.replay()
        return self.output


class CudaGraphPolicy(GraphPolicy):
    """Captures each forward shape once and replays it.

    Every distinct (argument shapes, ``shape_key``) gets its own graph; all graphs share one
    memory pool (they run one at a time). The KV cache is read through fixed buffers with the
    write slots in a device index tensor, so a replay sees the current cache contents, never
    the ones present at capture. With ``precapture`` the loop runs every shape it will meet
    (one per KV length while the cache fills, one when it is steady) during warm-up, so no
    capture happens inside a timed step. On CPU (or ``shape_key=None``) it runs eagerly.

    Args:
        compile: compile the blocks first (``compile_cuda_graph``).
        mode: Inductor mode when compiling.
        warmup: eager runs before each capture.
        precapture: capture every future shape during warm-up.
        fuse_gelu: when compiling, the FFN's first linear + GELU as one GEMM (GELU epilogue).
        fuse_norms: when compiling, norms / modulation / residuals / q-k norm + RoPE fused.
        inductor: when compiling, extra Inductor options (``CompilePolicy``).
    """

    name = "cuda_graph"

    def __init__(self, compile: bool = False, mode: str = "max-autotune-no-cudagraphs",
                 warmup: int = 2, precapture: bool = True, fuse_gelu: bool = True,
                 fuse_norms: bool = True, inductor: Mapping[str, Any] | None = None) -> None:  # fmt: skip
        self.compile, self.mode, self.warmup, self.precapture = compile, mode, warmup, precapture
        self.fuse_gelu, self.fuse_norms = fuse_gelu, fuse_norms
        self.inductor = inductor_options(inductor)
        self.name = "compile_cuda_graph" if compile else "cuda_graph"  # the option's name
        self.captures, self.compiles = True, bool(compile)
        self.graphs: dict[Hashable, _Captured] = {}
        self._outputs: set[int] = set()  # ids of the graphs' static outputs (alive with them)
        self.pool = None
        self.stream: torch.cuda.Stream | None = None

    def wants_precapture(self, device: torch.device) -> bool:
        return self.precapture and device.type == "cuda"

    def wrap(self, fn):
        if not self.compile:
            return fn
        return compile_static(fn, self.mode, options=self.inductor)

    def prepare(self, model: nn.Module) -> nn.Module:
        if self.compile:
            compile_blocks(model, self.mode, False, self.fuse_gelu, self.fuse_norms, self.inductor)
        return model

    def run(self, fn, *args, shape_key):
        flat = _flatten(args)
        if shape_key is None or not flat or flat[0].device.type != "cuda":
            return fn(*args)
        names = tuple(tuple(sorted(a)) for a in args if isinstance(a, dict))  # named inputs
        key = (shape_key, names, tuple((tuple(t.shape), t.dtype) for t in flat))
        if key not in self.graphs:
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
                self.stream = torch.cuda.Stream()
            log.info("capturing a CUDA graph for shape key %s", shape_key)
            self.graphs[key] = _Captured(fn, args, self.pool, self.stream, self.warmup)
            self._outputs.update(id(t) for t in _flatten([self.graphs[key].output]))
        return self.graphs[key].replay(args, self._outputs)

    def reset(self) -> None:
        """Graphs stay valid across clips (they read buffers, not values); nothing to drop."""

    def invalidate(self) -> None:
        self.graphs.clear()
        self._outputs.clear()
