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
