"""Matrix-Game 2.0 under every graph policy reproduces eager (CUDA only).

Released action-module sizes (1024-wide, 16 heads) and resolution (352x640: 880 tokens per
latent frame), 4 DiT layers of which 2 carry action modules, random weights. Five blocks with a
6-frame window: the DiT cache and both action caches fill, then wrap, so a graph that recorded
stale branch-cache contents fails. Keys and mouse change every step. Tolerance (bf16): relative
L2 error of every block's frames <= 2e-2 against eager.
"""

import pytest
import torch
from PIL import Image

from flashdreams import Session
from tests.gpu.helpers import rel_l2
from tests.unit.test_config import compose_run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

CLIP_TINY = ("image_encoder.config={hidden_size:64,intermediate_size:128,num_hidden_layers:2,"
             "num_attention_heads:2,projection_dim:8}")  # fmt: skip
BASE = ["recipe=matrix_game2_universal", "model.checkpoint=null", "model.num_layers=4",
        "model.action_blocks=2", "model.image_dim=64", "image_encoder.checkpoint=null",
        "image_encoder.processor=null", CLIP_TINY, "vae=preview", "~vae.checkpoint",
        "conditioner.encoder.checkpoint=null", "rollout.total_blocks=5", "device=cuda",
        "dtype=bfloat16"]  # fmt: skip
CONTROLS = [{"keys": ["w"]}, {"keys": ["w", "a"], "mouse": [0.1, 0.0]}, {"keys": ["d"]},
            {"keys": ["s"], "mouse": [0.0, -0.1]}, {"keys": []}]  # fmt: skip


def _frames(overrides, tmp_path):
    image = tmp_path / "first.png"
    Image.new("RGB", (640, 352), (90, 140, 200)).save(image)
    session = Session(compose_run([*BASE, f"image={image}", *overrides]), total_blocks=5)
    return [session.step(control=c).float() for c in CONTROLS]


@pytest.fixture(scope="module")
def eager(tmp_path_factory):
    return _frames(["graph=eager", "attention=sdpa"], tmp_path_factory.mktemp("eager"))


@pytest.mark.parametrize("overrides", [["graph=cuda_graph", "attention=sdpa"],
                                       ["graph=compile_cuda_graph", "attention=sdpa"],
                                       ["graph=compile_cuda_graph", "attention=fast"]])  # fmt: skip
def test_policy_matches_eager(eager, overrides, tmp_path):
    got = _frames(overrides, tmp_path)
    for block, (a, b) in enumerate(zip(got, eager, strict=True)):
        rel = ((a - b).norm() / b.norm()).item()
        assert rel <= 2e-2, f"block {block}: relative error {rel:.3g} for {overrides}"


@torch.no_grad()
def test_action_kernels_match_their_torch_math():
    """The action modules' Triton kernels at the released shape (16 heads of 64 dims, 880
    tokens per frame, a 3-frame block over a 6-frame window of a 9-frame cache buffer) against
    the unfused torch math: the per-head norm + RoPE rounds as the modules do (<= 1e-3
    relative L2: an odd last-bit difference from the fp32 sum's order), the attention along
    frames to one bf16 rounding of an online softmax (<= 4e-3; a wrong key frame gives ~1)."""
    from flashdreams.model.matrix_game import fused
    from flashdreams.model.matrix_game.action import FrameRope

    g = torch.Generator(device="cuda").manual_seed(0)
    heads, d, tpf, bf16 = 16, 64, 880, torch.bfloat16
    qkv = torch.randn(2, 3 * tpf, 3, heads, d, device="cuda", generator=g).mul(3).to(bf16)
    q, k, _ = qkv.unbind(2)
    cos, sin = FrameRope(d).cos_sin(torch.arange(7, 10, device="cuda"))
    got = fused.head_norm_rope(q, k, cos, sin, 1e-6)
    for a, t in zip(got, (q, k), strict=True):
        want = fused.head_norm_rope_reference(t, cos, sin, 1e-6)
        assert rel_l2(a, want) <= 1e-3
    qf = got[0].unflatten(1, (3, tpf))
    buffer = torch.randn(2, 2, 9 * tpf, heads, d, device="cuda", generator=g).to(bf16)
    kc, vc = (t[:, : 6 * tpf].unflatten(1, (6, tpf)) for t in buffer)
    keys = torch.randn(2, 2, 6, 1, heads, d, device="cuda", generator=g).to(bf16)
    mask = torch.ones(3, 6, dtype=torch.bool, device="cuda").triu(diagonal=4).logical_not()
    for args in ((qf, kc, vc), (qf, *keys), (qf, kc, vc, mask)):
        want = fused.frame_attention_reference(*args).to(bf16)
        assert rel_l2(fused.frame_attention(*args), want) <= 4e-3
