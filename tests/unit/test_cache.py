"""KV caches: block append, same-slot overwrite, rolling eviction with sink, positions."""

import pytest
import torch

from flashdreams import ConfigError
from flashdreams.cache.full import FullKVCache
from flashdreams.cache.rolling import RollingKVCache

DIMS = dict(num_layers=1, num_heads=1, head_dim=1, tokens_per_frame=2, frames_per_block=2)


def _kv(frame_ids, tpf=2):
    """K/V whose values name their absolute frame (B=1, L, H=1, D=1)."""
    vals = torch.tensor([float(f) for f in frame_ids for _ in range(tpf)])
    return vals.view(1, -1, 1, 1)


def _frames(view, tpf=2):
    return sorted({int(x) for x in view.flatten()[::tpf].tolist()})


def test_full_cache_appends_blocks_and_overwrites_same_slot():
    cache = FullKVCache(total_frames=6, **DIMS)
    cache.begin_block(0, 2)
    k, _ = cache.update(0, _kv([100, 101]), _kv([100, 101]))  # a noisy denoising step
    assert k.shape[1] == 4
    k, v = cache.update(0, _kv([0, 1]), _kv([0, 1]))  # the commit overwrites the same slot
    assert _frames(k) == [0, 1] and _frames(v) == [0, 1]
    cache.begin_block(2, 2)
    k, _ = cache.update(0, _kv([2, 3]), _kv([2, 3]))
    assert _frames(k) == [0, 1, 2, 3]
    assert not cache.is_steady
    cache.begin_block(4, 2)
    cache.update(0, _kv([4, 5]), _kv([4, 5]))
    assert cache.is_steady


def test_rolling_cache_evicts_oldest_non_sink_frames():
    cache = RollingKVCache(window_frames=4, sink_frames=2, total_frames=100, **DIMS)
    assert cache.capacity_frames == 6
    seen = []
    for block in range(6):
        frames = [2 * block, 2 * block + 1]
        cache.begin_block(frames[0], 2)
        k, _ = cache.update(0, _kv(frames), _kv(frames))
        seen.append(_frames(k))
    assert seen[0] == [0, 1]
    assert seen[2] == [0, 1, 2, 3, 4, 5]  # filling: prefix grows
    assert cache.is_steady
    # steady: sink {0,1} kept forever + the 4 most recent frames incl. the current block
    assert seen[4] == [0, 1, 6, 7, 8, 9]
    assert seen[5] == [0, 1, 8, 9, 10, 11]


def test_rolling_cache_shapes_static_once_steady():
    cache = RollingKVCache(window_frames=2, sink_frames=0, total_frames=100, **DIMS)
    buffer = cache.k[0].data_ptr()
    shapes = []
    for block in range(4):
        cache.begin_block(2 * block, 2)
        k, _ = cache.update(0, _kv([2 * block] * 2), _kv([2 * block] * 2))
        shapes.append(k.shape[1])
    assert shapes == [4, 4, 4, 4]
    assert cache.k[0].data_ptr() == buffer  # written in place, never reallocated


def test_rolling_window_smaller_than_block_is_a_clear_error():
    with pytest.raises(ConfigError, match="cache.window_frames=1"):
        RollingKVCache(window_frames=1, total_frames=10, **DIMS)


def test_positions_are_absolute_slots_wrap():
    cache = RollingKVCache(window_frames=4, sink_frames=1, total_frames=100, **DIMS)
    assert [cache.frame_slot(f) for f in range(8)] == [0, 1, 2, 3, 4, 1, 2, 3]


def test_write_index_buffer_is_stable_per_block_length():
    """A captured graph reads the cache's write-index tensor by address: an image frame
    committed between 3-frame blocks must not replace the 3-frame buffer (it did, and a CUDA
    graph then read freed memory: index_copy_ out of bounds at 14B size)."""
    cache = RollingKVCache(window_frames=9, sink_frames=0, total_frames=100, **DIMS)
    tpf = cache.tokens_per_frame
    cache.begin_block(1, 3)
    three = cache.write_index
    cache.begin_block(0, 1)  # the image frame
    one = cache.write_index
    assert one is not three and one.numel() == tpf
    cache.begin_block(4, 3)
    assert cache.write_index is three  # same tensor, new contents
    want = torch.cat([torch.arange(tpf) + cache.frame_slot(f) * tpf for f in range(4, 7)])
    assert torch.equal(three, want)


def test_caches_are_sized_to_the_run():
    """A finite run allocates the frames it has, not the whole window; endless gets the window."""
    dims = {**DIMS, "frames_per_block": 3}
    assert RollingKVCache(window_frames=63, total_frames=21, **dims).capacity_frames == 21
    assert RollingKVCache(window_frames=15, sink_frames=3, total_frames=21, **dims
                          ).capacity_frames == 18  # fmt: skip
    endless = RollingKVCache(window_frames=63, total_frames=None, **dims)
    assert endless.capacity_frames == 63 and endless.k[0].shape[1] == 63 * DIMS["tokens_per_frame"]
    with pytest.raises(ConfigError, match="cache=full holds a finite run"):
        FullKVCache(total_frames=None, **dims)


def test_a_session_going_endless_gets_the_whole_window():
    from flashdreams import Session
    from tests.unit.test_config import compose_run

    cfg = compose_run(["cache.window_frames=30", "rollout.total_blocks=3", "device=cpu"])
    finite = Session(cfg, total_blocks=3)
    assert finite.rollout.cache.capacity_frames == 9  # 3 blocks of 3 frames, not 30
    first = [finite.step() for _ in range(3)]
    finite.reset(total_blocks=None)
    assert finite.rollout.cache.capacity_frames == 30
    again = [finite.step() for _ in range(3)]
    for a, b in zip(first, again, strict=True):  # no eviction either way: the same video
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    for _ in range(9):  # past the window: old frames are evicted, the stream goes on
        finite.step()


def test_capacity_for_a_stream_of_any_length_from_a_buffer_free_sizer():
    """A server sizes a session before building it from the warm-up session's cache: each
    policy's own capacity (a rolling window and sink, a reconstituted context of fixed size, a
    full cache of every frame), from a settings-only copy that holds none of the buffers."""
    from flashdreams.cache.context import ContextKVCache

    rolling = RollingKVCache(window_frames=4, sink_frames=2, total_frames=2, **DIMS).sizer()
    assert not any(isinstance(v, torch.Tensor | list) for v in vars(rolling).values())
    assert rolling.capacity_for(None) == 6 and rolling.capacity_for(3) == 3
    context = ContextKVCache(context_frames=16, total_frames=2, **DIMS).sizer()
    assert context.capacity_for(None) == context.capacity_for(4) == 16 + 2
    full = FullKVCache(total_frames=2, **DIMS).sizer()
    assert full.capacity_for(10) == 10
    with pytest.raises(ConfigError, match="cache=full holds a finite run"):
        full.capacity_for(None)
