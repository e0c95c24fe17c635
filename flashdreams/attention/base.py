"""Protocol of an attention backend: one call signature for every kernel choice."""

from __future__ import annotations

import contextlib

import torch


class AttentionBackend:
    """Computes softmax attention on (B, L, H, D) tensors.

    Subclasses pin one kernel (cuDNN, flash, efficient, flex, ...). The parallel group may wrap a
    backend to shard heads or sequence across ranks; the model only calls it.
    """

    name: str = "base"
    #: whether a K/V bound from the cache (``kv_amax``) saves the backend a pass over K and V;
    #: the rollout then builds its cache with ``track_amax``
    wants_kv_amax: bool = False
    #: whether ``exact()`` changes what calls compute; a graph policy then captures the forwards
    #: run inside it (the KV-cache commit) apart from the others
    has_exact_mode: bool = False
    #: the ``routes()`` keys of calls that ran the backend's own kernel(s); every other key is a
    #: ``fallback:<reason>`` (pinned SDPA in its place) or an ``emulated:<reason>``
    kernel_routes: tuple[str, ...] = ("sdpa",)
    #: every route key this backend may count, reported as 0 until a call takes it
    known_routes: tuple[str, ...] = ("sdpa",)
    #: why the backend's own kernel cannot run in this process at all (a missing package), or
    #: None; a benchmark prints it beside a run whose calls all fell back
    kernel_unavailable: str | None = None
    #: the name ``route_report`` prints (None: ``name``; a backend whose ``name`` becomes its
    #: fallback's when the kernel is missing keeps its own here)
    route_label: str | None = None

    def _route(self, route: str) -> None:
        """Count one call under ``route``: a dict increment on the host. Skipped while dynamo
        traces (a compiled region holding the call would otherwise guard on the count)."""
        if torch.compiler.is_compiling():
            return
        routes = self.__dict__.get("_routes")
        if routes is None:
            routes = self._routes = {}
        routes[route] = routes.get(route, 0) + 1

    def routes(self) -> dict[str, int]:
        """Calls per route since construction (or ``reset_routes``): the kernel's key(s)
        (``kernel_routes``) and each ``fallback:<reason>`` / ``emulated:<reason>``, every
        ``known_routes`` key present (0 if never taken). A copy.

        Counted on the host per Python call of the backend: CUDA-graph replays do not re-run
        Python, so under a graph policy the counts are of the eager and captured calls (each
        captured call once), not of the kernels replayed; calls traced by ``torch.compile`` are
        not counted (the blocks' attention runs outside the compiled regions).
        """
        out = dict.fromkeys(self.known_routes, 0)
        out.update(self.__dict__.get("_routes", {}))
        return out

    def reset_routes(self) -> None:
        """Zero the counts of ``routes()``."""
        self._routes = {}

    def exact(self) -> contextlib.AbstractContextManager:
        """Calls inside run at the model's own precision (a reduced-precision backend's
        fallback kernel); the rollout runs the commit, which writes the KV cache, inside."""
        return contextlib.nullcontext()

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None = None,
        kv_amax: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Attend.

        Args:
            q: (B, Lq, H, D) queries.
            k: (B, Lk, H, D) keys.
            v: (B, Lk, H, D) values.
            mask: optional (Lq, Lk) boolean mask, True = may attend.
            kv_amax: optional (|K| bound, |V| bound), each a (1,) fp32 tensor, from a KV cache
                that tracks them (``KVCache(track_amax=True)``); backends that quantize use it.

        Returns:
            (B, Lq, H, D) attention output in q's dtype.
        """
        raise NotImplementedError


ROUTES_COUNTED = "host-side Python calls of the backend (CUDA-graph replays are not counted)"


def route_report(backend: AttentionBackend) -> dict:
    """``backend.routes()`` with what a benchmark records beside it (bench.json): the backend's
    label, its kernel route(s), kernel and non-kernel totals, and why the kernel is missing."""
    routes = backend.routes() if hasattr(backend, "routes") else {}
    kernel = tuple(getattr(backend, "kernel_routes", ()))
    return {
        "backend": getattr(backend, "route_label", None) or getattr(backend, "name", "?"),
        "kernel_routes": list(kernel),
        "kernel_calls": sum(n for r, n in routes.items() if r in kernel),
        "other_calls": sum(n for r, n in routes.items() if r not in kernel),
        "routes": routes,
        "kernel_unavailable": getattr(backend, "kernel_unavailable", None),
        "counted": ROUTES_COUNTED,
    }


def route_lines(report: dict) -> list[str]:
    """The summary line of a ``route_report`` (``attention: cudnn_fp8 kernel 120 calls, fallback
    90 (short_keys 60, exact 30)``) and, where the kernel ran for no call while others ran, a
    WARNING line: the numbers measured are the fallback's."""
    kernel, routes = report["kernel_routes"], report["routes"]
    own = [(r, routes.get(r, 0)) for r in kernel]
    text = f"attention: {report['backend']} kernel {report['kernel_calls']} calls"
    if len(own) > 1:
        text += " (" + ", ".join(f"{r} {n}" for r, n in own) + ")"
    groups: dict[str, list[tuple[str, int]]] = {}
    for route, n in routes.items():
        if route not in kernel and n:
            group, _, reason = route.partition(":")
            groups.setdefault(group, []).append((reason or group, n))
    groups = {g: sorted(r, key=lambda x: -x[1]) for g, r in sorted(groups.items())}
    for group, reasons in groups.items():  # emulated, then fallback; largest reason first
        text += f", {group} {sum(n for _, n in reasons)} ("
        text += ", ".join(f"{r} {n}" for r, n in reasons) + ")"
    lines = [text]
    if report["kernel_calls"] == 0 and report["other_calls"] > 0:
        why = [r for g in groups.values() for r, _ in g]
        if report.get("kernel_unavailable"):
            why.append(report["kernel_unavailable"])
        lines.append(
            f"WARNING: attention {report['backend']}: its kernel ({'/'.join(kernel)}) ran for no "
            f"call; all {report['other_calls']} calls took the {' / '.join(groups)} path "
            f"({', '.join(why)}): the numbers are the fallback's, not {report['backend']}'s"
        )
    return lines


class Attention:
    """The attention the transformer blocks call: a backend composed with a sequence hook.

    Built in one place (``ParallelPolicy.attention``) and installed with ``DiT.set_attention``.
    The blocks name what they attend to, so a parallel policy never has to guess it:

    * ``self_attention(q, k, v, mask, kv_amax)``: the block's queries against the keys the KV
      cache returned (sharded across ranks under context parallelism);
    * ``cross_attention(q, k, v)``: queries against replicated context K/V (text, image);
    * ``sequence``: the model's token hook around the blocks (``scatter`` / ``gather``).

    Args:
        backend: the kernel choice (``attention=`` config group).
        sequence: the token hook (identity for one process).
    """

    def __init__(self, backend: AttentionBackend, sequence=None) -> None:
        from flashdreams.parallel.base import SequenceParallel

        self.backend = backend
        self.sequence = sequence if sequence is not None else SequenceParallel()

    @property
    def name(self) -> str:
        return self.backend.name

    @property
    def has_exact_mode(self) -> bool:
        return self.backend.has_exact_mode

    @property
    def wants_kv_amax(self) -> bool:
        return self.backend.wants_kv_amax

    def exact(self) -> contextlib.AbstractContextManager:
        return self.backend.exact()

    @property
    def kv_written_at_update(self) -> bool:
        """Whether a layer's K/V are in the cache once ``cache.update`` returned, so a forward
        that only writes K/V (``DiT.forward_kv``) may skip the last layer's attention; False
        where the self-attention call completes an exchange (context parallelism)."""
        return True

    def self_attention(self, q, k, v, mask=None, kv_amax=None) -> torch.Tensor:
        """(B, Lq, H, D) queries against the cache's (B, Lk, H, D) keys and values."""
        return self.backend(q, k, v, mask, kv_amax)

    def cross_attention(self, q, k, v) -> torch.Tensor:
        """(B, Lq, H, D) queries against context K/V shared by every rank."""
        return self.backend(q, k, v)

    def __call__(self, q, k, v, mask=None, kv_amax=None) -> torch.Tensor:
        """A plain call is a self-attention call (tests and micro-benchmarks)."""
        return self.self_attention(q, k, v, mask, kv_amax)
