"""3-D RoPE: frame positions are unbounded and attention sees only their differences."""

from __future__ import annotations

import torch

from flashdreams.model.layers import Rope3D, rope_axis_dims, rope_freqs
from flashdreams.model.wan import WanDiT


def test_frame_angles_match_the_table_and_extend_past_it():
    rope = Rope3D(head_dim=128, max_pos=1024)
    positions = torch.tensor([0, 1, 7, 1023, 1024, 5000, 123456])
    cos, sin = rope.cos_sin(positions, 2, 3)
    dim_f = rope_axis_dims(128)[0]
    ref = rope_freqs(123457, dim_f)[positions]  # fp64 table rows, as far as the positions go
    per_frame = cos.view(len(positions), 6, -1)[:, 0, : dim_f // 2]
    assert torch.allclose(per_frame.double(), ref.cos(), atol=1e-7)
    per_frame = sin.view(len(positions), 6, -1)[:, 0, : dim_f // 2]
    assert torch.allclose(per_frame.double(), ref.sin(), atol=1e-7)


def test_shifting_every_frame_position_leaves_the_forward_unchanged():
    model = WanDiT(dim=64, num_heads=4, num_layers=2, ffn_dim=128, text_dim=32, text_len=8).eval()
    model.init_weights(torch.Generator().manual_seed(0))
    x = torch.randn(1, 16, 3, 4, 4)
    t = torch.tensor([[0.0, 500.0, 500.0]])
    ctx = model.prepare_context(torch.randn(1, 8, 32))
    with torch.no_grad():
        near = model(x, t, ctx, torch.arange(3))
        far = model(x, t, ctx, torch.arange(3) + 4000)  # far past the 1024-row table
        spread = model(x, t, ctx, torch.tensor([0, 2, 4]))
    assert (far - near).abs().max() <= 1e-4
    assert (spread - near).abs().max() > 1e-3  # positions do matter: the test can fail
