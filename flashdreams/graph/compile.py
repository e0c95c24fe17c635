"""torch.compile of the transformer blocks (Inductor, without Inductor's own CUDA graphs)."""

from __future__ import annotations

import torch
from torch import nn

from flashdreams.graph.eager import EagerPolicy

# One compiled function serves every static shape a process runs: a rollout's block sizes and
# key lengths, a reconstituted context's history sizes, each scene of a super-resolution sweep,
# every recipe a server or a test session builds (dynamo keys its cache on the code object, so
# all models share one count). Dynamo's default of 8 entries fails a fullgraph compile at the
# ninth shape (seen on the H200: HY-WorldPlay's GPU tests, FlashVSR's third scene).
RECOMPILE_LIMIT = 128


def compile_static(fn, mode: str = "default", dynamic: bool | None = False, **kwargs):
    """``torch.compile(fn, fullgraph=True)`` for static shapes, with dynamo's per-code-object
    recompile limit raised to ``RECOMPILE_LIMIT`` (never lowered)."""
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
    return torch.compile(fn, mode=mode, dynamic=dynamic, fullgraph=True, **kwargs)


def compile_blocks(model: nn.Module, mode: str, dynamic: bool | None,
                   fuse_gelu: bool = True, fuse_norms: bool = True) -> nn.Module:  # fmt: skip
    """Compile the attention-free regions of every block in place.

    Blocks name their regions in ``_compile_regions`` (static shapes: the block's tokens);
    attention stays on its pinned kernel. All blocks share the compiled code (parameters are
    graph inputs), so compile time does not grow with depth. Before compiling, q/k/v become one
    projection, (``fuse_gelu``) the FFN's first linear takes its GELU as a GEMM epilogue and
    (``fuse_norms``) each norm + modulation + residual runs as one Triton pass.
    """
    for block in model.blocks:
        block.self_attn.fuse_qkv()
        if fuse_gelu and hasattr(block, "fuse_ffn_gelu"):
            block.fuse_ffn_gelu()
        if fuse_norms and hasattr(block, "fuse_norms"):
            block.fuse_norms()
        for name in getattr(block, "_compile_regions", ()):
            region = getattr(block, name)
            setattr(block, name, compile_static(region, mode, dynamic))
    return model


class CompilePolicy(EagerPolicy):
    """Compiles the blocks once; forwards then run the compiled code eagerly.

    Args:
        mode: Inductor mode; ``max-autotune-no-cudagraphs`` autotunes GEMMs without capturing.
        dynamic: passed to ``torch.compile`` (the regions have static shapes; False is right).
        fuse_gelu: the FFN's first linear + GELU as one GEMM with a GELU epilogue.
        fuse_norms: norms, modulation, gated residuals and q/k norm + RoPE as one pass each.
    """

    name = "compile"
    compiles = True

    def __init__(self, mode: str = "default", dynamic: bool | None = False,
                 fuse_gelu: bool = True, fuse_norms: bool = True):  # fmt: skip
        self.mode, self.dynamic, self.fuse_gelu = mode, dynamic, fuse_gelu
        self.fuse_norms = fuse_norms

    def wrap(self, fn):
        return compile_static(fn, self.mode, self.dynamic)

    def prepare(self, model: nn.Module) -> nn.Module:
        return compile_blocks(model, self.mode, self.dynamic, self.fuse_gelu, self.fuse_norms)
