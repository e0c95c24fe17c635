"""torch.compile of the transformer blocks (Inductor, without Inductor's own CUDA graphs)."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from flashdreams import ConfigError
from flashdreams.graph.eager import EagerPolicy

# One compiled function serves every static shape a process runs: a rollout's block sizes and
# key lengths, a reconstituted context's history sizes, each scene of a super-resolution sweep,
# every recipe a server or a test session builds (dynamo keys its cache on the code object, so
# all models share one count). Dynamo's default of 8 entries fails a fullgraph compile at the
# ninth shape (seen on the H200: HY-WorldPlay's GPU tests, FlashVSR's third scene).
RECOMPILE_LIMIT = 128


@functools.cache
def _inductor_names() -> frozenset[str]:
    """Inductor's option names (read once: each compiled region checks its options)."""
    return frozenset(torch._inductor.config.get_config_copy())


def inductor_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Extra Inductor options (the ``graph.inductor`` setting) as ``torch.compile`` takes them:
    nested mappings flattened to dotted names (``{triton: {multi_kernel: 1}}`` ->
    ``{"triton.multi_kernel": 1}``), each checked against Inductor's own option names.

    Raises:
        ConfigError: an option Inductor does not have (one line, naming it).
    """
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        else:
            flat[prefix] = value

    walk("", options or {})
    for name in flat:
        if name not in _inductor_names():
            raise ConfigError(f"graph.inductor.{name}: not an Inductor option "
                             "(see torch._inductor.config)")  # fmt: skip
    return flat


def uncached_multi_kernel(extra: dict[str, Any], version: str) -> dict[str, Any]:
    """``extra`` plus ``fx_graph_cache=False`` where ``triton.multi_kernel`` is on and
    torch is older than 2.13 (unless the option is set): torch 2.11 loads a multi-kernel
    region from its compile caches with its Triton kernels' hash lock dropped, so the second
    process compiling the same region fails (``TypeError: 'NoneType' object does not support
    the context manager protocol``; H200, OmniDreams, nineteenth session); 2.13 restores the
    lock on load. Such regions are compiled afresh in every process (the FX graph cache off
    also bypasses the AOTAutograd cache)."""
    major, minor = (int(x) for x in version.split("+")[0].split(".")[:2])
    if (
        not extra.get("triton.multi_kernel")
        or "fx_graph_cache" in extra
        or (major, minor) >= (2, 13)
    ):
        return extra
    return {"fx_graph_cache": False, **extra}


def compile_static(fn, mode: str = "default", dynamic: bool | None = False,
                   options: Mapping[str, Any] | None = None, **kwargs):  # fmt: skip
    """``torch.compile(fn, fullgraph=True)`` for static shapes, with dynamo's per-code-object
    recompile limit raised to ``RECOMPILE_LIMIT`` (never lowered).

    ``options``: extra Inductor options (``inductor_options``) on top of ``mode``'s own
    (``torch.compile`` takes a mode or options, not both, so the mode is expanded into them).
    """
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
    extra = uncached_multi_kernel(inductor_options(options), torch.__version__)
    if extra:
        merged = {**torch._inductor.list_mode_options(mode, dynamic), **extra}
        compiled = torch.compile(fn, options=merged, dynamic=dynamic, fullgraph=True, **kwargs)
        return _naming_failures(compiled, extra)
    return torch.compile(fn, mode=mode, dynamic=dynamic, fullgraph=True, **kwargs)


def _naming_failures(compiled, extra: dict[str, Any]):
    """``compiled`` whose compile failures become one ``ConfigError`` line naming the extra
    Inductor options it ran with (an option can break Inductor where its default does not:
    torch 2.11's ``triton.multi_kernel`` on Matrix-Game's regions)."""
    names = ", ".join(f"{name}={value}" for name, value in extra.items())

    def call(*args, **kwargs):
        try:
            return compiled(*args, **kwargs)
        except torch._dynamo.exc.BackendCompilerFailed as err:
            cause = getattr(err, "inner_exception", None) or err
            said = (str(cause).strip().splitlines() or [""])[0]
            raise ConfigError(f"graph.inductor ({names}): Inductor failed to compile with it "
                              f"({type(cause).__name__}: {said}); run without it") from err  # fmt: skip

    return call


def compile_blocks(model: nn.Module, mode: str, dynamic: bool | None,
                   fuse_gelu: bool = True, fuse_norms: bool = True,
                   options: Mapping[str, Any] | None = None) -> nn.Module:  # fmt: skip
    """Compile the attention-free regions of every block in place.

    Blocks name their regions in ``_compile_regions`` (static shapes: the block's tokens);
    attention stays on its pinned kernel. All blocks share the compiled code (parameters are
    graph inputs), so compile time does not grow with depth. Before compiling, q/k/v become one
    projection, (``fuse_gelu``) the FFN's first linear takes its GELU as a GEMM epilogue and
    (``fuse_norms``) each norm + modulation + residual runs as one Triton pass. ``options``:
    extra Inductor options (``compile_static``).
    """
    for block in model.blocks:
        block.self_attn.fuse_qkv()
        if fuse_gelu and hasattr(block, "fuse_ffn_gelu"):
            block.fuse_ffn_gelu()
        if fuse_norms and hasattr(block, "fuse_norms"):
            block.fuse_norms()
        for name in getattr(block, "_compile_regions", ()):
            region = getattr(block, name)
            setattr(block, name, compile_static(region, mode, dynamic, options))
    return model


class CompilePolicy(EagerPolicy):
    """Compiles the blocks once; forwards then run the compiled code eagerly.

    Args:
        mode: Inductor mode; ``max-autotune-no-cudagraphs`` autotunes GEMMs without capturing.
        dynamic: passed to ``torch.compile`` (the regions have static shapes; False is right).
        fuse_gelu: the FFN's first linear + GELU as one GEMM with a GELU epilogue.
        fuse_norms: norms, modulation, gated residuals and q/k norm + RoPE as one pass each.
        inductor: extra Inductor options, e.g. ``{"triton.multi_kernel": 1}`` (persistent
            reductions for rows up to 16k wide, the faster variant picked per kernel at the
            first run).
    """

    name = "compile"
    compiles = True

    def __init__(self, mode: str = "default", dynamic: bool | None = False,
                 fuse_gelu: bool = True, fuse_norms: bool = True,
                 inductor: Mapping[str, Any] | None = None):  # fmt: skip
        self.mode, self.dynamic, self.fuse_gelu = mode, dynamic, fuse_gelu
        self.fuse_norms = fuse_norms
        self.inductor = inductor_options(inductor)  # checked when the recipe is built

    def wrap(self, fn):
        return compile_static(fn, self.mode, self.dynamic, self.inductor)

    def prepare(self, model: nn.Module) -> nn.Module:
        return compile_blocks(model, self.mode, self.dynamic, self.fuse_gelu, self.fuse_norms,
                              self.inductor)  # fmt: skip
