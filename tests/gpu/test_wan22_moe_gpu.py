"""Two-expert (Wan 2.2 A14B) rollouts on CUDA: captured graphs and idle-expert offload == eager.

Tiny experts, the few-step schedule with boundary 0.875 (2 high-noise + 2 low-noise steps per
block), a rolling window smaller than the rollout. Tolerance (bf16): relative L2 error of every
block's latents <= 2e-2 against eager. A graph keyed without the expert would replay the wrong
expert's weights and fail.
"""

import pytest
import torch

from flashdreams.build import build_rollout
from tests.unit.test_config import compose_run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

BASE = [
    "model=wan22_t2v_a14b", "model.checkpoint=null", "model.low_noise_checkpoint=null",
    "model.dim=512", "model.num_heads=4", "model.num_layers=4", "model.ffn_dim=1024",
    "model.text_dim=64", "model.text_len=32", "rollout.height=256", "rollout.width=256",
    "rollout.total_blocks=5", "cache.window_frames=6", "cache.sink_frames=3", "device=cuda",
    "dtype=bfloat16", "attention=sdpa",
]  # fmt: skip


def _latents(overrides):
    rollout = build_rollout(compose_run(BASE + overrides))
    assert rollout.model.expert_plan(rollout.scheduler.timesteps) == [0, 0, 1, 1]
    rollout.start(["a prompt"])
    rollout.precapture()
    return [rollout.step().latents.float() for _ in range(5)]


@pytest.fixture(scope="module")
def eager():
    return _latents(["graph=eager"])


@pytest.mark.parametrize("overrides", [
    ["graph=cuda_graph"], ["graph=compile_cuda_graph"],
    ["graph=eager", "model.offload_idle_expert=true"],
])  # fmt: skip
def test_moe_policy_matches_eager(eager, overrides):
    got = _latents(overrides)
    for block, (a, b) in enumerate(zip(got, eager, strict=True)):
        rel = ((a - b).norm() / b.norm()).item()
        assert rel <= 2e-2, f"block {block}: relative error {rel:.3g} for {overrides}"


def test_offload_keeps_one_expert_on_the_gpu():
    rollout = build_rollout(compose_run(BASE + ["graph=eager", "model.offload_idle_expert=true"]))
    moe = rollout.model
    devices = [next(e.parameters()).device.type for e in moe.experts]
    assert devices == ["cuda", "cpu"]
    rollout.start(["a prompt"])
    rollout.step()
    devices = [next(e.parameters()).device.type for e in moe.experts]
    assert devices.count("cuda") == 1 and devices[moe.resident] == "cuda"
    idle = moe.experts[1 - moe.resident]
    assert all(p.is_pinned() for p in idle.parameters())  # fast uploads, free evictions


@pytest.mark.parametrize("reference,overrides", [
    (["graph=eager", "precision.kv_cache=fp8"], ["graph=cuda_graph", "precision.kv_cache=fp8"]),
    (["graph=eager", "precision=fp8", "precision.min_out_features=0"],
     ["graph=compile_cuda_graph", "precision=fp8", "precision.min_out_features=0",
      "precision.kv_cache=fp8"]),
    (["graph=eager"], ["graph=compile", "model.offload_idle_expert=true"]),
])  # fmt: skip
def test_moe_precision_and_offload_compose_with_graphs(reference, overrides):
    """FP8 weights / KV caches under captured graphs, and idle-expert moves of a fused QKV."""
    want, got = _latents(reference), _latents(overrides)
    for block, (a, b) in enumerate(zip(got, want, strict=True)):
        rel = ((a - b).norm() / b.norm()).item()
        fp8_kv_only_here = "precision.kv_cache=fp8" in set(overrides) - set(reference)
        bound = 6e-2 if fp8_kv_only_here else 2e-2  # e4m3 K/V against bf16 K/V
        assert rel <= bound, f"block {block}: relative error {rel:.3g} for {overrides}"


@pytest.mark.parametrize(
    "overrides", [["graph=cuda_graph"], ["graph=compile_cuda_graph", "precision.kv_cache=fp8"]]
)
def test_image_commit_then_blocks_under_graphs(tmp_path, overrides):
    """Causal Wan2.2 I2V: a 1-frame image commit before 3-frame blocks (a different write
    length) must leave the captured 3-frame graphs reading live cache indices."""
    from tests.parity.test_wan22_moe import DIT, ENCODER, _image

    path, image = _image(tmp_path)
    run = ["device=cuda", "dtype=bfloat16", "text_encoder=random", "vae.checkpoint=null",
           "vae.base_dim=8", "rollout.height=128", "rollout.width=128", "attention=sdpa",
           "rollout.total_blocks=4", "cache.window_frames=6", f"image={path}",
           "model.dim=256", "model.num_heads=2"]  # fmt: skip
    kv = [o for o in overrides if o.startswith("precision")]

    def latents(extra):
        cfg = compose_run(["recipe=causal_wan22_a14b_480p", *DIT, *ENCODER, *run, *extra])
        rollout = build_rollout(cfg)
        rollout.start(["a prompt"], images=[image])
        rollout.precapture()
        return [rollout.step().latents.float() for _ in range(4)]

    want, got = latents(["graph=eager", *kv]), latents(overrides)
    for block, (a, b) in enumerate(zip(got, want, strict=True)):
        rel = ((a - b).norm() / b.norm()).item()
        assert rel <= 2e-2, f"block {block}: relative error {rel:.3g} for {overrides}"
