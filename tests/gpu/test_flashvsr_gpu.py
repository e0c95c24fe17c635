"""FlashVSR sparse attention on CUDA: the compiled FlexAttention path (window order + BlockMask)
against the explicit-mask SDPA reference, bf16 at a real chunk shape (768x1280 output: token
grid 48x80, 2 query frames, 8 key frames, 12 heads of 128), and one compile for every call.

Tolerance (bf16): relative L2 error <= 2e-2 (the bar of ``test_graph_policies.py``).
"""

import pytest
import torch

from flashdreams.attention.base import Attention
from flashdreams.attention.flex import FlexAttention
from flashdreams.attention.sdpa import SdpaAttention
from flashdreams.model.flashvsr.dit import FlashVSRBlock, LRStep
from flashdreams.model.flashvsr.sparse import token_mask
from tests.gpu.helpers import rel_l2

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]  # fmt: skip


def test_compiled_flex_block_sparse_equals_the_masked_reference():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    grid, heads, d = (48, 80), 12, 128
    step = LRStep(grid=grid, sparse_ratio=2.0, local_range=11, block_sparse=True)
    block = FlashVSRBlock(heads * d, 64, heads, 1e-6, True, False, step=step)
    flex = Attention(FlexAttention(compile=True))
    g = torch.Generator("cuda").manual_seed(0)
    for _ in range(3):  # fresh masks every call: one compile serves them all
        q = torch.randn(1, 2 * 48 * 80, heads, d, device="cuda", generator=g, dtype=torch.bfloat16)
        k = torch.randn(1, 8 * 48 * 80, heads, d, device="cuda", generator=g, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        out = block._block_sparse(q, k, v, flex, None)
        mask = token_mask(q, k, grid, 2.0, 11)
        ref = Attention(SdpaAttention("efficient"))(q, k, v, mask)
        ref = torch.where(mask.any(-1).transpose(1, 2)[..., None], ref, 0)
        assert rel_l2(out.float(), ref.float()) <= 2e-2
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert frames <= 2, f"{frames} compiled graphs for 3 calls of one shape"


@pytest.mark.parametrize("recipe", ["flashvsr_v1_1_tiny", "flashvsr_v1_1_full"])
def test_recipes_stream_a_clip_on_cuda(tmp_path, recipe):
    """Random weights at the real sizes (DiT, projector, TCDecoder / Wan VAE), graph=compile:
    a 64x96 clip upscaled 4x to 256x384, every chunk's frames finite and in [0, 1]."""
    from flashdreams.session import Session
    from tests.unit.test_flashvsr_recipe import _mp4

    video = _mp4(tmp_path / "lr.mp4", 29, w=96, h=64)  # 33 after padding: 8 latents, chunks 6 + 2
    session = Session.from_overrides([
        f"recipe={recipe}", f"input={video}", "model.checkpoint=null", "text_encoder=random",
        "control.checkpoint=null", "vae.decoder.checkpoint=null", "vsr.size_multiple=128",
        "device=cuda"])  # fmt: skip
    assert (session.rollout.height, session.rollout.width, session.total_blocks) == (256, 384, 2)
    frames = torch.cat([f for f in session if f is not None], dim=1)
    assert frames.shape == (1, 29, 3, 256, 384)
    assert torch.isfinite(frames).all() and frames.min() >= 0 and frames.max() <= 1


# a narrow model at real head dim (128: the flex and SDPA kernels' real case), 2 blocks
NARROW = ["model.dim=256", "model.num_heads=2", "model.num_layers=2", "model.ffn_dim=512",
          "model.text_dim=64", "model.text_len=8", "control.hidden_dim1=64",
          "control.hidden_dim2=64", "vae.decoder.channels=[32,32,16,16]"]  # fmt: skip


def _upscaled(video, extra) -> torch.Tensor:
    from flashdreams.session import Session

    session = Session.from_overrides([
        "recipe=flashvsr_v1_1_tiny", f"input={video}", "model.checkpoint=null",
        "text_encoder=random", "control.checkpoint=null", "vae.decoder.checkpoint=null",
        "device=cuda", "seed=0", *NARROW, *extra])  # fmt: skip
    return torch.cat([f for f in session if f is not None], dim=1)


@pytest.mark.parametrize("attention", [[], ["vsr.sparse_ratio=2.0", "attention=flex"]],
                         ids=["dense", "sparse"])  # fmt: skip
def test_captured_rollout_equals_eager(tmp_path, attention):
    """``graph=compile_cuda_graph`` (the policy that takes the launches off small scenes) gives
    the eager run's frames: 61 LR frames = chunks of 6, then 5 of 2 latent frames, so the rolling
    cache (8 frames) wraps under replayed graphs. Bar: 2e-2 dense (the graph-policy bar); 5e-2
    sparse, whose per-head top-k can swap near-tied window blocks between the two runs."""
    from tests.unit.test_flashvsr_recipe import _mp4

    video = _mp4(tmp_path / "lr.mp4", 61, w=96, h=64)  # 4x: 256x384, multiples of 128
    ref = _upscaled(video, ["graph=eager", "vae.decoder.compile=false", *attention])
    got = _upscaled(video, ["graph=compile_cuda_graph", *attention])
    assert got.shape == ref.shape == (1, 61, 3, 256, 384)
    assert rel_l2(got, ref) <= (5e-2 if attention else 2e-2)
