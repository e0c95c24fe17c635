"""FP8 attention (attention=cudnn_fp8): per-tensor e4m3 math, fallbacks, the KV cache's running
|K|/|V| bound, and the commit that runs at full precision.

Tolerances: the e4m3 scheme on random data is within relative L2 0.15 / cosine >= 0.99 of bf16
SDPA (measured ~0.06-0.09); calls routed to the fallback equal SDPA exactly.
"""

from __future__ import annotations

import logging

import pytest
import torch

from flashdreams import ConfigError
from flashdreams.attention.cudnn_fp8 import (
    CudnnFp8Attention,
    kv_means,
    query_rows,
    reference_fp8_attention,
)
from flashdreams.attention.sdpa import SdpaAttention
from flashdreams.cache.full import FullKVCache
from flashdreams.kernels import as_rows, batched_rows
from flashdreams.precision.fp8_tensor import (
    FP8,
    FP8_MAX,
    dequantize_tensor,
    quantize_tensor,
    running_amax,
)
from flashdreams.quality import cosine
from tests.unit.test_config import compose_run


def _qkv(lq=200, lk=2500, heads=4, dim=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, n, heads, dim, generator=gen) for n in (lq, lk, lk))
    return q, k * 2, v


def test_quantize_tensor_round_trip_and_bound():
    x = torch.randn(3, 50, 4, 16) * 7
    q, descale = quantize_tensor(x)
    assert q.dtype == FP8 and descale.shape == (1, 1, 1, 1)
    assert descale.item() == pytest.approx(x.abs().max().item() / FP8_MAX)
    back = dequantize_tensor(q, descale, torch.float32)
    assert ((back - x).norm() / x.norm()) < 0.04  # 3 mantissa bits
    # a looser bound scales by it (no saturation); a tighter one saturates at +-448
    q2, d2 = quantize_tensor(x, x.abs().max() * 4)
    assert d2.item() == pytest.approx(4 * descale.item())
    q3, _ = quantize_tensor(x, x.abs().max() / 4)
    assert q3.float().abs().max() == FP8_MAX


def test_rows_view_of_a_fused_qkv_slice_is_not_a_copy():
    fused = torch.randn(1, 30, 3 * 64)
    v = fused[..., 128:].unflatten(-1, (4, 16))  # (B, L, H, D) view, rows 192 apart
    rows = as_rows(v)
    assert rows.shape == (30, 64) and rows.stride() == (192, 1)
    assert rows.data_ptr() == v.data_ptr() and torch.equal(rows, v.reshape(30, 64))


def test_running_amax_keeps_the_largest():
    amax = torch.zeros(1)
    running_amax(amax, torch.tensor([1.0, -3.0]))
    running_amax(amax, torch.tensor([2.0]))
    assert amax.item() == 3.0


def test_emulation_is_close_to_sdpa_and_routes_short_and_masked_calls():
    q, k, v = _qkv()
    attn = CudnnFp8Attention(emulate=True, min_kv_tokens=1000)
    ref = SdpaAttention()(q, k, v)
    out = attn(q, k, v)
    assert out.shape == ref.shape and not torch.equal(out, ref)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 0.15 and cosine(out, ref) > 0.99
    assert torch.equal(out, reference_fp8_attention(q, k, v, smooth=True))
    short = _qkv(lk=500)
    assert torch.equal(attn(*short), SdpaAttention()(*short))  # < min_kv_tokens: bf16 kernel
    mask = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool)
    mask[:, 1000:] = False
    assert torch.equal(attn(q, k, v, mask), SdpaAttention()(q, k, v, mask))


def test_smoothing_k_and_v_is_an_identity_of_attention():
    """softmax(q.(k - m)) = softmax(q.k) and P (V - m) + m = P V for any m: without quantization
    the smoothed call is the plain one to float rounding; the means come from a strided sample
    of the keys, close to the full means."""
    q, k, v = _qkv()
    k, v = k + torch.linspace(-3, 5, 64), v + 4.0  # activations share a large common part
    k_mean, v_mean = kv_means(k, v, sample=256)
    assert k_mean.shape == v_mean.shape == (1, 1, 4, 64) and k_mean.dtype == torch.float32
    torch.testing.assert_close(k_mean, k.mean(1, keepdim=True), atol=0.6, rtol=0)  # 5 sigma
    torch.testing.assert_close(v_mean, v.mean(1, keepdim=True), atol=0.3, rtol=0)
    ref = SdpaAttention()(q, k, v)
    smoothed = SdpaAttention()(q, k - k_mean, v - v_mean) + v_mean
    torch.testing.assert_close(smoothed, ref, atol=2e-5, rtol=1e-5)


def test_an_offset_is_taken_off_inside_the_quantizer():
    x = torch.randn(2, 30, 4, 16) + torch.linspace(-6, 6, 64).reshape(4, 16)
    m = x.mean(dim=(0, 1), keepdim=True)
    q, d = quantize_tensor(x, offset=m)
    q_ref, d_ref = quantize_tensor(x - m)
    assert torch.equal(q, q_ref) and torch.equal(d, d_ref)
    amax = torch.zeros(1)
    running_amax(amax, x, m)
    assert amax.item() == pytest.approx((x - m).abs().max().item())


def test_smoothing_keeps_the_scale_for_what_differs_between_tokens():
    """With a large common offset on V the per-tensor e4m3 scale is spent on the offset: the
    part of O that differs between queries loses most of its precision unless V is smoothed."""
    q, k, v = _qkv()
    v = v * 0.3 + 6.0
    ref = SdpaAttention()(q, k, v)
    centred = ref - ref.mean(1, keepdim=True)

    def err(out):
        return ((out - out.mean(1, keepdim=True) - centred).norm() / centred.norm()).item()

    plain, smooth = (reference_fp8_attention(q, k, v, smooth=s) for s in (False, True))
    assert err(smooth) < 0.15 < err(plain)
    off = CudnnFp8Attention(emulate=True, min_kv_tokens=0, smooth=False)
    assert torch.equal(off(q, k, v), plain)


def test_exact_mode_runs_the_fallback_and_nests():
    q, k, v = _qkv()
    attn = CudnnFp8Attention(emulate=True, min_kv_tokens=0)
    assert attn.has_exact_mode
    ref = SdpaAttention()(q, k, v)
    with attn.exact():
        with attn.exact():
            assert torch.equal(attn(q, k, v), ref)
        assert torch.equal(attn(q, k, v), ref)  # the inner exit restores the outer state
    assert not torch.equal(attn(q, k, v), ref)
    off = CudnnFp8Attention(emulate=True, min_kv_tokens=0, exact_commit=False)
    with off.exact():
        assert not off.has_exact_mode and not torch.equal(off(q, k, v), ref)


def test_missing_frontend_falls_back_with_one_line(caplog):
    q, k, v = _qkv()
    with caplog.at_level(logging.INFO, logger="flashdreams.attention.cudnn_fp8"):
        attn = CudnnFp8Attention(min_kv_tokens=0)
        out = attn(q, k, v)
        attn(q, k, v)
    if attn._cudnn is None:  # CPU CI: no nvidia-cudnn-frontend
        lines = [r for r in caplog.records if "cudnn_fp8" in r.getMessage()]
        assert len(lines) == 1 and "nvidia-cudnn-frontend" in lines[0].getMessage()
    assert torch.equal(out, SdpaAttention()(q, k, v))  # on CPU the kernel never runs


def test_bad_min_kv_tokens_is_one_line():
    with pytest.raises(ConfigError, match="attention.min_kv_tokens"):
        CudnnFp8Attention(min_kv_tokens=-1)
    with pytest.raises(ConfigError, match="attention.max_scores"):
        CudnnFp8Attention(max_scores=-1)


def test_query_rows_keep_each_call_under_the_score_budget():
    cosmos = (1, 84480, 16, 128)  # 704x1280x93 frames: 1.1e11 scores in one call
    rows = query_rows(cosmos, 84480, 2**31 - 1)
    assert rows % 128 == 0 and 1 * 16 * rows * 84480 <= 2**31 - 1
    assert 1 * 16 * (rows + 128) * 84480 > 2**31 - 1  # the largest such tile multiple
    assert query_rows((1, 4680, 12, 128), 32760, 2**31 - 1) == 4680  # Self-Forcing: one call
    assert query_rows(cosmos, 84480, 0) == 84480  # 0: never split
    assert query_rows(cosmos, 84480, 10) == 128  # at least one query tile


class _FakePlan:
    """Stands in for a cuDNN FP8 plan on CPU: the e4m3 scheme from the quantized operands; with
    ``stats`` also the rows' log-sum-exp (B, H, Lq, 1), as cuDNN's softmax stats."""

    calls: list[tuple[int, int]] = []

    def __init__(self, rows, keys=None, stats=False):
        self.rows, self.keys, self.stats = rows, keys, stats

    def run(self, q8, dq, k8, dk, v8, dv):
        assert q8.shape[1] == self.rows and q8.is_contiguous()
        assert self.keys in (None, k8.shape[1]) and k8.is_contiguous() and v8.is_contiguous()
        _FakePlan.calls.append((q8.shape[1], k8.shape[1]))
        q, k, v = (x.float() * d for x, d in ((q8, dq), (k8, dk), (v8, dv)))
        s = torch.einsum("bqhd,bkhd->bhqk", q, k) / 8.0
        o = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), v)
        o = (o / dv).to(FP8)
        return (o, torch.logsumexp(s, -1, keepdim=True)) if self.stats else o


def test_long_query_ranges_run_as_row_chunks_with_one_q_scale(monkeypatch):
    q, k, v = _qkv(lq=300, lk=2500)
    outs = {}
    for budget in (0, 4 * 128 * 2500):  # one call; 128-row chunks (300 = 128 + 128 + 44)
        attn = CudnnFp8Attention(min_kv_tokens=0, max_scores=budget)
        monkeypatch.setattr(attn, "_declines", lambda q: None)
        monkeypatch.setattr(attn, "_plan", lambda q, k, stats=False: _FakePlan(q.shape[1]))
        _FakePlan.calls = []
        outs[budget] = attn(q, k, v)
        rows = [300] if budget == 0 else [128, 128, 44]
        assert _FakePlan.calls == [(r, 2500) for r in rows]
    one, chunked = outs.values()
    torch.testing.assert_close(chunked, one, rtol=0, atol=0)  # same rows, same Q scale
    ref = SdpaAttention()(q, k, v)
    assert ((one - ref).norm() / ref.norm()).item() < 0.15


def test_long_key_ranges_run_as_chunks_merged_by_their_log_sum_exp(monkeypatch):
    """``max_keys``: 2500 keys in chunks of at most 1000 (three near-equal ones: 834, 834, 832),
    128-row query chunks (``max_scores``),
    each query chunk against each key chunk, merged by the chunks' log-sum-exp: the result is the
    whole call's within the e4m3 scheme's own error of bf16 SDPA."""
    q, k, v = _qkv(lq=300, lk=2500)
    attn = CudnnFp8Attention(min_kv_tokens=0, max_keys=1000, max_scores=4 * 200 * 1000)
    monkeypatch.setattr(attn, "_declines", lambda q: None)
    monkeypatch.setattr(attn, "_plan", lambda q, k, stats=False: _FakePlan(q.shape[1], k.shape[1],
                                                                           stats))  # fmt: skip
    _FakePlan.calls = []
    out = attn(q, k, v)
    assert _FakePlan.calls == [(r, n) for r in (128, 128, 44) for n in (834, 834, 832)]
    ref = SdpaAttention()(q, k, v)
    assert out.shape == ref.shape and out.dtype == q.dtype
    assert ((out - ref).norm() / ref.norm()).item() < 0.15 and cosine(out, ref) > 0.99
    with pytest.raises(ConfigError, match="attention.max_keys"):
        CudnnFp8Attention(max_keys=-1)


def test_cache_tracks_a_bound_on_the_valid_keys_and_values():
    cache = FullKVCache(num_layers=2, num_heads=2, head_dim=4, tokens_per_frame=3,
                        frames_per_block=1, total_frames=3, track_amax=True)  # fmt: skip
    cache.begin_block(0, 1)
    k0, v0 = torch.randn(1, 3, 2, 4), torch.randn(1, 3, 2, 4) * 5
    kv = cache.update(1, k0, v0)
    k_amax, v_amax = kv.amax
    assert k_amax.item() == k0.abs().max().item() and v_amax.item() == v0.abs().max().item()
    assert cache.k_amax[0].item() == 0.0  # per layer
    cache.begin_block(1, 1)
    kv = cache.update(1, k0 / 10, v0 / 10)  # smaller values: the bound stays
    assert kv.amax[1].item() >= kv[1].abs().max().item()
    cache.reset()
    assert cache.k_amax[1].item() == 0.0 and cache.v_amax[1].item() == 0.0
    plain = FullKVCache(num_layers=1, num_heads=2, head_dim=4, tokens_per_frame=3,
                        frames_per_block=1, total_frames=3)  # fmt: skip
    plain.begin_block(0, 1)
    assert plain.update(0, k0, v0).amax is None


def test_rollout_commits_at_full_precision_under_its_own_graph_key(monkeypatch):
    from flashdreams.build import build_rollout
    from flashdreams.rollout.forward import Forwards

    cfg = compose_run(["attention=cudnn_fp8", "attention.emulate=true",
                       "attention.min_kv_tokens=0", "rollout.total_blocks=2"])  # fmt: skip
    rollout = build_rollout(cfg)
    attn = rollout.model.attention.backend
    assert isinstance(attn, CudnnFp8Attention) and rollout.cache.k_amax is not None
    seen = []
    run = Forwards.run

    def spy(self, *args, commit=False, **kwargs):
        exact = commit and self.exact_commit
        seen.append((commit, self.model.graph_key(self.cache, 0, exact)))
        return run(self, *args, commit=commit, **kwargs)

    calls = []
    inner = CudnnFp8Attention.__call__
    monkeypatch.setattr(Forwards, "run", spy)
    monkeypatch.setattr(
        CudnnFp8Attention,
        "__call__",
        lambda self, *a, **kw: calls.append(self._exact) or inner(self, *a, **kw),
    )
    rollout.start(["a prompt"])
    rollout.step()
    assert [c for c, _ in seen] == [False] * 4 + [True]  # 4 denoising forwards, then the commit
    assert seen[-1][1] == (seen[0][1], "exact")
    layers = rollout.model.num_layers
    # the commit (forward_kv): self- and cross-attention of every block but the last, which
    # stops at its K/V writes
    commit = 2 * (layers - 1)
    assert len(calls) == 8 * layers + commit
    assert calls[-commit:] == [True] * commit and not any(calls[: 8 * layers])


def test_quality_reference_uses_the_bf16_fallback_kernel():
    from flashdreams.quality import reference_config

    cfg = compose_run(["attention=cudnn_fp8", "attention.fallback=flash", "quality=true"])
    ref = reference_config(cfg)
    assert ref.attention._target_ == "flashdreams.attention.sdpa.SdpaAttention"
    assert ref.attention.backend == "flash"
    assert cfg.attention._target_.endswith("CudnnFp8Attention")


def test_quantize_reads_a_batch_strided_cache_range_in_place():
    """``buffer[:, :n]`` of a cache with two batch rows (HY-WorldPlay's branches) is handed to
    the quantize kernels as it is (a batch stride), not copied by ``x.contiguous()``."""
    buffer = torch.randn(2, 70, 4, 32)
    t, rows, cols, row_stride, seq, batch_stride = batched_rows(buffer[:, :50])
    assert t.data_ptr() == buffer.data_ptr()
    assert (rows, cols, row_stride, seq, batch_stride) == (100, 128, 128, 50, 70 * 128)
    # heads not packed (a (B, L, D, H) transpose): one copy, read as plain rows
    t, rows, cols, row_stride, seq, batch_stride = batched_rows(buffer.transpose(2, 3))
    assert t.is_contiguous() and (rows, cols, seq, batch_stride) == (140, 128, 140, 0)
