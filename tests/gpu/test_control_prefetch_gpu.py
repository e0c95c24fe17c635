"""``rollout.prefetch_control`` on CUDA (tiny OmniDreams, 32x32): the HDMap encode queued ahead
on a side stream gives bit-identical latents to the in-step encode, eager and under the
recipe's compiled + captured graphs (the captured encode's cache copy, event waits and
``record_stream`` hand-overs), beside the commit (frames read during the denoising) and beside
the denoising, and a push into frames encoded ahead is still used."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.unit.test_hdmap_stream import _session, clip  # noqa: F401  (fixture)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
BLOCKS = 3


def _latents(session, push=None) -> list[torch.Tensor]:
    session.reset(seed=0, prompt="a road", total_blocks=BLOCKS)
    out = []
    for step in range(BLOCKS):
        if push is not None and step == 1:
            session.push_frames(push, 9)
        session.step()
        out.append(session.last.output.latents.cpu())
    return out


@pytest.mark.parametrize("overlap", ["commit", "denoise"])
@pytest.mark.parametrize("graph", ["eager", "compile_cuda_graph"])
def test_prefetch_on_a_side_stream_is_bit_identical(clip, graph, overlap):  # noqa: F811
    common = [f"control.video={clip['path']}", "device=cuda", f"graph={graph}"]
    plain = _session(clip, *common)
    ahead = _session(clip, *common, "rollout.prefetch_control=true",
                     f"control.ahead_overlap={overlap}")  # fmt: skip
    for push in (None, np.stack(clip["other"][9:13])):
        for a, b in zip(_latents(ahead, push), _latents(plain, push), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
