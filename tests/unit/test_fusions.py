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
    compile_blocks(blocks, "default", False, fuse=False)
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


@torch.no_grad()
def test_qk_norm_rope_reference_is_the_block_math():
    from flashdreams.model.layers import apply_rope
    from flashdreams.model.qk_rope import qk_norm_rope, qk_norm_rope_reference

    torch.manual_seed(0)
    block = WanBlock(32, 64, 4, 1e-6, True, False)
    sa = block.self_attn
    for p in sa.parameters():
        nn.init.normal_(p, std=0.3)
    sa.fuse_qkv()
    sa.fuse_qk_norm_rope()
    h = torch.randn(2, 6, 32)
    cos, sin = torch.randn(6, 4).cos(), torch.randn(6, 4).sin()
    q, k, _ = sa.project(h)
    want = [
        apply_rope(n(x).unflatten(-1, (4, -1)), cos, sin)
        for n, x in ((sa.norm_q, q), (sa.norm_k, k))
    ]
    qkv = torch.nn.functional.linear(h, sa.qkv_weight, sa.qkv_bias)
    got = qk_norm_rope_reference(qkv[..., :64], sa.qk_norm_weight, cos, sin, 4, sa.norm_q.eps)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    op = torch.compile(qk_norm_rope, fullgraph=True)  # the custom op traces (CPU: the reference)
    assert torch.equal(op(qkv[..., :64], sa.qk_norm_weight, cos, sin, 4, 1e-6), got)
