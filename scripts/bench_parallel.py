"""Side-by-side context-parallel benchmark: ``parallel=single`` vs ulysses / ring / usp in one job.

Run under torchrun (one process per GPU); every policy is built, run and timed in the same
processes, one after the other, and ``single`` runs on rank 0 while the other ranks wait. Rank 0
prints the DESIGN.md metrics of each policy, the speed-up over ``single`` and the relative L2
error of all latents against ``single`` (same seed and noise), and rewrites the JSON after each
policy, so a run cut short keeps what it measured.

    torchrun --standalone --nproc_per_node=2 scripts/bench_parallel.py --out bench.json \
        --policies ulysses ring single -- recipe=self_forcing_wan21_t2v_1_3b_taehv \
        model.checkpoint=null text_encoder=random vae.checkpoint=null graph=eager

A policy may carry options of its parallel group after ``+`` (``OPTION`` is ``true``, or
``OPTION=VALUE``), each its own entry in the JSON: ``--policies single ulysses
ulysses+fp8_all_to_all ulysses+async_qkv ulysses+fp8_all_to_all+async_qkv``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flashdreams.build import build_rollout  # noqa: E402
from flashdreams.config import compose_run  # noqa: E402
from flashdreams.io.image import load_image  # noqa: E402
from flashdreams.rollout import run_rollout  # noqa: E402
from flashdreams.stats import summarize  # noqa: E402


def policy_overrides(spec: str) -> list[str]:
    """Hydra overrides of a ``--policies`` entry: ``ulysses+fp8_all_to_all+ulysses_degree=2``
    -> ``parallel=ulysses parallel.fp8_all_to_all=true parallel.ulysses_degree=2``."""
    name, *options = spec.split("+")
    if not name or any(not o or o.startswith("=") for o in options):
        raise SystemExit(f"bench_parallel: --policies {spec!r}: expected NAME[+OPTION[=VALUE]]...")
    return [f"parallel={name}"] + [f"parallel.{o}" if "=" in o else f"parallel.{o}=true"
                                   for o in options]  # fmt: skip


def _run(overrides: list[str], prompt: str) -> tuple[dict, torch.Tensor]:
    cfg = compose_run(overrides)
    image = load_image(cfg.image) if cfg.image else None  # I2V / camera recipes
    rollout = build_rollout(cfg)
    device = rollout.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rows, latents = [], []

    def on_step(out):
        rows.append(out.timer.resolve())
        latents.append(out.latents.float().cpu())

    start = time.perf_counter()
    images = None if image is None else [image] * rollout.batch_size
    warmup_s = run_rollout(rollout, [prompt] * rollout.batch_size, on_step, profile=True,
                           images=images)  # fmt: skip
    total_s = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    summary = summarize(rows, warmup_s, peak, total_s)
    summary["steps"] = [{k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()}
                        for r in rows]  # fmt: skip
    del rollout
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return summary, torch.cat(latents, dim=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON written by rank 0")
    parser.add_argument("--policies", nargs="+", default=["ulysses", "ring", "single"])
    parser.add_argument("--prompt", default="a red fox running through fresh snow")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides shared by every policy")
    args = parser.parse_args()
    for policy in args.policies:  # a bad entry fails before any process group or model
        policy_overrides(policy)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and "device=cpu" not in args.overrides
    if world > 1:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local) if cuda else None
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device,
                                timeout=datetime.timedelta(seconds=900))  # fmt: skip
    rank = dist.get_rank() if world > 1 else 0
    commit = os.environ.get("FD_COMMIT") or subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                            capture_output=True).stdout.strip() or None  # fmt: skip
    record = {
        "date": datetime.date.today().isoformat(), "commit": commit, "world_size": world,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
        "command": " ".join(["torchrun", f"--nproc_per_node={world}", *sys.argv]),
        "overrides": args.overrides, "policies": {},
    }  # fmt: skip
    outputs: dict[str, torch.Tensor] = {}
    for policy in args.policies:
        if policy == "single" and rank != 0:
            dist.barrier()  # rank 0 runs the one-GPU reference alone
            continue
        summary, latents = _run([*args.overrides, *policy_overrides(policy)], args.prompt)
        if policy == "single" and world > 1:
            dist.barrier()
        if rank == 0:
            outputs[policy] = latents
            record["policies"][policy] = summary
            print(f"{policy:>8} x{1 if policy == 'single' else world}: "
                  f"step {summary['median_step_ms']:.1f} ms, period "
                  f"{summary['median_period_ms']:.1f} ms, warm-up {summary['warmup_s']:.1f} s, "
                  f"peak {summary['peak_memory_bytes'] / 2**30:.1f} GiB", flush=True)  # fmt: skip
            _compare(record, outputs)
            args.out.write_text(json.dumps(record, indent=1))
    if world > 1:
        dist.destroy_process_group()


def _compare(record: dict, outputs: dict[str, torch.Tensor]) -> None:
    ref = outputs.get("single")
    base = record["policies"].get("single")
    if ref is None:
        return
    for name, latents in outputs.items():
        entry = record["policies"][name]
        entry["rel_l2_vs_single"] = ((latents - ref).norm() / ref.norm()).item()
        entry["speedup_step"] = base["median_step_ms"] / entry["median_step_ms"]
        entry["speedup_period"] = base["median_period_ms"] / entry["median_period_ms"]
        if name != "single":
            print(f"{name:>8}: {entry['speedup_step']:.2f}x step, {entry['speedup_period']:.2f}x "
                  f"period vs single, rel L2 {entry['rel_l2_vs_single']:.2e}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
