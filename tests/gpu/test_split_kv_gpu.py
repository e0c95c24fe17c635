"""Split-KV attention (``attention.kv_splits``) and flash-attn 4 on a GPU.

The keys cut into equal chunks batched into one launch and merged by log-sum-exp must equal one
attention call up to bf16 rounding (relative L2 <= 1e-2 at the 1.3B AR shape), the fused Triton
merge must equal the torch merge, a captured CUDA graph must replay it, and rollouts with it under
every graph policy must match the eager unsplit rollout (<= 2e-2 per block, the bf16 bar of the
graph-policy tests). flash-attn 4 tests are skipped when the package is not installed.
"""

import pytest
import torch

from flashdreams.attention.flash_attn import FlashAttnAttention, find_flash_attn
from flashdreams.attention.sdpa import SdpaAttention
from flashdreams.attention.split_kv import merge, merge_torch, sdpa_lse, split_kv_attention
from tests.gpu.helpers import random_qkv, rel_l2, replay_equals_eager
from tests.gpu.test_graph_policies import _latents

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CUDA = torch.device("cuda")
fa4 = pytest.mark.skipif(find_flash_attn("4")[1] is None, reason="needs flash-attn 4")


def _qkv(lq=4680, lk=14040, heads=12):
    return random_qkv(lq, lk, heads)


@pytest.mark.parametrize("splits", [2, 3, 4])
def test_split_equals_one_call(splits):
    q, k, v = _qkv()
    ref = SdpaAttention("cudnn")(q, k, v)
    out = split_kv_attention(q, k, v, splits)
    assert out.shape == ref.shape and out.dtype == torch.bfloat16
    assert rel_l2(out, ref) <= 1e-2


def test_triton_merge_equals_torch_merge():
    q, k, v = _qkv(lq=1000, lk=4000, heads=5)
    qs = q.expand(4, -1, -1, -1).contiguous()
    ks, vs = (x.reshape(4, 1000, 5, 128) for x in (k, v))
    out, lse = sdpa_lse()(qs, ks, vs)
    fused = merge(out, lse, 4, torch.float32)
    assert torch.allclose(fused, merge_torch(out, lse, 4), atol=1e-5, rtol=1e-5)


def test_auto_splits_at_the_1_3b_shape():
    attn = SdpaAttention("cudnn", kv_splits="auto")
    q, k, _ = _qkv(lk=32760)
    if torch.cuda.get_device_properties(CUDA).multi_processor_count != 132:
        pytest.skip("the expected count is worked out for 132 SMs (H100 / H200 SXM)")
    assert attn.splits_for(q, k) == 2  # 444 tiles: 3.36 waves -> 888: 6.7 waves


def test_cuda_graph_replay_equals_eager():
    static = [x.clone() for x in _qkv()]
    assert replay_equals_eager(SdpaAttention("cudnn", kv_splits=2), static)


@pytest.fixture(scope="module")
def eager_unsplit():
    return _latents(["graph=eager", "attention=sdpa_cudnn"])


@pytest.mark.parametrize("graph", ["eager", "cuda_graph", "compile_cuda_graph"])
def test_split_rollouts_match_eager(eager_unsplit, graph):
    got = _latents([f"graph={graph}", "attention=sdpa_cudnn", "attention.kv_splits=2"])
    for a, b in zip(got, eager_unsplit, strict=True):
        assert rel_l2(a, b) <= 2e-2


@fa4
@pytest.mark.parametrize("splits", [1, 2])
def test_flash_attn4_equals_sdpa(splits):
    q, k, v = _qkv()
    attn = FlashAttnAttention("4", kv_splits=splits)
    assert attn.package == "flash-attn 4"
    assert rel_l2(attn(q, k, v), SdpaAttention("cudnn")(q, k, v)) <= 1e-2


@fa4
@pytest.mark.parametrize("graph", ["cuda_graph", "compile_cuda_graph"])
def test_flash_attn4_rollouts_match_eager(eager_unsplit, graph):
    got = _latents([f"graph={graph}", "attention=flash_attn", "attention.version=4"])
    for a, b in zip(got, eager_unsplit, strict=True):
        assert rel_l2(a, b) <= 2e-2
