"""Run the benchmark suite in one go and collect every result under one folder.

Every run uses random weights and random prompt embeddings (no downloads) and writes
``OUT/<name>/`` (``stats.json``, ``bench.json`` for bench runs, the resolved ``config.yaml``);
``OUT/suite.json`` gathers the summary of each run as it finishes, and a table is printed at
the end. A failing run (out of memory, a missing GPU kind, a bug) is recorded with its last
error line and the suite goes on, so one call on a GPU machine measures everything that fits.

    python scripts/bench_suite.py --out results/                      # every run for 1 GPU
    python scripts/bench_suite.py --out results/ --only sf_bf16,sf_fp8 # a selection
    python scripts/bench_suite.py --out results/ --set h200           # runs needing ~139 GB
    python scripts/bench_suite.py --out results/ --set multi          # torchrun on all GPUs
    python scripts/bench_suite.py --list                               # names and commands

``--tiny`` swaps in a tiny model on the CPU (plumbing check: every command composes and runs).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RANDOM = ["model.checkpoint=null", "text_encoder=random", "vae.checkpoint=null"]
FAST = ["graph=compile_cuda_graph", "attention=sdpa_cudnn"]
SF = ["recipe=self_forcing_wan21_t2v_1_3b_taehv", *FAST]
IMAGE_ENC = ["conditioner.encoder.checkpoint=null"]
CLIP = ["image_encoder.checkpoint=null", "image_encoder.processor=null"]
IMAGE = "image={image}"  # filled with a generated test picture

# name -> (set, entry, overrides, what it measures)
RUNS: dict[str, tuple[str, str, list[str], str]] = {
    "gpu_tests": ("gpu", "pytest", ["tests/gpu"], "GPU correctness tests (policies, fp8, CP, MoE)"),
    "sf_bf16": ("gpu", "bench", SF, "Self-Forcing 1.3B reference workload, bf16"),
    "sf_fp8": ("gpu", "bench", [*SF, "precision=fp8"], "FP8 block GEMMs (target: -15 % step)"),
    "sf_fp8_kv": (
        "gpu",
        "bench",
        [*SF, "precision=fp8", "precision.kv_cache=fp8"],
        "FP8 GEMMs + FP8 KV cache",
    ),
    "sf_fp8_quality": (
        "gpu",
        "run",
        [*SF, *RANDOM, "precision=fp8", "quality=true", "profile=true"],
        "FP8 vs bf16: per-call cosine, frame PSNR",
    ),
    "sf_12gb": (
        "gpu",
        "bench",
        [*SF, "precision.kv_cache=fp8", "bench.memory_fraction={cap12}"],
        "1.3B under a 12 GB cap",
    ),
    "sf_overlap": (
        "gpu",
        "bench",
        [*SF, "rollout.overlap_decode=true", "vae.compile=true"],
        "decode on a side stream during the commit, compiled TAEHV",
    ),
    "cf_i2v_framewise": (
        "gpu",
        "bench",
        ["recipe=causal_forcing_wan21_i2v_1_3b_framewise", "vae=taehv", *FAST, *IMAGE_ENC, IMAGE],
        "Causal-Forcing I2V frame-wise",
    ),
    "wan21_t2v_bidir": (
        "gpu",
        "bench",
        [
            "recipe=wan21_t2v_1_3b_480p",
            "scheduler.num_steps=3",
            "graph=compile",
            "attention=sdpa_cudnn",
        ],
        "bidirectional 1.3B, 3 CFG steps (diffuse / 3 = per step incl. compile)",
    ),
    "wan21_i2v_14b": (
        "gpu",
        "bench",
        [
            "recipe=wan21_i2v_14b_480p",
            "scheduler.num_steps=2",
            "graph=compile",
            "attention=sdpa_cudnn",
            *IMAGE_ENC,
            *CLIP,
            IMAGE,
        ],
        "Wan2.1 I2V 14B 480p, 2 CFG steps (80 GB fit)",
    ),
    "wan22_ti2v_5b": (
        "gpu",
        "bench",
        [
            "recipe=wan22_ti2v_5b_720p",
            "scheduler.num_steps=2",
            "graph=compile",
            "attention=sdpa_cudnn",
            *IMAGE_ENC,
        ],
        "Wan2.2 TI2V-5B 704x1280, 2 CFG steps",
    ),
    "lingbot_w15": (
        "gpu",
        "bench",
        [
            "recipe=lingbot_world_fast_taehv_window15_sink3",
            *FAST,
            "conditioner.image.encoder.checkpoint=null",
            IMAGE,
        ],
        "LingBot-World-Fast 14B, window 15 + sink 3",
    ),
    "lingbot_w63": (
        "h200",
        "bench",
        ["recipe=lingbot_world_fast", *FAST, "conditioner.image.encoder.checkpoint=null", IMAGE],
        "LingBot-World-Fast 14B, window 63 (H200)",
    ),
    "causal_wan22": (
        "h200",
        "bench",
        ["recipe=causal_wan22_a14b_480p", *FAST, *IMAGE_ENC, IMAGE],
        "causal Wan2.2 A14B, two experts (H200)",
    ),
    "cp_sf": (
        "multi",
        "parallel",
        [
            "recipe=self_forcing_wan21_t2v_1_3b_taehv",
            *RANDOM,
            "graph=cuda_graph",
            "attention=sdpa_cudnn",
        ],
        "Self-Forcing 1.3B: single vs ulysses vs ring",
    ),
    "cp_14b": (
        "multi",
        "parallel",
        [
            "recipe=self_forcing_wan21_t2v_1_3b_taehv",
            "model=wan21_t2v_14b",
            *RANDOM,
            "graph=cuda_graph",
            "attention=sdpa_cudnn",
            "rollout.total_blocks=7",
        ],
        "Wan2.1 14B causal shape (3-frame blocks, 21-frame cache)",
    ),
    "cp_bidir": (
        "multi",
        "parallel",
        [
            "recipe=wan21_t2v_1_3b_480p",
            *RANDOM,
            "scheduler.num_steps=3",
            "graph=cuda_graph",
            "attention=sdpa_cudnn",
        ],
        "bidirectional 1.3B 81 frames, 3 CFG steps",
    ),
}
TINY = ["model.dim=64", "model.num_heads=4", "model.num_layers=2", "model.ffn_dim=128",
        "model.text_dim=32", "model.text_len=16", "device=cpu", "dtype=float32", "graph=eager",
        "attention=sdpa", "rollout.height=32", "rollout.width=32", "rollout.total_blocks=3"]  # fmt: skip
TINY_DROP = ("graph=", "attention=", "precision=", "precision.kv_cache=", "bench.memory_fraction=",
             "rollout.total_blocks=", "vae.compile=", "rollout.overlap_decode=", "quality=")  # fmt: skip
TINY_PARTS = {"vae.base_dim=8": ("wan21_t2v", "wan21_i2v", "wan22", "causal_wan22"),
              "conditioner.encoder.base_dim=8": ("cf_i2v", "wan21_i2v", "causal_wan22", "wan22_ti2v"),
              "conditioner.encoder.num_res_blocks=1": ("cf_i2v", "wan21_i2v", "causal_wan22",
                                                       "wan22_ti2v"),
              "conditioner.image.encoder.base_dim=8": ("lingbot",),
              "conditioner.image.encoder.num_res_blocks=1": ("lingbot",)}  # fmt: skip


def command(name: str, out: Path, image: Path, tiny: bool, nproc: int) -> list[str]:
    """The command line of run ``name`` (Hydra overrides filled in)."""
    _, entry, overrides, _ = RUNS[name]
    cap12 = 12e9 / _total_memory() if not tiny else 0.15
    args = [o.format(image=image, cap12=f"{cap12:.4f}") for o in overrides]
    if entry in ("bench", "run"):
        args = [*RANDOM, *args]  # flashdreams-bench forces random DiT weights; decoders too
    if tiny:
        args = [a for a in args if not a.startswith(TINY_DROP)] + TINY
        args += [p for p, names in TINY_PARTS.items() if name.startswith(names)]
        if entry == "parallel":
            args = [a for a in args if not a.startswith("model=")]
    if entry == "pytest":
        return [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *overrides]
    if entry == "parallel":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={nproc}", str(ROOT / "scripts" / "bench_parallel.py"),
                "--out", str(out / f"{name}.json"), "--", *args]  # fmt: skip
    main = {"bench": "bench_main", "run": "run_main"}[entry]
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from flashdreams.cli import {main}; {main}()"
    return [sys.executable, "-c", code, *args, f"hydra.run.dir={out / name}"]


def _total_memory() -> float:
    import torch

    return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 8e10


def _gpus() -> int:
    import torch

    return max(torch.cuda.device_count(), 2)


def summarize(name: str, out: Path, entry: str) -> dict:
    """The DESIGN.md metrics a finished run wrote (stats.json / bench.json / bench_parallel)."""
    if entry == "pytest":
        lines = (out / f"{name}.log").read_text().splitlines()
        counts = [ln for ln in lines if re.search(r"\d+ (passed|failed|skipped|error)", ln)]
        return {"result": counts[-1].strip("= ") if counts else "no pytest summary"}
    if entry == "parallel":
        record = json.loads((out / f"{name}.json").read_text())
        return {p: {k: v for k, v in s.items() if k != "steps"}
                for p, s in record["policies"].items()}  # fmt: skip
    stats = json.loads((out / name / "stats.json").read_text())
    row = dict(stats["summary"])
    bench = out / name / "bench.json"
    if bench.exists():
        floor = json.loads(bench.read_text()).get("floor") or {}
        row["floor_ms"] = floor.get("median_floor_ms")
    row["precision"] = stats.get("precision")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="results folder (created)")
    parser.add_argument("--set", default="gpu", choices=["gpu", "h200", "multi", "all"])
    parser.add_argument("--only", default="", help="comma-separated run names (any set)")
    parser.add_argument("--tiny", action="store_true", help="tiny model on CPU (plumbing)")
    parser.add_argument("--list", action="store_true", help="print names and commands, run none")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per run")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n] or [
        n for n, (s, *_) in RUNS.items() if args.set in ("all", s)]  # fmt: skip
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        parser.error(f"--only: unknown run(s) {', '.join(unknown)}; known: {', '.join(RUNS)}")
    out = (args.out or Path("bench_suite_out")).resolve()
    image = out / "first_frame.png"
    if args.list:
        for n in names:
            print(f"{n:18} {RUNS[n][3]}\n    {' '.join(command(n, out, image, args.tiny, 2)[3:])}")
        return
    if args.out is None:
        parser.error("--out is required to run")
    out.mkdir(parents=True, exist_ok=True)
    _write_image(image, 32 if args.tiny else 480, 32 if args.tiny else 832)
    suite_path, suite = out / "suite.json", {}
    nproc = 2 if args.tiny else _gpus()
    for n in names:
        entry = RUNS[n][1]
        cmd = command(n, out, image, args.tiny, nproc)
        print(f"== {n}: {RUNS[n][3]}", flush=True)
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                                  timeout=args.timeout)  # fmt: skip
            rc, log = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as err:
            rc, log = -1, f"timed out after {args.timeout:.0f} s\n{err.stdout or ''}"
        (out / f"{n}.log").write_text(log if isinstance(log, str) else str(log))
        entry_result = {"command": " ".join(cmd), "rc": rc, "wall_s": time.perf_counter() - start}
        if rc == 0:
            entry_result["summary"] = summarize(n, out, entry)
        else:
            lines = [ln for ln in log.strip().splitlines() if ln.strip()]
            entry_result["error"] = next((ln for ln in reversed(lines) if "error" in ln.lower()),
                                         lines[-1] if lines else "no output")  # fmt: skip
            print(f"   failed: {entry_result['error']}", flush=True)
        suite[n] = entry_result
        suite_path.write_text(json.dumps(suite, indent=1))
    _table(suite)


def _write_image(path: Path, height: int, width: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)


def _table(suite: dict) -> None:
    print(f"\n{'run':18} {'step ms':>9} {'period ms':>9} {'warm-up s':>9} {'peak GiB':>8}  note")
    for name, r in suite.items():
        s = r.get("summary")
        if s is None:
            print(f"{name:18} {'failed':>9}  {r['error'][:80]}")
            continue
        if "result" in s:
            print(f"{name:18} {s['result']}")
            continue
        rows = s.items() if "median_step_ms" not in s else [("", s)]
        for policy, m in rows:
            peak = (m.get("peak_memory_bytes") or 0) / 2**30
            note = f"{policy} rel L2 {m.get('rel_l2_vs_single', 0):.1e}" if policy else ""
            print(f"{name:18} {m['median_step_ms']:9.1f} {m['median_period_ms']:9.1f} "
                  f"{m.get('warmup_s') or 0:9.1f} {peak:8.2f}  {note}")  # fmt: skip


if __name__ == "__main__":
    main()
