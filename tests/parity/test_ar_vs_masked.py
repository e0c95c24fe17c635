"""KV-cached AR rollout == one full-sequence forward with a block-causal (teacher-forced) mask.

The masked reference runs the clean and noisy copies of every block in one sequence
([clean blocks | noisy blocks], same RoPE positions). A noisy block attends to the clean frames
the cache holds (sink + window) and to itself; a clean block (the commit) attends to the same
clean frames and itself. Tolerance: fp32, max abs error <= 1e-4.
"""

import pytest
import torch

from flashdreams.cache.full import FullKVCache
from flashdreams.cache.rolling import RollingKVCache
from tests.conftest import make_tiny_model

F, H, W, N = 2, 4, 4, 5  # frames per block, latent size, blocks
TPF = (H // 2) * (W // 2)


def _visible(q_block: int, sink: int, window: int | None) -> list[int]:
    """Clean frames (before block q_block) a block's queries see through the cache."""
    end = (q_block + 1) * F
    lo = 0 if window is None else max(sink, end - window)
    return [f for f in range(q_block * F) if f < sink or f >= lo]


def _mask(sink: int, window: int | None) -> torch.Tensor:
    frames = 2 * N * F  # [clean frames | noisy frames]
    allowed = torch.zeros(frames, frames, dtype=torch.bool)
    for b in range(N):
        own = list(range(b * F, (b + 1) * F))
        for offset in (0, N * F):  # clean query block, noisy query block
            for q in own:
                allowed[offset + q, _visible(b, sink, window)] = True
                allowed[offset + q, [offset + f for f in own]] = True
    return allowed.repeat_interleave(TPF, 0).repeat_interleave(TPF, 1)


@pytest.mark.parametrize("sink,window", [(0, None), (2, 4), (0, 4)])
def test_cached_rollout_equals_masked_full_sequence(sink, window):
    model = make_tiny_model()
    ctx = model.prepare_context(torch.randn(1, 16, 32))
    clean = torch.randn(1, 16, N * F, H, W)
    noisy = torch.randn(1, 16, N * F, H, W)
    t_noisy = torch.rand(N) * 1000

    # reference: one masked forward over [clean | noisy]
    x_all = torch.cat([clean, noisy], dim=2)
    t_all = torch.cat([torch.zeros(N * F), t_noisy.repeat_interleave(F)])[None]
    pos = torch.arange(N * F).repeat(2)
    ref = model(x_all, t_all, ctx, pos, mask=_mask(sink, window))

    dims = dict(num_layers=2, num_heads=4, head_dim=16, tokens_per_frame=TPF,
                frames_per_block=F, total_frames=N * F)  # fmt: skip
    if window is None:
        cache = FullKVCache(**dims)
    else:
        cache = RollingKVCache(window_frames=window, sink_frames=sink, **dims)
    for b in range(N):
        sl = slice(b * F, (b + 1) * F)
        positions = torch.arange(b * F, (b + 1) * F)
        cache.begin_block(b * F, F)
        for _ in range(2):  # two denoising forwards write the same slot
            out = model(noisy[:, :, sl], t_noisy[b].expand(1, F), ctx, positions, cache)
        torch.testing.assert_close(out, ref[:, :, N * F + b * F : N * F + (b + 1) * F],
                                   rtol=0, atol=1e-4)  # fmt: skip
        cache.begin_block(b * F, F)
        committed = model(clean[:, :, sl], torch.zeros(1, F), ctx, positions, cache)
        torch.testing.assert_close(committed, ref[:, :, sl], rtol=0, atol=1e-4)
