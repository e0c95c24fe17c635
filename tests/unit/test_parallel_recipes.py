"""Context parallelism composes with the two-expert and the camera-controlled recipes.

``scripts/bench_parallel.py`` under torchrun (2 gloo ranks on CPU) runs ``single``, ``ulysses``
and ``ring`` in one job and records the relative L2 error of all latents against ``single``:
fp32, <= 1e-5 (Ulysses moves whole heads; the ring's log-sum-exp merge reorders sums).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
DIT = ["model.dim=64", "model.num_heads=4", "model.num_layers=2", "model.ffn_dim=128",
       "model.text_dim=32", "model.text_len=16", "model.checkpoint=null", "device=cpu",
       "dtype=float32", "graph=eager", "text_encoder=random", "vae.checkpoint=null",
       "rollout.height=32", "rollout.width=32", "rollout.total_blocks=3"]  # fmt: skip
FP32 = "scheduler.latent_dtype=null"  # bf16 rounding would turn 1e-7 differences into bf16 steps
ENCODER = ["encoder.checkpoint=null", "encoder.base_dim=8", "encoder.num_res_blocks=1"]
RECIPES = {
    "causal_wan22_a14b_480p": ["vae.base_dim=8", FP32, *(f"conditioner.{e}" for e in ENCODER)],
    "lingbot_world_fast_taehv_window15_sink3": [f"conditioner.{e}" for e in ENCODER],
}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_parallel_policies_equal_single(tmp_path, recipe):
    image = tmp_path / "first.png"
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(image)
    out = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "scripts" / "bench_parallel.py"), "--out", str(out), "--policies",
           "single", "ulysses", "ring", "--", f"recipe={recipe}", *DIT, *RECIPES[recipe],
           f"image={image}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["world_size"] == 2 and set(result["policies"]) == {"single", "ulysses", "ring"}
    for name in ("ulysses", "ring"):
        entry = result["policies"][name]
        assert entry["num_steps"] == 3 and entry["rel_l2_vs_single"] <= 1e-5, (name, entry)
