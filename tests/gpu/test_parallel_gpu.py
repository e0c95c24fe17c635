"""Context parallelism on CUDA: the ring's LSE kernels, world size 1, and 2 GPUs (NCCL) == 1.

Tolerances: LSE kernels vs fp32 math: max abs error <= 2e-2 (bf16) / 1e-4 (fp32) on outputs,
1e-2 on log-sum-exps. Rollouts in bf16: relative L2 error of all latents <= 2e-2 against a
single-GPU eager run (the bar of test_graph_policies.py), with 5 heads (padded to 6) and 225
tokens per frame (padded) on 2 GPUs, eager and CUDA-graph captured (NCCL inside the graphs).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flashdreams.parallel.ring_attention import attention_lse, merge

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("kernel,dtype", [("cudnn", torch.bfloat16), ("flash", torch.bfloat16),
                                          ("efficient", torch.bfloat16),
                                          ("efficient", torch.float32)])  # fmt: skip
def test_attention_lse_kernels_and_merge(kernel, dtype):
    # compiled policies earlier in the session set float32 matmuls to TF32 ("high"); the fp32
    # reference and the fp32 kernel are compared at full fp32 precision
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        _check_lse_kernel(kernel, dtype)
    finally:
        torch.set_float32_matmul_precision(previous)


def _check_lse_kernel(kernel, dtype):
    gen = torch.Generator("cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 6, n, 128, device="cuda", generator=gen, dtype=dtype)
               for n in (300, 1000, 1000))  # fmt: skip
    scores = q.float() @ k.float().transpose(-1, -2) / 128**0.5
    ref_lse = torch.logsumexp(scores, -1)
    ref = torch.softmax(scores, -1) @ v.float()
    out, lse = attention_lse(q, k, v, kernel)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    assert (out.float() - ref).abs().max() <= tol and (lse - ref_lse).abs().max() <= 1e-2
    acc = acc_lse = None
    for sl in (slice(0, 370), slice(370, 1000)):  # two uneven chunks folded = the whole
        acc, acc_lse = merge(acc, acc_lse, *attention_lse(q, k[:, :, sl], v[:, :, sl], kernel))
    assert (acc - ref).abs().max() <= tol


def test_world_size_one_runs_the_policy_without_collectives():
    from flashdreams.build import build_rollout
    from tests.unit.test_config import compose_run

    rollout = build_rollout(compose_run(["device=cuda", "vae=none", "parallel=ring",
                                         "rollout.total_blocks=2"]))  # fmt: skip
    assert rollout.parallel.world_size == 1 and rollout.parallel.ring == 1
    rollout.start(["a prompt"])
    assert torch.isfinite(rollout.step().latents).all()


DRIVER = """
import datetime, json, os, sys
import torch, torch.distributed as dist
sys.path.insert(0, os.environ["FD_ROOT"])
from flashdreams.build import build_rollout
from flashdreams.rollout import run_rollout
from tests.unit.test_config import compose_run

BASE = ["device=cuda", "dtype=bfloat16", "vae=none", "rollout.height=240", "rollout.width=240",
        "model.dim=640", "model.num_heads=5", "model.ffn_dim=1280", "model.num_layers=2"]
AR = ["cache=rolling", "cache.window_frames=6", "cache.sink_frames=3",
      "rollout.frames_per_block=3", "rollout.total_blocks=4"]
BI = ["cache=none", "rollout.frames_per_block=9", "rollout.total_blocks=1"]
CASES = [(f"{p}-{m}-{g}", mode + [f"parallel={p}", f"graph={g}"], m)
         for p in ("ulysses", "ring") for m, mode, graphs in (("ar", AR, ("eager", "cuda_graph")),
                                                              ("bi", BI, ("eager",)))
         for g in graphs]

def latents(ov):
    rollout = build_rollout(compose_run(BASE + ov))
    steps = []
    run_rollout(rollout, ["a prompt"], lambda out: steps.append(out.latents.float()))
    return torch.cat(steps, 2)

local = int(os.environ["LOCAL_RANK"])
torch.cuda.set_device(local)
dist.init_process_group("nccl", device_id=torch.device("cuda", local),
                        timeout=datetime.timedelta(seconds=120))
refs, res = {}, {}
for name, ov, mode in CASES:
    got = latents(ov)
    if dist.get_rank() == 0:
        if mode not in refs:
            refs[mode] = latents(AR if mode == "ar" else BI)
        ref = refs[mode]
        res[name] = ((got - ref).norm() / ref.norm()).item()
if dist.get_rank() == 0:
    json.dump(res, open(sys.argv[1], "w"))
dist.destroy_process_group()
"""


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpus_match_one_gpu(tmp_path):
    driver, out = tmp_path / "driver.py", tmp_path / "result.json"
    driver.write_text(DRIVER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(driver), str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "FD_ROOT": str(ROOT)},
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    errors = json.loads(out.read_text())
    print(errors)
    assert len(errors) == 6 and all(e <= 2e-2 for e in errors.values()), errors
