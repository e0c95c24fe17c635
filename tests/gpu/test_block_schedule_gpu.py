"""A block schedule (``rollout.first_block_frames``) under capturing graph policies (CUDA only).

Pre-capture makes every graph the stepped run replays: after ``precapture`` no step captures
another one (the first block's shape, each KV length while the cache fills, the steady one),
and the replayed latents equal eager SDPA's. Tolerance (bf16): relative L2 error of every
block's latents <= 2e-2 against eager. The rolling window is smaller than the run, so the
steady phase wraps the cache.
"""

import pytest
import torch

from flashdreams.build import build_rollout
from tests.gpu.helpers import SMALL_WAN, pre_captured_latents, rel_l2
from tests.unit.test_config import compose_run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

BASE = [*SMALL_WAN, "rollout.total_blocks=6", "cache.window_frames=8", "attention=sdpa"]
SCHEDULES = {
    "1-then-3": ["rollout.first_block_frames=1", "rollout.frames_per_block=3"],
    "6-then-2": ["rollout.first_block_frames=6", "rollout.frames_per_block=2"],
}


@pytest.mark.parametrize("schedule", SCHEDULES, ids=list(SCHEDULES))
@pytest.mark.parametrize("graph", ["cuda_graph", "compile_cuda_graph"])
def test_captured_schedule_matches_eager_and_captures_nothing_late(schedule, graph):
    overrides = BASE + SCHEDULES[schedule]
    eager = pre_captured_latents(overrides + ["graph=eager"], steps=6)
    rollout = build_rollout(compose_run(overrides + [f"graph={graph}"]))
    rollout.start(["a prompt"])
    rollout.precapture()
    made = len(rollout.graph.graphs)
    got = [rollout.step().latents.float() for _ in range(6)]
    assert len(rollout.graph.graphs) == made, "a step captured a graph pre-capture missed"
    assert [g.shape[2] for g in got] == [g.shape[2] for g in eager]
    for block, (a, b) in enumerate(zip(got, eager, strict=True)):
        assert rel_l2(a, b) <= 2e-2, f"block {block}: relative error {rel_l2(a, b):.3g}"
