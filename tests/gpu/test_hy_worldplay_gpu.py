"""HY-WorldPlay under CUDA graphs: memory-engaged steps replay pre-captured graphs and equal
eager (CUDA only).

Real width (dim 3072, 24 heads) and resolution (704x1280: 880 tokens per latent frame), 2 DiT
layers, random weights, a tiny Wan 2.2 VAE. Six blocks along a pose with turns: blocks 1-3
re-run 4, 8, 12 history frames, blocks 4-5 the full 16-frame memory (block 5 recalls an old
clip). After ``precapture`` no step captures a new graph. Tolerance (bf16): relative L2 error
of every block's latents <= 2e-2 against eager.
"""

import pytest
import torch

from flashdreams.build import build_rollout
from tests.unit.test_config import compose_run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

VAE = ["checkpoint=null", "base_dim=8", "dim_mult=[1,2,2]", "num_res_blocks=1",
       "temperal_downsample=[true,true]"]  # fmt: skip
BASE = ["recipe=hy_worldplay_wan_i2v_5b", "model.checkpoint=null", "model.num_layers=2",
        "text_encoder=random", *[f"vae.{a}" for a in VAE],
        *[f"conditioner.encoder.{a}" for a in VAE], "rollout.total_blocks=6",
        "pose='w-6, right-8, d-5, left-4'", "device=cuda", "dtype=bfloat16"]  # fmt: skip


def _latents(overrides):
    rollout = build_rollout(compose_run([*BASE, *overrides]))
    rollout.start(["a marble city"])
    rollout.precapture()
    graphs = getattr(rollout.graph, "graphs", {})
    before = len(graphs)
    out = [rollout.step().latents.float() for _ in range(6)]
    assert rollout.cache.context == 16  # the memory is engaged
    return out, len(graphs) - before, before


@pytest.fixture(scope="module")
def eager():
    return _latents(["graph=eager", "attention=sdpa"])[0]


@pytest.mark.parametrize("overrides", [["graph=cuda_graph", "attention=sdpa"],
                                       ["graph=compile_cuda_graph", "attention=sdpa_cudnn"]])  # fmt: skip
def test_memory_engaged_steps_replay_graphs_and_match_eager(eager, overrides):
    got, new_captures, precaptured = _latents(overrides)
    assert precaptured >= 8 and new_captures == 0
    for block, (a, b) in enumerate(zip(got, eager, strict=True)):
        rel = ((a - b).norm() / b.norm()).item()
        assert rel <= 2e-2, f"block {block}: relative error {rel:.3g} for {overrides}"
