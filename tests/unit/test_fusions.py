"""Fusions a compiled graph policy applies: FFN linear + GELU(tanh) as one op, K/V rows written
into the cache by one scatter, norms / modulation / residuals / q-k norm + RoPE as one pass each.
CPU checks of the shared math and wiring (the CUDA kernels are checked against the same
references in tests/gpu/test_fusions_gpu.py and tests/gpu/test_fused_norms_gpu.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
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


def _block_and_inputs(batch: int = 2, camera: bool = False):
    from flashdreams.model.layers import Rope3D

    torch.manual_seed(0)
    block = WanBlock(64, 128, 4, 1e-6, True, False, camera=camera)
    for p in block.parameters():
        nn.init.normal_(p, std=0.1)
    block.self_attn.fuse_qkv()
    x = torch.randn(batch, 3 * 8, 64)
    e0 = torch.randn(batch, 3, 6, 64)
    cos, sin = Rope3D(16).cos_sin(torch.arange(4, 7), 2, 4)  # frames 4..6, a 2 x 4 grid
    return block, x, e0, cos, sin


@torch.no_grad()
def _regions(block, x, e0, cos, sin, cam=None):
    """The block's three regions around an SDPA self-attention and a stand-in cross output."""
    q, k, v = block.self_attn_in(x, e0, cos, sin)
    y = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    x2, q_cross = block.self_attn_out(x, y, e0, cam)
    return q, k, v, x2, q_cross, block.cross_out_ffn(x2, q_cross, e0)


def test_fused_norms_keep_every_region_output():
    """fuse_norms swaps each norm / residual / q-k RoPE stage for its fused op; without CUDA the
    ops run the unfused math, so each region's outputs stay equal, also under torch.compile
    (the ops trace through their fakes) and for a block whose camera injection sits between the
    residual and norm3 (that region keeps its unfused path)."""
    import copy

    for camera in (False, True):
        block, x, e0, cos, sin = _block_and_inputs(camera=camera)
        cam = torch.randn_like(x) if camera else None
        ref = _regions(block, x, e0, cos, sin, cam)
        fused_block = copy.deepcopy(block)
        fused_block.fuse_norms()
        assert fused_block.fused_norms and not block.fused_norms
        for out, want in zip(_regions(fused_block, x, e0, cos, sin, cam), ref, strict=True):
            assert out.dtype == want.dtype and torch.allclose(out, want, atol=1e-5)
    for name in fused_block._compile_regions:
        region = getattr(fused_block, name)
        setattr(fused_block, name, torch.compile(region, fullgraph=True))
    for out, want in zip(_regions(fused_block, x, e0, cos, sin, cam), ref, strict=True):
        assert torch.allclose(out, want, atol=1e-5)


def test_compile_blocks_fuses_norms_unless_told_not_to():
    blocks = nn.Module()
    blocks.blocks = nn.ModuleList([WanBlock(32, 64, 4, 1e-6, True, False) for _ in range(2)])
    compile_blocks(blocks, "default", False, fuse_norms=False)
    assert not any(b.fused_norms for b in blocks.blocks)
    blocks.blocks = nn.ModuleList([WanBlock(32, 64, 4, 1e-6, True, False) for _ in range(2)])
    compile_blocks(blocks, "default", False)
    assert all(b.fused_norms for b in blocks.blocks)


def test_fused_ops_take_modulation_chunks_and_check_their_inputs():
    from flashdreams.model import fused_norms as fused

    torch.manual_seed(0)
    x, y = torch.randn(2, 12, 8), torch.randn(2, 12, 16)[..., 8:]
    e0, table = torch.randn(2, 3, 6, 8), torch.randn(1, 6, 8)
    mod = table + e0  # (B, F, 6, C): what the unfused block computes
    xo, h = fused.add_norm(x, y, e0, table, 2, None, None, 0, 1, 1e-6, torch.bfloat16)
    gated = x + (y.unflatten(1, (3, 4)) * mod[:, :, 2, None]).flatten(1, 2)
    assert torch.allclose(xo, gated, atol=1e-6) and h.dtype == torch.bfloat16
    want = F.layer_norm(gated, (8,), eps=1e-6).unflatten(1, (3, 4))
    want = (want * (1 + mod[:, :, 1, None]) + mod[:, :, 0, None]).flatten(1, 2)
    assert torch.allclose(h.float(), want, rtol=1e-2, atol=1e-2)  # one bf16 rounding
    assert torch.allclose(fused.gated_add(x, y, e0, table, 2), gated, atol=1e-6)
    assert torch.equal(fused.gated_add(x, y, None, None, -1), x + y)
    with pytest.raises(ValueError, match="12 tokens do not split into 5 frames"):
        fused.norm_modulate(x, None, None, torch.randn(2, 5, 6, 8), None, 0, 1, 1e-6,
                            torch.float32)  # fmt: skip
    with pytest.raises(ValueError, match="give both or neither"):
        fused.norm_modulate(x, None, None, e0, table, 0, -1, 1e-6, torch.float32)
    with pytest.raises(ValueError, match="without e0"):
        fused.gated_add(x, y, None, None, 5)
    with pytest.raises(ValueError, match="does not match"):
        fused.gated_add(x, y, e0, torch.randn(6, 4), 5)


def test_qk_norm_rope_reference_is_the_modules():
    from flashdreams.model import fused_rope as fused
    from flashdreams.model.layers import RMSNorm, Rope3D, apply_rope

    torch.manual_seed(0)
    q, k = torch.randn(2, 2, 24, 64, dtype=torch.bfloat16).unbind(0)  # (B, L, C) each
    nq, nk = RMSNorm(64), RMSNorm(64)
    nn.init.normal_(nq.weight), nn.init.normal_(nk.weight)
    cos, sin = Rope3D(16).cos_sin(torch.arange(3), 2, 4)
    qo, ko = fused.qk_norm_rope(q, k, nq.weight, nk.weight, cos, sin, 4, 1e-6)
    assert torch.equal(qo, apply_rope(nq(q).unflatten(-1, (4, 16)), cos, sin))
    assert torch.equal(ko, apply_rope(nk(k).unflatten(-1, (4, 16)), cos, sin))


def test_as_rows_views_token_rows_and_copies_only_when_it_must():
    from flashdreams.kernels import as_rows

    qkv = torch.randn(2, 5, 3 * 12)
    k = qkv[..., 12:24]  # (B, L, C) view of a fused projection: rows 36 apart
    rows = as_rows(k)
    assert rows.shape == (10, 12) and rows.data_ptr() == k.data_ptr()
    assert torch.equal(rows, k.reshape(10, 12))
    heads_last = torch.randn(2, 5, 4, 3).transpose(2, 3)  # (B, L, 3, 4) not packed: a copy
    rows = as_rows(heads_last)
    assert rows.shape == (10, 12) and torch.equal(rows, heads_last.reshape(10, 12))
    assert torch.equal(as_rows(k.transpose(0, 1).transpose(0, 1)), k.reshape(10, 12))


@torch.no_grad()
def test_fused_blocks_hand_norm1_to_the_next_block(monkeypatch):
    """Between fused blocks the FFN's gated residual and the next block's norm1 run as one
    ``add_norm`` (its shift / scale from the next block's table): the model's output stays
    that of the unfused blocks, only the first block runs a separate ``norm_modulate``, and a
    block that is not fused breaks the chain."""
    import copy

    from flashdreams.model import fused_norms as fused
    from flashdreams.model.wan import WanDiT

    model = WanDiT(dim=64, num_heads=4, num_layers=3, ffn_dim=128, text_dim=32, text_len=8)
    model.init_weights(torch.Generator().manual_seed(0))
    for p in model.parameters():  # non-trivial norms, biases and tables
        p.add_(torch.randn_like(p) * 0.05)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 3, 4, 6, generator=gen)
    t = torch.tensor([[900.0, 900.0, 500.0]] * 2)
    ctx = model.prepare_context(torch.randn(2, 8, 32, generator=gen))
    want = model(x, t, ctx)

    calls = {"norm_modulate": 0, "norm_table": 0}
    norm_modulate, add_norm = fused.norm_modulate, fused.add_norm

    def counting_norm(*args):
        calls["norm_modulate"] += 1
        return norm_modulate(*args)

    def counting_add_norm(*args):
        calls["norm_table"] += len(args) > 11 and args[11] is not None
        return add_norm(*args)

    monkeypatch.setattr(fused, "norm_modulate", counting_norm)
    monkeypatch.setattr(fused, "add_norm", counting_add_norm)
    fused_model = copy.deepcopy(model)
    for block in fused_model.blocks:
        block.fuse_norms()
    torch.testing.assert_close(fused_model(x, t, ctx), want, rtol=0, atol=1e-5)
    assert calls == {"norm_modulate": 1, "norm_table": 2}
    assert fused_model.blocks[2].chain_norm1(None, x) is None  # the last block: nothing to hand
    compiled = compile_blocks(copy.deepcopy(model), "default", False)  # as graph=compile runs it
    torch.testing.assert_close(compiled(x, t, ctx), want, rtol=0, atol=1e-5)
    fused_model.blocks[1].fused_norms = False  # 0 -> 1 and 1 -> 2 cannot chain
    calls.update(norm_modulate=0, norm_table=0)
    torch.testing.assert_close(fused_model(x, t, ctx), want, rtol=0, atol=1e-5)
    assert calls == {"norm_modulate": 2, "norm_table": 0}


def test_add_norm_takes_shift_and_scale_from_another_table():
    from flashdreams.model import fused_norms as fused

    torch.manual_seed(0)
    x, y = torch.randn(2, 12, 8), torch.randn(2, 12, 8)
    e0, table, following = torch.randn(2, 3, 6, 8), torch.randn(1, 6, 8), torch.randn(1, 6, 8)
    xo, h = fused.add_norm(x, y, e0, table, 5, None, None, 0, 1, 1e-6, torch.float32, following)
    assert torch.allclose(xo, fused.gated_add(x, y, e0, table, 5), atol=1e-6)
    want = fused.norm_modulate(xo, None, None, e0, following, 0, 1, 1e-6, torch.float32)
    assert torch.allclose(h, want, atol=1e-6)
    other = fused.norm_modulate(xo, None, None, e0, table, 0, 1, 1e-6, torch.float32)
    assert not torch.allclose(h, other, atol=1e-3)  # the other table's chunks were used
    with pytest.raises(ValueError, match="does not match"):
        fused.add_norm(x, y, e0, table, 5, None, None, 0, 1, 1e-6, torch.float32,
                       torch.randn(6, 4))  # fmt: skip
