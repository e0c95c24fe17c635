"""The fused norm / residual (``fused_norms``) and q-k RoPE (``fused_rope``) kernels on a GPU
against the unfused math.

At the 1.3B block shape (3 frames x 1560 tokens, width 1536, 12 heads), batch 2 so that the
per-frame modulation rows are indexed across batches: the fp32 residual equals the reference to
fp32 rounding (the kernel may contract ``x + y * gate`` into one FMA), the bf16 outputs to a
relative L2 of 2e-3 (the LayerNorm's sums run in another order, which moves a few elements by
one bf16 step). Replayed in a CUDA graph, a kernel sees new inputs.
"""

import pytest
import torch

from flashdreams.graph.cuda_graph import capture
from flashdreams.model import fused_norms as fused
from flashdreams.model import fused_rope
from flashdreams.model.layers import Rope3D, gated_residual
from tests.gpu.helpers import rel_l2

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CUDA, BF16 = torch.device("cuda"), torch.bfloat16
B, FRAMES, SEQ, WIDTH, HEADS = 2, 3, 3 * 1560, 1536, 12


def _inputs(width=WIDTH):
    g = torch.Generator(device=CUDA).manual_seed(0)

    def rnd(*shape, dtype=torch.float32, scale=1.0):
        return torch.randn(*shape, device=CUDA, generator=g, dtype=dtype) * scale

    return {
        "x": rnd(B, SEQ, width) * 3 + 1,
        "y": rnd(B, SEQ, 2 * width, dtype=BF16)[..., width:],  # a strided view (a projection)
        "e0": rnd(B, FRAMES, 6, width, scale=0.3), "table": rnd(1, 6, width, scale=0.1),
        "w": rnd(width, scale=0.2) + 1, "b": rnd(width, scale=0.2),
    }  # fmt: skip


def _mod(t, k):
    """The unfused block's modulation chunk k (None: all six)."""
    mod = t["table"] + t["e0"]
    return mod if k is None else mod[:, :, k]


@torch.no_grad()
@pytest.mark.parametrize("width, chunk", [
    (WIDTH, None), (5120, None),  # Wan 1.3B, 14B as built in (14B add_norm: 1024-column chunks)
    (WIDTH, 1024),  # chunks of unequal length (1024 + 512 live columns), merged statistics
    (5120, 0),  # 14B rows whole in registers
])  # fmt: skip
@pytest.mark.parametrize(
    "kind", ["norm_modulate", "add_norm_affine", "add_norm_modulate", "add_norm_next_table"]
)
def test_norm_kernels_match_the_unfused_math(kind, width, chunk, monkeypatch):
    monkeypatch.setattr(fused, "CHUNK", {} if chunk is None else {width: chunk})
    t = _inputs(width)
    if kind == "norm_modulate":
        h = fused.norm_modulate(t["x"], None, None, t["e0"], t["table"], 0, 1, 1e-6, BF16)
        ref = fused._norm_reference(t["x"], None, None, _mod(t, 0), _mod(t, 1), 1e-6, BF16)
    else:
        gate, w, b, shift, scale = {
            "add_norm_affine": (2, t["w"], t["b"], -1, -1),
            "add_norm_modulate": (-1, None, None, 3, 4),
            "add_norm_next_table": (5, None, None, 0, 1),  # FFN residual + the next norm1
        }[kind]
        following = t["table"].flip(-1) if kind == "add_norm_next_table" else None
        xo, h = fused.add_norm(t["x"], t["y"], t["e0"], t["table"], gate, w, b, shift, scale,
                               1e-6, BF16, following)  # fmt: skip
        xo_ref = gated_residual(t["x"], t["y"], _mod(t, gate) if gate >= 0 else None)
        norm_mod = _mod(t, None) if following is None else (following + t["e0"])
        sh, sc = (norm_mod[:, :, k] if k >= 0 else None for k in (shift, scale))
        ref = fused._norm_reference(xo_ref, w, b, sh, sc, 1e-6, BF16)
        assert xo.dtype == torch.float32
        assert torch.allclose(xo, xo_ref, rtol=1e-6, atol=1e-6)
    assert h.dtype == BF16 and h.shape == ref.shape
    assert rel_l2(h, ref) <= 2e-3
    assert float((h.float() - ref.float()).abs().max()) <= 0.1  # a bf16 step at |h| ~ 10


@torch.no_grad()
@pytest.mark.parametrize("width, chunk", [(WIDTH, None), (5120, None), (WIDTH, 1024), (5120, 0)])
def test_gated_add_matches_and_replays_in_a_graph(width, chunk, monkeypatch):
    monkeypatch.setattr(fused, "CHUNK", {} if chunk is None else {width: chunk})
    t = _inputs(width)
    out = fused.gated_add(t["x"], t["y"], t["e0"], t["table"], 5)
    assert torch.allclose(out, gated_residual(t["x"], t["y"], _mod(t, 5)), 1e-6, 1e-6)
    args = (t["e0"], t["table"], 2, t["w"], t["b"], -1, -1, 1e-6, BF16)
    graph, captured = capture(lambda: fused.add_norm(t["x"], t["y"], *args))
    t["x"].mul_(0.5)
    t["e0"].add_(1.0)
    graph.replay()
    eager = fused.add_norm(t["x"], t["y"], *args)
    assert all(torch.equal(c, e) for c, e in zip(captured, eager, strict=True))


@torch.no_grad()
@pytest.mark.parametrize("width, heads", [
    (WIDTH, HEADS),  # 12 heads in 16-head tiles
    (5120, 40),  # the 14B blocks: 40 heads in 64-head tiles
    (WIDTH, 16),  # head size 96: 48 pairs per head is no power of two, the unfused path runs
])  # fmt: skip
def test_qk_norm_rope_matches_the_modules(width, heads):
    g = torch.Generator(device=CUDA).manual_seed(0)
    qkv = torch.randn(B, SEQ, 3 * width, device=CUDA, generator=g, dtype=BF16) * 2
    q, k = qkv[..., :width], qkv[..., width : 2 * width]  # views of the fused projection
    wq, wk = (torch.rand(width, device=CUDA, generator=g) + 0.5 for _ in range(2))
    cos, sin = Rope3D(width // heads).cos_sin(torch.arange(5, 5 + FRAMES, device=CUDA), 30, 52)
    qo, ko = fused_rope.qk_norm_rope(q, k, wq, wk, cos, sin, heads, 1e-6)
    qr, kr = fused_rope.qk_norm_rope_reference(q, k, wq, wk, cos, sin, heads, 1e-6)
    assert qo.shape == qr.shape == (B, SEQ, heads, width // heads) and qo.dtype == BF16
    assert rel_l2(qo, qr) <= 2e-3 and rel_l2(ko, kr) <= 2e-3
    # the rotation is applied (not only the norm): the kernel differs from the norm alone
    normed = torch.nn.functional.rms_norm(q.float(), (width,), eps=1e-6).to(BF16) * wq.to(BF16)
    assert rel_l2(qo, normed.unflatten(-1, (heads, -1))) > 0.1


@torch.no_grad()
@pytest.mark.parametrize("width", [WIDTH, 5120])
def test_odd_frame_length_keeps_each_program_in_one_frame(width):
    """7 tokens per frame: the kernels drop to one row per program (rows share a frame's
    modulation within a program), and still match the per-token reference."""
    g = torch.Generator(device=CUDA).manual_seed(1)
    x = torch.randn(2, 21, width, device=CUDA, generator=g)
    y = torch.randn(2, 21, width, device=CUDA, generator=g, dtype=BF16)
    e0 = torch.randn(2, 3, 6, width, device=CUDA, generator=g)
    table = torch.randn(1, 6, width, device=CUDA, generator=g)
    mod = table + e0
    xo, h = fused.add_norm(x, y, e0, table, 2, None, None, 0, 1, 1e-6, BF16)
    want_x = gated_residual(x, y, mod[:, :, 2])
    assert torch.allclose(xo, want_x, rtol=1e-6, atol=1e-6)
    want = fused._norm_reference(want_x, None, None, mod[:, :, 0], mod[:, :, 1], 1e-6, BF16)
    assert rel_l2(h, want) <= 2e-3
