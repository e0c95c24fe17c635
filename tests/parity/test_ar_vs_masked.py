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

H, W = 4, 4  # latent size
TPF = (H // 2) * (W // 2)
UNIFORM = [2] * 5  # frames per block: five blocks of 2
FIRST_ONE = [1, 2, 2, 2, 2]  # a 1-frame first block, then blocks of 2 (a causal Wan 2.2 T2V)
FIRST_SIX = [6, 2, 2]  # a 6-frame first block, then 2s (FlashVSR)


def _starts(sizes: list[int]) -> list[int]:
    return [sum(sizes[:b]) for b in range(len(sizes))]


def _visible(sizes: list[int], b: int, sink: int, window: int | None) -> list[int]:
    """Clean frames (before block b) a block's queries see through the cache."""
    start = _starts(sizes)[b]
    end = start + sizes[b]
    lo = 0 if window is None else max(sink, end - window)
    return [f for f in range(start) if f < sink or f >= lo]


def _mask(sizes: list[int], sink: int, window: int | None) -> torch.Tensor:
    n = sum(sizes)
    allowed = torch.zeros(2 * n, 2 * n, dtype=torch.bool)  # [clean frames | noisy frames]
    for b, start in enumerate(_starts(sizes)):
        own = list(range(start, start + sizes[b]))
        for offset in (0, n):  # clean query block, noisy query block
            for q in own:
                allowed[offset + q, _visible(sizes, b, sink, window)] = True
                allowed[offset + q, [offset + f for f in own]] = True
    return allowed.repeat_interleave(TPF, 0).repeat_interleave(TPF, 1)


@pytest.mark.parametrize(
    "sizes", [UNIFORM, FIRST_ONE, FIRST_SIX], ids=["uniform", "1-then-2", "6-then-2"]
)
@pytest.mark.parametrize("sink,window", [(0, None), (2, 6), (0, 6)])
def test_cached_rollout_equals_masked_full_sequence(sizes, sink, window):
    model = make_tiny_model()
    ctx = model.prepare_context(torch.randn(1, 16, 32))
    n = sum(sizes)
    clean = torch.randn(1, 16, n, H, W)
    noisy = torch.randn(1, 16, n, H, W)
    t_noisy = torch.rand(len(sizes)) * 1000

    # reference: one masked forward over [clean | noisy]
    x_all = torch.cat([clean, noisy], dim=2)
    per_frame = torch.cat([t.expand(f) for t, f in zip(t_noisy, sizes, strict=True)])
    t_all = torch.cat([torch.zeros(n), per_frame])[None]
    pos = torch.arange(n).repeat(2)
    ref = model(x_all, t_all, ctx, pos, mask=_mask(sizes, sink, window))

    dims = dict(num_layers=2, num_heads=4, head_dim=16, tokens_per_frame=TPF,
                frames_per_block=max(sizes), total_frames=n)  # fmt: skip
    if window is None:
        cache = FullKVCache(**dims)
    else:
        cache = RollingKVCache(window_frames=window, sink_frames=sink, **dims)
    for b, start in enumerate(_starts(sizes)):
        f = sizes[b]
        sl = slice(start, start + f)
        positions = torch.arange(start, start + f)
        cache.begin_block(start, f)
        for _ in range(2):  # two denoising forwards write the same slot
            out = model(noisy[:, :, sl], t_noisy[b].expand(1, f), ctx, positions, cache)
        torch.testing.assert_close(out, ref[:, :, n + start : n + start + f], rtol=0, atol=1e-4)
        cache.begin_block(start, f)
        committed = model(clean[:, :, sl], torch.zeros(1, f), ctx, positions, cache)
        torch.testing.assert_close(committed, ref[:, :, sl], rtol=0, atol=1e-4)
