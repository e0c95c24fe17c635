"""Compiled regions serve more static shapes than dynamo's default recompile limit allows."""

from __future__ import annotations

import torch

from flashdreams.graph.compile import RECOMPILE_LIMIT, CompilePolicy


def test_a_compiled_region_takes_more_shapes_than_dynamos_default_limit():
    """A fullgraph compile from a graph policy runs a tenth static shape (dynamo's own limit is
    8 entries per code object: a rollout with a history re-run, a scene sweep or a server with
    several recipes passes it) and still computes the eager result."""

    def region(x):
        return torch.nn.functional.gelu(x) * 2 + 1

    fn = CompilePolicy().wrap(region)
    for n in range(1, 11):
        x = torch.randn(n, 3)
        torch.testing.assert_close(fn(x), region(x))
    assert torch._dynamo.config.recompile_limit >= RECOMPILE_LIMIT
