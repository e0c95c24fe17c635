"""A control encoder runs under the run's graph policy (CPU, tiny random Wan 2.1 encoder, 32x32):

* the build hands the control its own instance of ``graph`` (not the DiT's: capturing one never
  drops the other's graphs);
* the HDMap encode's steady blocks (8 video frames, the causal cache in its steady shapes) go
  through the policy's ``wrap`` (compile) once and ``run`` with a shape key (capture); the first
  block (frame 0 alone, then a cache still filling) runs eager; the latents equal the eager
  control's and one Wan VAE encode of the whole clip;
* a block's 8 frames in one causal step equal two 4-frame chunks;
* the pixels made on the device from uint8 frames equal ``image_to_tensor``'s.
"""

from __future__ import annotations

import numpy as np
import torch

from flashdreams.conditioner.cosmos_video import read_last_frames
from flashdreams.control.hdmap import HDMapControl
from flashdreams.graph.compile import CompilePolicy
from flashdreams.graph.cuda_graph import CudaGraphPolicy
from flashdreams.graph.eager import EagerPolicy
from flashdreams.io.image import image_to_tensor
from flashdreams.vae.wan21_encode import Wan21Encoder
from tests.unit.test_omnidreams_cli import SIZE, TINY, _hdmap, _image

FRAMES = 21  # 3 blocks of 2 latent frames: 5, 8, 8 video frames
BLOCKS = 3


class Recording(EagerPolicy):
    """Eager, recording what the control asked of it."""

    def __init__(self) -> None:
        self.wrapped, self.keys = [], []

    def wrap(self, fn):
        self.wrapped.append(fn)
        return fn

    def run(self, fn, *args, shape_key):
        self.keys.append(shape_key)
        return fn(*args)


def _encoder() -> Wan21Encoder:
    return Wan21Encoder(base_dim=8, dim_mult=[1, 2, 2, 2], num_res_blocks=1).eval()


def _encode(control: HDMapControl, path) -> torch.Tensor:
    control.prepare(1, height=SIZE, width=SIZE, num_frames=2 * BLOCKS, device="cpu")
    for b in range(BLOCKS):
        control.encode_block(2 * b, 2)
    return torch.cat([control.inputs(2 * b, 2)["hdmap"] for b in range(BLOCKS)], dim=2)


def test_steady_blocks_run_under_the_policy_and_equal_eager(tmp_path):
    path = _hdmap(tmp_path / "hdmap.mp4", FRAMES)
    enc = _encoder()
    eager = _encode(HDMapControl(enc, video=str(path)), path)
    policy = Recording()
    control = HDMapControl(enc, video=str(path))
    control.set_graph(policy)
    graphed = _encode(control, path)
    assert len(policy.wrapped) == 1  # compiled once, reused by every steady block
    assert policy.keys == [("hdmap_encode", (8, SIZE, SIZE, 3))] * (BLOCKS - 1)
    torch.testing.assert_close(graphed, eager, rtol=0, atol=0)
    pixels = image_to_tensor(read_last_frames(str(path), FRAMES))  # as ffmpeg decodes it
    whole = enc.encode(pixels.permute(1, 0, 2, 3)[None])
    assert graphed.shape == whole.shape == (1, 16, 2 * BLOCKS, SIZE // 8, SIZE // 8)
    torch.testing.assert_close(graphed, whole, rtol=0, atol=1e-5)


def test_one_step_of_eight_frames_equals_two_chunks():
    enc = _encoder()
    x = torch.rand(1, 3, 13, 16, 16) * 2 - 1
    first, cache = enc.encode_step(x[:, :, :1], [None] * enc._num_convs)
    _, cache = enc.encode_step(x[:, :, 1:5], cache)
    whole, _ = enc.encode_step(x[:, :, 5:13], cache)
    a, cache_a = enc.encode_step(x[:, :, 5:9], cache)
    b, _ = enc.encode_step(x[:, :, 9:13], cache_a)
    assert whole.shape[2] == 2 and first.shape[2] == 1
    torch.testing.assert_close(whole, torch.cat([a, b], dim=2), rtol=0, atol=1e-5)


def test_device_pixels_equal_image_to_tensor():
    frames = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    seen = []
    enc = _encoder()
    enc.encode_step = lambda x, cache: (seen.append(x), cache)  # only the pixels matter
    HDMapControl(enc)._step(torch.from_numpy(frames), [])
    want = image_to_tensor(list(frames)).permute(1, 0, 2, 3)[None]
    torch.testing.assert_close(seen[0], want, rtol=0, atol=0)


def test_compile_policy_compiles_the_steady_step(tmp_path, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(kw) or fn)
    control = HDMapControl(_encoder(), video=str(_hdmap(tmp_path / "hdmap.mp4", FRAMES)))
    control.set_graph(CompilePolicy())
    _encode(control, None)
    assert compiled == [dict(mode="default", dynamic=False, fullgraph=True)]


def test_build_gives_the_control_its_own_graph_policy(tmp_path):
    from flashdreams.build import build_rollout
    from tests.unit.test_config import compose_run

    path, image = _hdmap(tmp_path / "hdmap.mp4", 13), _image(tmp_path / "first.png")
    cfg = compose_run([*TINY, "graph=compile_cuda_graph", f"control.video={path}",
                       f"image={image}", "vae=none"])  # fmt: skip
    rollout = build_rollout(cfg)
    policy = rollout.control._graph
    assert isinstance(policy, CudaGraphPolicy) and policy.compiles
    assert policy is not rollout.graph
