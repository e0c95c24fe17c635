"""PRoPE's per-frame 4x4 transform (``apply_tiled``): the compiled form (16 multiply-adds per
group of 4, fused by Inductor) computes what the eager einsum computes, per frame and group."""

from __future__ import annotations

import torch

from flashdreams.model.hy_worldplay.prope import apply_tiled, prope_matrices


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    b, frames, tokens, heads, dim = 2, 3, 5, 2, 8
    x = torch.randn(b, frames * tokens, heads, dim, generator=g).to(torch.bfloat16)
    w2c = torch.linalg.qr(torch.randn(b, frames, 3, 3, generator=g)).Q
    view = torch.eye(4).repeat(b, frames, 1, 1)
    view[..., :3, :3], view[..., :3, 3] = w2c, torch.randn(b, frames, 3, generator=g)
    k = torch.eye(3).repeat(b, frames, 1, 1)
    k[..., 0, 0], k[..., 1, 1] = 0.8, 1.4
    return x, prope_matrices(view, k)


def test_compiled_form_equals_the_einsum_by_hand():
    x, mats = _inputs()
    for m in (mats.q, mats.kv, mats.o):
        eager = apply_tiled(x, m)
        # by hand: frame f's matrix on channels 4g..4g+3 of every token of that frame
        ref = x.float().unflatten(1, (3, 5)).unflatten(-1, (2, 4))  # (B, F, S, H, G, 4)
        ref = torch.einsum("bfij,bfshgj->bfshgi", m, ref).reshape(x.shape).to(x.dtype)
        assert torch.equal(eager, ref)
        compiled = torch.compile(apply_tiled, backend="eager", fullgraph=True)(x, m)
        assert compiled.dtype == x.dtype and compiled.shape == x.shape
        torch.testing.assert_close(compiled.float(), eager.float(), rtol=8e-3, atol=1e-5)


def test_compiled_form_traces_without_a_matmul():
    """What Inductor receives: multiplies and adds, no bmm / einsum (which it hands to cuBLAS
    as an fp32 GEMM)."""
    x, mats = _inputs(1)
    ops = []

    def backend(gm, _):
        ops.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    torch._dynamo.reset()
    torch.compile(apply_tiled, backend=backend, fullgraph=True)(x, mats.q)
    assert ops and not any("einsum" in o or "bmm" in o or "matmul" in o for o in ops)
