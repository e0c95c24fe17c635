"""Networks outside the DiT (a control's encoder, a streaming decoder) under a graph policy."""

from __future__ import annotations

from collections.abc import Callable, Hashable

from flashdreams.graph.base import GraphPolicy
from flashdreams.graph.eager import EagerPolicy


class GraphRunner:
    """Mixin: ``set_graph(policy)`` then ``run_graph(name, fn, *args, shape_key)``.

    The build hands each owner (a control, a decoder) a fresh instance of the run's ``graph``,
    so capturing one never shares or drops another's graphs (the DiT's included). ``fn`` must be
    a function of tensors (state in, state out: a causal-conv cache); a captured graph's static
    output fed back as its input is recopied on every replay.
    """

    _graph: GraphPolicy = EagerPolicy()  # replaced per owner by ``set_graph``

    def set_graph(self, policy: GraphPolicy) -> None:
        """The graph policy of this owner's own forwards (a fresh instance of the run's)."""
        self._graph = policy
        self._wrapped: dict[str, Callable] = {}

    def run_graph(self, name: str, fn: Callable, *args, shape_key: Hashable | None):
        """``fn(*args)`` under the owner's graph policy: with a ``shape_key`` (a static shape
        that repeats: the steady block) compiled once as ``name`` when the policy compiles and
        captured when it captures; without one (shapes met once) eager."""
        if shape_key is None:
            return fn(*args)
        wrapped = self.__dict__.setdefault("_wrapped", {})
        if name not in wrapped:
            wrapped[name] = self._graph.wrap(fn)
        return self._graph.run(wrapped[name], *args, shape_key=(name, shape_key))
