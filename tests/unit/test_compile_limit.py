"""Compiled regions serve more static shapes than dynamo's default recompile limit allows."""

from __future__ import annotations

import pytest
import torch

from flashdreams import ConfigError
from flashdreams.graph.compile import (
    RECOMPILE_LIMIT,
    CompilePolicy,
    inductor_options,
    uncached_multi_kernel,
)
from flashdreams.graph.cuda_graph import CudaGraphPolicy


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


def test_extra_inductor_options_are_flattened_checked_and_applied():
    """``graph.inductor`` takes Inductor's own option names, nested as Hydra writes them; a
    compile with them computes the eager result, and a misspelt name is a one-line error that
    names it before anything compiles."""
    assert inductor_options({"triton": {"multi_kernel": 1}, "max_autotune": False}) == {
        "triton.multi_kernel": 1,
        "max_autotune": False,
    }
    assert inductor_options(None) == {}

    def region(x):
        return torch.softmax(x * 3, dim=-1)

    fn = CompilePolicy(inductor={"triton": {"persistent_reductions": False}}).wrap(region)
    x = torch.randn(4, 300)
    torch.testing.assert_close(fn(x), region(x))
    for policy in (CompilePolicy, lambda **kw: CudaGraphPolicy(compile=True, **kw)):
        with pytest.raises(ConfigError, match=r"^graph\.inductor\.triton\.multi_kernal: not an"):
            policy(inductor={"triton": {"multi_kernal": 1}})


def test_multi_kernel_regions_skip_the_compile_caches_on_torch_2_11():
    """torch 2.11 fails the second process that loads a multi-kernel region from its caches:
    there such regions compile uncached; other options, and newer torch, keep the caches."""
    mk = {"triton.multi_kernel": 1}
    assert uncached_multi_kernel(mk, "2.11.0+cu130") == {"fx_graph_cache": False, **mk}
    assert uncached_multi_kernel({**mk, "fx_graph_cache": True}, "2.11.0") == {
        **mk,
        "fx_graph_cache": True,
    }
    assert uncached_multi_kernel(mk, "2.13.0+cpu") == mk
    assert uncached_multi_kernel({"triton.multi_kernel": 0}, "2.11.0") == {"triton.multi_kernel": 0}
    assert inductor_options({"fx_graph_cache": False}) == {"fx_graph_cache": False}


def test_a_compile_that_fails_with_extra_options_is_one_line_naming_them(monkeypatch):
    """An option can break Inductor where its default compiles (torch 2.11's multi-kernel on
    Matrix-Game): the first call then fails with one ConfigError line that names the options
    and Inductor's own reason, not a compiler traceback."""

    def broken_compile(fn, **kwargs):
        def run(*args):
            failed = torch._dynamo.exc.BackendCompilerFailed  # its __init__ varies by version
            err = failed.__new__(failed)
            Exception.__init__(err, "backend='inductor' raised: TypeError")
            err.inner_exception = TypeError(
                "'NoneType' object does not support the context manager protocol"
            )
            raise err

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    fn = CompilePolicy(inductor={"triton": {"multi_kernel": 1}}).wrap(lambda x: x + 1)
    with pytest.raises(ConfigError, match=r"^graph\.inductor \(triton\.multi_kernel=1\): Inductor "
                       r"failed to compile with it \(TypeError: 'NoneType' object"):  # fmt: skip
        fn(torch.ones(2))
