"""torch.compile of the transformer blocks (Inductor, without Inductor's own CUDA graphs)."""

from __future__ import annotations

import torch
from torch import nn

from flashdreams.graph.eager import EagerPolicy


def compile_blocks(model: nn.Module, mode: str, dynamic: bool | None,
                   fuse: bool = True) -> nn.Module:  # fmt: skip
    """Compile the attention-free regions of every block in place.

    Blocks name their regions in ``_compile_regions`` (static shapes: the block's tokens);
    attention stays on its pinned kernel. All blocks share the compiled code (parameters are
    graph inputs), so compile time does not grow with depth. Before compiling, q/k/v become one
    projection and, with ``fuse``, the hand-written fusions Inductor does not find are installed:
    the FFN's first linear takes its GELU as a GEMM epilogue, and q/k RMS norm + RoPE run as one
    Triton pass over the projection.
    """
    for block in model.blocks:
        block.self_attn.fuse_qkv()
        if fuse and hasattr(block, "fuse_ffn_gelu"):
            block.fuse_ffn_gelu()
            block.self_attn.fuse_qk_norm_rope()
        for name in getattr(block, "_compile_regions", ()):
            region = getattr(block, name)
            setattr(block, name, torch.compile(region, mode=mode, dynamic=dynamic, fullgraph=True))
    return model


class CompilePolicy(EagerPolicy):
    """Compiles the blocks once; forwards then run the compiled code eagerly.

    Args:
        mode: Inductor mode; ``max-autotune-no-cudagraphs`` autotunes GEMMs without capturing.
        dynamic: passed to ``torch.compile`` (the regions have static shapes; False is right).
        fuse: install the hand-written fusions (FFN GEMM + GELU epilogue, q/k norm + RoPE kernel).
    """

    name = "compile"

    def __init__(self, mode: str = "default", dynamic: bool | None = False,
                 fuse: bool = True):  # fmt: skip
        self.mode, self.dynamic, self.fuse = mode, dynamic, fuse

    def prepare(self, model: nn.Module) -> nn.Module:
        torch.set_float32_matmul_precision("high")
        return compile_blocks(model, self.mode, self.dynamic, self.fuse)
