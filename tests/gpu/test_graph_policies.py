"""Every graph policy and attention backend reproduces eager SDPA outputs (CUDA only).

Tolerance (bf16): relative L2 error of every block's latents <= 2e-2 against eager. The rolling
window is smaller than the rollout, so captured graphs replay over a steady, wrapping cache and
would fail this test if a capture had recorded stale cache contents.
"""

import pytest
import torch

from tests.gpu.helpers import SMALL_WAN, pre_captured_latents

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

BASE = [*SMALL_WAN, "rollout.total_blocks=5", "cache.window_frames=6", "cache.sink_frames=3"]


def _latents(overrides):
    return pre_captured_latents(BASE + overrides)


@pytest.fixture(scope="module")
def eager():
    return _latents(["graph=eager", "attention=sdpa"])


@pytest.mark.parametrize(
    "overrides",
    [
        ["graph=cuda_graph", "attention=sdpa"],
        ["graph=compile", "attention=sdpa"],
        ["graph=compile_cuda_graph", "attention=sdpa"],
        ["graph=eager", "attention=sdpa_cudnn"],
        ["graph=eager", "attention=sdpa_flash"],
        ["graph=eager", "attention=sdpa_efficient"],
        ["graph=compile_cuda_graph", "attention=sdpa_cudnn"],
    ],
)
def test_policy_matches_eager(eager, overrides):
    got = _latents(overrides)
    for block, (a, b) in enumerate(zip(got, eager, strict=True)):
        rel = ((a - b).norm() / b.norm()).item()
        assert rel <= 2e-2, f"block {block}: relative error {rel:.3g} for {overrides}"
