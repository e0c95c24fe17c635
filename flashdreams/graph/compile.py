"""torch.compile of the transformer blocks (Inductor, without Inductor's own CUDA graphs)."""

from __future__ import annotations

import torch
from torch import nn

from flashdreams.graph.eager import EagerPolicy


def compile_blocks(model: nn.Module, mode: str, dynamic: bool | None) -> nn.Module:
    """Compile each transformer block in place; every block shares one compiled graph."""
    for block in model.blocks:
        block.compile(mode=mode, dynamic=dynamic, fullgraph=False)
    return model


class CompilePolicy(EagerPolicy):
    """Compiles the blocks once; forwards then run the compiled code eagerly.

    Args:
        mode: Inductor mode; ``max-autotune-no-cudagraphs`` autotunes GEMMs without capturing.
        dynamic: ``None`` lets dynamo mark the growing KV length dynamic after it changes.
    """

    name = "compile"

    def __init__(self, mode: str = "max-autotune-no-cudagraphs", dynamic: bool | None = None):
        self.mode, self.dynamic = mode, dynamic

    def prepare(self, model: nn.Module) -> nn.Module:
        torch.set_float32_matmul_precision("high")
        return compile_blocks(model, self.mode, self.dynamic)
