"""Fusions on a GPU: the FFN's linear + GELU(tanh) as one cuBLASLt GEMM with a GELU epilogue, and
the K/V row scatter into the cache. The GEMM epilogue applies GELU to the fp32 accumulator (the
unfused path rounds to bf16 first): relative L2 <= 1e-2 against the unfused ops at the 1.3B FFN
shape. The scatter moves bytes: bit-equal to ``index_copy_``, also replayed in a CUDA graph.
Compiled policies use both; tests/gpu/test_graph_policies.py compares them with eager.
"""

import pytest
import torch
import torch.nn.functional as F

from flashdreams.cache.scatter import write_rows
from flashdreams.graph.cuda_graph import capture
from flashdreams.model.layers import linear_gelu_tanh
from tests.gpu.helpers import rel_l2

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CUDA = torch.device("cuda")


@torch.no_grad()
def test_gelu_epilogue_matches_unfused():
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, 4680, 1536, device=CUDA, generator=g, dtype=torch.bfloat16)
    w = torch.randn(8960, 1536, device=CUDA, generator=g, dtype=torch.bfloat16) * 0.03
    b = torch.randn(8960, device=CUDA, generator=g, dtype=torch.bfloat16) * 0.1
    ref = F.gelu(F.linear(x, w, b), approximate="tanh")
    out = linear_gelu_tanh(x, w, b)
    assert out.shape == ref.shape and out.dtype == torch.bfloat16
    assert rel_l2(out, ref) <= 1e-2
    compiled = torch.compile(linear_gelu_tanh, fullgraph=True)
    assert torch.equal(compiled(x, w, b), out)


def test_write_rows_is_index_copy_also_in_a_graph():
    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(1, 4680, 3 * 1536, device=CUDA, generator=g, dtype=torch.bfloat16)
    v = qkv[..., 3072:].unflatten(-1, (12, 128))  # the V of a fused QKV, read in place
    buf, ref = (torch.zeros(1, 21 * 1560, 12, 128, device=CUDA, dtype=torch.bfloat16)
                for _ in range(2))  # fmt: skip
    index = torch.arange(4680, device=CUDA) + 9360
    write_rows(buf, index, v)
    ref.index_copy_(1, index, v)
    assert torch.equal(buf, ref)
    graph, _ = capture(lambda: write_rows(buf, index, v))
    index.copy_((torch.arange(4680, device=CUDA) + 30000) % buf.shape[1])  # wraps around
    qkv.mul_(2)
    graph.replay()
    ref.index_copy_(1, index, v)
    assert torch.equal(buf, ref)
