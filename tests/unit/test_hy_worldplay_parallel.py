"""HY-WorldPlay under context parallelism equals one process (2 gloo ranks on CPU).

``scripts/bench_parallel.py`` under torchrun runs ``single``, ``ulysses`` and ``ring`` on the
tiny recipe for 6 blocks (memory engaged from block 4, history re-runs sharded like any
forward; the PRoPE transforms are per frame and every rank holds a slice of every frame) and
records the relative L2 error of all latents against ``single``: fp32, <= 1e-5.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.unit.test_hy_worldplay_recipe import VAE

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["recipe=hy_worldplay_wan_i2v_5b", "model.dim=64", "model.num_heads=4",
        "model.num_layers=2", "model.ffn_dim=128", "model.text_dim=32", "model.text_len=16",
        "model.checkpoint=null", "model.memory_points=2000", "device=cpu", "dtype=float32",
        "graph=eager", "attention=sdpa", "text_encoder=random", "rollout.height=64",
        "rollout.width=64", "rollout.total_blocks=6", "pose='w-6, right-8, d-5, left-4'",
        *[f"vae.{a}" for a in VAE], *[f"conditioner.encoder.{a}" for a in VAE]]  # fmt: skip


def test_ulysses_and_ring_equal_single(tmp_path):
    out = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "scripts" / "bench_parallel.py"), "--out", str(out), "--policies",
           "single", "ulysses", "ring", "--", *ARGS]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["world_size"] == 2
    for name in ("ulysses", "ring"):
        entry = result["policies"][name]
        assert entry["num_steps"] == 6 and entry["rel_l2_vs_single"] <= 1e-5, (name, entry)
