"""Fusions a compiled graph policy applies: FFN linear + GELU(tanh) as one op, K/V rows written
into the cache by one scatter. CPU checks of the shared math and wiring (the CUDA kernels are
checked against the same references in tests/gpu/test_split_kv_gpu.py)."""

from __future__ import annotations

import torch
from torch import nn

from flashdreams.cache.scatter import write_rows
from flashdreams.graph.compile import compile_blocks
from flashdreams.model.layers import LinearGeluTanh, linear_gelu_tanh
from flashdreams.model.wan import WanBlock


@torch.no_grad()  # an inference op: no autograd formula
def test_linear_gelu_tanh_equals_the_sequential():
    torch.manual_seed(0)
    ffn = nn.Sequential(nn.Linear(16, 40), nn.GELU(approximate="tanh"))
    x = torch.randn(2, 7, 16)
    assert torch.allclose(LinearGeluTanh(ffn[0])(x), ffn(x), atol=1e-6)
    compiled = torch.compile(lambda t: linear_gelu_tanh(t, ffn[0].weight, ffn[0].bias),
                             fullgraph=True)  # fmt: skip
    assert torch.allclose(compiled(x), ffn(x), atol=1e-6)  # the op has a fake for tracing


@torch.no_grad()
def test_block_fuse_keeps_outputs_and_checkpoint_keys():
    torch.manual_seed(0)
    block = WanBlock(32, 64, 4, 1e-6, True, False)
    for p in block.parameters():
        nn.init.normal_(p, std=0.05)
    keys = set(block.state_dict())
    x = torch.randn(1, 12, 32)
    before = block.ffn(x)
    block.fuse_ffn_gelu()
    assert isinstance(block.ffn[0], LinearGeluTanh) and isinstance(block.ffn[1], nn.Identity)
    assert set(block.state_dict()) == keys
    assert torch.allclose(block.ffn(x), before, atol=1e-6)
    block.fuse_ffn_gelu()  # idempotent
    assert isinstance(block.ffn[0], LinearGeluTanh)


def test_compile_blocks_fuses_unless_told_not_to():
    blocks = nn.Module()
    blocks.blocks = nn.ModuleList([WanBlock(32, 64, 4, 1e-6, True, False) for _ in range(2)])
    compile_blocks(blocks, "default", False, fuse_gelu=False)
    assert all(type(b.ffn[0]) is nn.Linear for b in blocks.blocks)
    blocks.blocks = nn.ModuleList([WanBlock(32, 64, 4, 1e-6, True, False) for _ in range(2)])
    compile_blocks(blocks, "default", False)
    assert all(isinstance(b.ffn[0], LinearGeluTanh) for b in blocks.blocks)


def test_write_rows_equals_index_copy():
    torch.manual_seed(0)
    buf, ref = torch.zeros(2, 10, 3, 4), torch.zeros(2, 10, 3, 4)
    qkv = torch.randn(2, 5, 3 * 12)
    v = qkv[..., 24:].unflatten(-1, (3, 4))  # a strided view, as the V of a fused QKV
    index = torch.tensor([7, 8, 9, 0, 1])  # a rolling cache wraps around
    write_rows(buf, index, v)
    ref.index_copy_(1, index, v)
    assert torch.equal(buf, ref)
