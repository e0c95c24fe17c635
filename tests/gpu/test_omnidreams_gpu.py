"""OmniDreams on the GPU (CUDA only): every graph policy reproduces eager SDPA on a block-causal
AR rollout of a small OmniDreams DiT driven by an HDMap file (streamed from the file block by
block), so the HDMap latents reach captured graphs as live inputs (pre-capture runs on
stand-ins); the pushed-frame closed loop equals the file-driven run under CUDA graphs; the fast
recipe (2 steps, LightVAE-width HDMap encoder in bf16, LightTAE raw-latent decode compiled)
decodes as its eager decoder.

Tolerance (bf16): relative L2 error of every block's latents (frames) <= 2e-2 against eager.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from flashdreams.build import build_rollout
from flashdreams.conditioner.cosmos_video import read_last_frames
from flashdreams.io.video import Mp4Writer
from tests.gpu.helpers import rel_l2
from tests.unit.test_config import compose_run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
SIZE, BLOCKS = 256, 4
FRAMES = 1 + 4 * (2 * BLOCKS - 1)  # 2 latent frames per block


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("omnidreams")
    pixels = np.random.default_rng(0).integers(0, 255, (FRAMES, SIZE, SIZE, 3), np.uint8)
    with Mp4Writer(root / "hdmap.mp4", fps=30) as writer:
        writer.write(pixels)
    Image.fromarray(pixels[0]).save(root / "first.png")
    return root


def _base(files, recipe="omnidreams_single_view", vae="vae=none"):
    return [
        f"recipe={recipe}", "model.checkpoint=null", "text_encoder=random",
        vae, "model.dim=512", "model.num_heads=4", "model.num_layers=4",
        "model.ffn_dim=2048", "conditioner.encoder.checkpoint=null",
        "control.encoder.checkpoint=null", f"rollout.height={SIZE}", f"rollout.width={SIZE}",
        f"rollout.total_blocks={BLOCKS}", "device=cuda", "dtype=bfloat16",
        f"image={files / 'first.png'}",
    ]  # fmt: skip


def _latents(files, overrides, push=False, frames=False, **base):
    rollout = build_rollout(compose_run(_base(files, **base) + overrides))
    rollout.start(["a road"], images=[Image.open(files / "first.png")])
    rollout.precapture()
    out = []
    for i in range(BLOCKS):
        if push:
            frames = [np.asarray(f) for f in read_last_frames(str(files / "hdmap.mp4"), FRAMES)]
            lo, hi = (0, 5) if i == 0 else (5 + 8 * (i - 1), 5 + 8 * i)
            rollout.control.push_frames(np.stack(frames[lo:hi]))
        step = rollout.step()
        out.append((step.frames if frames else step.latents).float())
    return out


@pytest.fixture(scope="module")
def eager(files):
    video = f"control.video={files / 'hdmap.mp4'}"
    return _latents(files, ["graph=eager", "attention=sdpa", video])


@pytest.mark.parametrize("graph", ["cuda_graph", "compile_cuda_graph"])
def test_policy_matches_eager(files, eager, graph):
    got = _latents(files, [f"graph={graph}", "attention=sdpa",
                           f"control.video={files / 'hdmap.mp4'}"])  # fmt: skip
    for a, b in zip(got, eager, strict=True):
        assert rel_l2(a, b) <= 2e-2


def test_pushed_frames_match_file_under_cuda_graphs(files, eager):
    got = _latents(files, ["graph=cuda_graph", "attention=sdpa", "control.live=true"], push=True)
    for a, b in zip(got, eager, strict=True):
        assert rel_l2(a, b) <= 2e-2


def test_fast_recipe_compiled_lighttae_matches_eager(files):
    fast = dict(recipe="omnidreams_single_view_fast", vae="vae.checkpoint=null")
    common = ["graph=cuda_graph", "attention=sdpa", f"control.video={files / 'hdmap.mp4'}"]
    got = _latents(files, [*common, "vae.compile=true"], frames=True, **fast)
    want = _latents(files, [*common, "vae.compile=false"], frames=True, **fast)
    for a, b in zip(got, want, strict=True):
        assert rel_l2(a, b) <= 2e-2


def _hdmap_latents(files, graph: str) -> torch.Tensor:
    """The HDMap control's latents of every block, its encoder under ``graph`` (bf16)."""
    from hydra.utils import instantiate

    from flashdreams.control.hdmap import HDMapControl

    cfg = compose_run(_base(files) + [f"graph={graph}"])
    enc = instantiate(cfg.control.encoder, dtype="bfloat16").cuda()
    control = HDMapControl(enc, video=str(files / "hdmap.mp4"))
    control.set_graph(instantiate(cfg.graph))
    control.prepare(1, height=SIZE, width=SIZE, num_frames=2 * BLOCKS, device=torch.device("cuda"))
    for b in range(BLOCKS):  # blocks 1.. are the steady 8-frame step (compiled / captured)
        control.encode_block(2 * b, 2)
    return torch.cat([control.inputs(2 * b, 2)["hdmap"] for b in range(BLOCKS)], 2).float()


@pytest.mark.parametrize("graph", ["cuda_graph", "compile", "compile_cuda_graph"])
def test_hdmap_encode_under_policy_matches_eager(files, graph):
    """The control's encode step compiled / captured (its causal cache fed back from the
    previous replay's static outputs) gives the eager latents, block after block."""
    want, got = _hdmap_latents(files, "eager"), _hdmap_latents(files, graph)
    for b in range(BLOCKS):
        assert rel_l2(got[:, :, 2 * b : 2 * b + 2], want[:, :, 2 * b : 2 * b + 2]) <= 1e-2


def test_captured_output_fed_back_is_recopied():
    """A captured graph's static output passed back in as its input (a recurrent state) is
    copied into the graph's input buffer on every replay (its version does not change)."""
    from flashdreams.graph.cuda_graph import CudaGraphPolicy

    policy, fn = CudaGraphPolicy(), lambda x, s: (s + x, s * 2 + x)
    x = torch.ones(4, device="cuda")
    state, ref = torch.ones(4, device="cuda"), torch.ones(4, device="cuda")
    for _ in range(5):
        out, state = policy.run(fn, x, state, shape_key="recurrent")
        want, ref = fn(x, ref)
        torch.testing.assert_close(out, want)
