"""``attention=cudnn_fp8`` on the Cosmos causal DiT layout (the OmniDreams recipe, tiny, CPU):
the e4m3 scheme emulated in fp32 (``attention.emulate=true``, every call FP8:
``min_kv_tokens=0``) keeps the causal rollout within the FP8 tolerance used for Wan
(``tests/gpu/test_fp8_attention_gpu.py``: per-block latents within relative L2 0.15 of the
SDPA rollout), with the commit (K/V every later block reads) attending at full precision.
"""

from __future__ import annotations

import pytest
import torch

from flashdreams.attention.cudnn_fp8 import CudnnFp8Attention
from tests.unit.test_hdmap_stream import _session, clip  # noqa: F401  (fixture)

BLOCKS = 3
FP8 = ["attention=cudnn_fp8", "attention.emulate=true", "attention.min_kv_tokens=0"]


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _latents(session) -> list[torch.Tensor]:
    session.reset(seed=0, prompt="a road", total_blocks=BLOCKS)
    out = []
    for _ in range(BLOCKS):
        session.step()
        out.append(session.last.output.latents)
    return out


@pytest.fixture(scope="module")
def runs(clip):  # noqa: F811
    video = f"control.video={clip['path']}"
    sdpa = _session(clip, video, "attention=sdpa")
    fp8 = _session(clip, video, *FP8)
    assert isinstance(fp8.rollout.model.attention.backend, CudnnFp8Attention)
    return _latents(sdpa), _latents(fp8)


def test_the_fp8_cosmos_rollout_is_within_the_wan_tolerance(runs):
    sdpa, fp8 = runs
    errors = [_rel_l2(a, b) for a, b in zip(fp8, sdpa, strict=True)]
    assert all(e <= 0.15 for e in errors), errors
    assert any(e > 0 for e in errors)  # FP8 did run (the emulation is not SDPA)
