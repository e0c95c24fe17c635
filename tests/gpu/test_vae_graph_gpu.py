"""The Wan 2.1 / 2.2 streaming VAE decoders under capturing and compiling graph policies,
against their eager decode (CUDA only; the real architectures, random weights, bf16).

A clip of blocks [3, 2, 2, 2] latent frames at a 16x24 latent, decoded a block a call
(``chunk_frames=0``) and a latent frame a call (``chunk_frames=1``): the steady calls are
compiled and / or captured (one graph per steady chunk shape; a second clip captures nothing
new) with the causal-conv cache fed back as the next call's input. Tolerance (bf16 frames in
[0, 1]): max abs error <= 2e-2 and relative L2 <= 1e-2, as the compiled TAEHV's.
"""

import pytest
import torch

from flashdreams.graph.compile import CompilePolicy
from flashdreams.graph.cuda_graph import CudaGraphPolicy
from flashdreams.graph.eager import EagerPolicy
from flashdreams.vae.wan21 import Wan21StreamingDecoder
from flashdreams.vae.wan22 import Wan22StreamingDecoder
from tests.gpu.helpers import rel_l2

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

BLOCKS = [3, 2, 2, 2]
POLICIES = {
    "cuda_graph": lambda: CudaGraphPolicy(),
    "compile": lambda: CompilePolicy(),
    "compile_cuda_graph": lambda: CudaGraphPolicy(compile=True),
}


@pytest.fixture(scope="module", params=["wan21", "wan22"])
def decoder(request):
    cls = {"wan21": Wan21StreamingDecoder, "wan22": Wan22StreamingDecoder}[request.param]
    return cls().to("cuda", torch.bfloat16).eval()


def _clip(decoder) -> list[torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(0)
    z = decoder.latent_channels
    latents = torch.randn(1, z, sum(BLOCKS), 16, 24, device="cuda", generator=g)
    return list(latents.to(torch.bfloat16).split(BLOCKS, dim=2))


def _decode(decoder, blocks) -> torch.Tensor:
    decoder.reset()
    return torch.cat([decoder.decode_step(b) for b in blocks], dim=1).float()


@pytest.mark.parametrize("chunk_frames", [0, 1])
@pytest.mark.parametrize("graph", sorted(POLICIES))
def test_graph_decode_matches_eager(decoder, graph, chunk_frames):
    torch._dynamo.reset()
    decoder.chunk_frames = chunk_frames
    blocks = _clip(decoder)
    decoder.set_graph(EagerPolicy())  # the reference
    ref = _decode(decoder, blocks)
    policy = POLICIES[graph]()
    decoder.set_graph(policy)
    got = _decode(decoder, blocks)
    assert got.shape == ref.shape == (1, 1 + 4 * (sum(BLOCKS) - 1), 3, *ref.shape[3:])
    assert (got - ref).abs().max().item() <= 2e-2 and rel_l2(got, ref) <= 1e-2, graph
    if policy.captures:
        assert len(policy.graphs) == 1  # one steady chunk shape
    again = _decode(decoder, blocks)  # a second clip replays the same graphs
    assert (again - got).abs().max().item() <= 2e-2
    if policy.captures:
        assert len(policy.graphs) == 1
