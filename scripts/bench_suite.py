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
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RANDOM = ["model.checkpoint=null", "text_encoder=random", "vae.checkpoint=null"]
FAST = ["graph=compile_cuda_graph", "attention=sdpa_cudnn"]
SF = ["recipe=self_forcing_wan21_t2v_1_3b_taehv", *FAST]
# the same workload with flash-attn 4 (when installed), unsplit and over split keys
FA4 = [*SF[:2], "attention=flash_attn", "attention.version=4"]
FA4_SPLIT = [*FA4, "attention.kv_splits=auto"]
# bidirectional Wan2.1-T2V-1.3B, 81 frames, 3 CFG steps; the attention group is added per run
BIDIR13 = ["recipe=wan21_t2v_1_3b_480p", "scheduler.num_steps=3", "graph=compile"]
# the same with FP8 attention (cuDNN FP8 SDPA) in place of SDPA-cuDNN
FAST8 = ["graph=compile_cuda_graph", "attention=cudnn_fp8"]
SF_ATTN8 = ["recipe=self_forcing_wan21_t2v_1_3b_taehv", *FAST8]
IMAGE_ENC = ["conditioner.encoder.checkpoint=null"]
CLIP = ["image_encoder.checkpoint=null", "image_encoder.processor=null"]
IMAGE = "image={image}"  # filled with a generated test picture
# causal Wan2.2 A14B (image-conditioned); under an H100's 80 GB: FP8 weights + FP8 KV caches
CW22 = ["recipe=causal_wan22_a14b_480p"]
CW22_IMAGE = [*IMAGE_ENC, IMAGE]
FP8_CAP80 = ["precision=fp8", "precision.kv_cache=fp8", "bench.memory_fraction={cap80}"]
# one-step (bidirectional) recipes: 3 prompts run as 3 clips, so the median step is a warm one
# (the first clip compiles); time per denoising step = median diffuse / scheduler.num_steps
CLIPS3 = "prompt_file={prompts}"
# context parallelism (bench_parallel.py): Self-Forcing 1.3B, and the 14B causal shape over
# 7 blocks (3-frame blocks, 21-frame cache)
CP_SF = ["recipe=self_forcing_wan21_t2v_1_3b_taehv", *RANDOM, "graph=cuda_graph",
         "attention=sdpa_cudnn"]  # fmt: skip
CP_14B = [*CP_SF[:1], "model=wan21_t2v_14b", *CP_SF[1:], "rollout.total_blocks=7"]
H100_BYTES = 79.1 * 2**30  # torch's total_memory of an H100 80GB HBM3 (the {cap80} runs)

# name -> (set, entry, overrides, what it measures)
RUNS: dict[str, tuple[str, str, list[str], str]] = {
    "gpu_tests": ("gpu", "pytest", ["tests/gpu"], "GPU correctness tests (policies, fp8, CP, MoE)"),
    "sf_bf16": ("gpu", "bench", SF, "Self-Forcing 1.3B reference workload, bf16"),
    "sf_fp8": ("gpu", "bench", [*SF, "precision=fp8"], "FP8 block GEMMs (target: -15 % step)"),
    "sf_split": (
        "gpu",
        "bench",
        [*SF, "attention.kv_splits=auto"],
        "bf16, cuDNN attention over key chunks batched into one launch (last wave filled)",
    ),
    "sf_fa4": (
        "gpu",
        "bench",
        FA4,
        "bf16, flash-attn 4 (CuTe DSL) attention, when installed",
    ),
    "sf_fa4_split": (
        "gpu",
        "bench",
        FA4_SPLIT,
        "bf16, flash-attn 4 over key chunks batched into one launch",
    ),
    "sf_bf16_nofuse": (
        "gpu",
        "bench",
        [*SF, "graph.fuse_gelu=false"],
        "bf16 reference workload with the FFN GELU as its own kernel (the GEMM-epilogue fusion off)",
    ),
    "sf_bf16_nonorm": (
        "gpu",
        "bench",
        [*SF, "graph.fuse_norms=false"],
        "bf16 reference workload with the norms / residuals / q-k RoPE left to Inductor",
    ),
    "sf_fa4_split_nonorm": (
        "gpu",
        "bench",
        [*FA4_SPLIT, "graph.fuse_norms=false"],
        "flash-attn 4 split with the norms / residuals / q-k RoPE left to Inductor",
    ),
    "sf_fa4_split_cross_sdpa": (
        "gpu",
        "bench",
        [*SF[:2], "attention=fast", "attention.min_keys=1024"],
        "flash-attn 4 split for self-attention, SDPA-cuDNN for the 512-token cross-attention",
    ),
    "sf_fast": (
        "gpu",
        "bench",
        [*SF[:2], "attention=fast"],
        "the streaming recipes' default: attention=fast (flash-attn 4 + splits when installed)",
    ),
    "sf_fast_split5": (
        "gpu",
        "bench",
        [*SF[:2], "attention=fast", "attention.kv_splits=5"],
        "attention=fast with the keys in 5 chunks (444 x 5 tiles: 0.99 of the last wave full)",
    ),
    "sf_fast_autotune": (
        "gpu",
        "bench",
        [*SF[:2], "graph.mode=max-autotune-no-cudagraphs", "attention=fast"],
        "attention=fast with Inductor autotuning the block GEMMs (cuBLAS vs Triton templates)",
    ),
    "sf_fa4_tile176": (
        "gpu",
        "bench",
        [*FA4_SPLIT, "attention.tile=[128,176]"],
        "bf16, flash-attn 4 split, 128x176 tiles (FlashAttention-3's hdim-128 choice)",
    ),
    "wan21_t2v_bidir_fa4": (
        "gpu",
        "bench",
        [*BIDIR13, "attention=flash_attn", "attention.version=4", CLIPS3],
        "bidirectional 1.3B, 81 frames, bf16 with flash-attn 4 (target <= 500 ms per forward)",
    ),
    "profile_fa4": (
        "gpu",
        "profile",
        FA4,
        "kernel time of AR step 4 by op, bf16 with flash-attn 4",
    ),
    "sf_fp8_kv": (
        "gpu",
        "bench",
        [*SF, "precision=fp8", "precision.kv_cache=fp8"],
        "FP8 GEMMs + FP8 KV cache",
    ),
    "sf_fp8_all": (
        "gpu",
        "bench",
        [*SF, "precision=fp8", "precision.min_out_features=0"],
        "FP8 for every block linear, the narrow ones too",
    ),
    "sf_fp8_attn": (
        "gpu",
        "bench",
        [
            *SF_ATTN8,
            "precision=fp8",
        ],
        "FP8 GEMMs + FP8 attention (cuDNN FP8 SDPA, per-tensor scales)",
    ),
    "sf_fp8_attn_fp8_commit": (
        "gpu",
        "bench",
        [
            *SF_ATTN8,
            "attention.exact_commit=false",
            "precision=fp8",
        ],
        "FP8 GEMMs + FP8 attention in the commit too",
    ),
    "sf_fp8_attn_fp8_commit_quality": (
        "gpu",
        "run",
        [
            *SF_ATTN8,
            "attention.exact_commit=false",
            "precision=fp8",
            "quality=true",
            "profile=true",
        ],
        "FP8 attention in the commit too vs bf16: per-call cosine, frame PSNR",
    ),
    "sf_fp8_attn_quality_forced": (
        "gpu",
        "run",
        [*SF_ATTN8, "precision=fp8", "quality=true", "quality_mode=forced", "profile=true"],
        "FP8 GEMMs + FP8 attention, each DiT call vs bf16 on the same inputs (teacher-forced)",
    ),
    "sf_fp8_quality_forced": (
        "gpu",
        "run",
        [*SF, "precision=fp8", "quality=true", "quality_mode=forced", "profile=true"],
        "FP8 GEMMs, each DiT call vs bf16 on the same inputs (teacher-forced)",
    ),
    "sf_bf16_fp8_attn": (
        "gpu",
        "bench",
        [
            *SF_ATTN8,
        ],
        "bf16 GEMMs + FP8 attention",
    ),
    "sf_fp8_attn_quality": (
        "gpu",
        "run",
        [
            *SF_ATTN8,
            "precision=fp8",
            "quality=true",
            "profile=true",
        ],
        "FP8 GEMMs + FP8 attention vs bf16: per-call cosine, frame PSNR",
    ),
    "profile_fp8_attn": (
        "gpu",
        "profile",
        [
            "recipe=self_forcing_wan21_t2v_1_3b_taehv",
            "graph=compile",
            "attention=cudnn_fp8",
            "precision=fp8",
        ],
        "kernel time of AR step 4 by op, FP8 GEMMs + FP8 attention",
    ),
    "sf_offload": (
        "gpu",
        "bench",
        [
            "recipe=self_forcing_wan21_t2v_1_3b_taehv",
            "graph=eager",
            "attention=sdpa_cudnn",
            "offload=blocks",
        ],
        "blocks streamed from pinned host memory (eager only)",
    ),
    "sf_fp8_exact_accum": (
        "gpu",
        "bench",
        [*SF, "precision=fp8", "precision.fast_accum=false"],
        "FP8 GEMMs with fp32-promoted accumulation (use_fast_accum=False)",
    ),
    "profile_bf16": (
        "gpu",
        "profile",
        ["recipe=self_forcing_wan21_t2v_1_3b_taehv", "graph=compile", "attention=sdpa_cudnn"],
        "kernel time of AR step 4 by op (compiled, no CUDA graphs so kernels are visible)",
    ),
    "profile_fp8": (
        "gpu",
        "profile",
        [
            "recipe=self_forcing_wan21_t2v_1_3b_taehv",
            "graph=compile",
            "attention=sdpa_cudnn",
            "precision=fp8",
        ],
        "kernel time of AR step 4 by op, FP8 GEMMs",
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
            CLIPS3,
        ],
        "bidirectional 1.3B, 3 CFG steps, 3 clips (median diffuse / 3 = one warm CFG step)",
    ),
    "wan21_t2v_bidir_fp8_attn": (
        "gpu",
        "bench",
        [*BIDIR13, "attention=cudnn_fp8", CLIPS3],
        "bidirectional 1.3B with FP8 attention (bf16 GEMMs), 3 CFG steps, 3 clips",
    ),
    "wan21_t2v_bidir_fp8": (
        "gpu",
        "bench",
        [*BIDIR13, "attention=cudnn_fp8", "precision=fp8", CLIPS3],
        "bidirectional 1.3B with FP8 attention and FP8 GEMMs",
    ),
    "wan21_t2v_bidir_fp8_quality_forced": (
        "gpu",
        "run",
        [*BIDIR13, "attention=cudnn_fp8", "precision=fp8", "quality=true", "quality_mode=forced"],
        "bidirectional FP8 vs bf16 on the same inputs (teacher-forced): each CFG step's flow",
    ),
    "wan21_t2v_bidir_fp8_quality": (
        "gpu",
        "run",
        [*BIDIR13, "attention=cudnn_fp8", "precision=fp8", "quality=true"],
        "bidirectional FP8 attention + GEMMs vs bf16: cosine of each CFG step's flow, PSNR",
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
            CLIPS3,
        ],
        "Wan2.1 I2V 14B 480p, 2 CFG steps, 3 clips (80 GB fit)",
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
            CLIPS3,
        ],
        "Wan2.2 TI2V-5B 704x1280, 2 CFG steps, 3 clips",
    ),
    "lingbot_w15": (
        "gpu",
        "bench",
        [
            "recipe=lingbot_world_fast_taehv_window15_sink3",
            *FAST,
            "conditioner.encoder.checkpoint=null",
            IMAGE,
        ],
        "LingBot-World-Fast 14B, window 15 + sink 3",
    ),
    "lingbot_w15_nonorm": (
        "gpu",
        "bench",
        [
            "recipe=lingbot_world_fast_taehv_window15_sink3",
            *FAST,
            "graph.fuse_norms=false",
            "conditioner.encoder.checkpoint=null",
            IMAGE,
        ],
        "LingBot-World-Fast 14B (width 5120), the norms / residuals / q-k RoPE left to Inductor",
    ),
    "lingbot_w15_fast": (
        "gpu",
        "bench",
        [
            "recipe=lingbot_world_fast_taehv_window15_sink3",
            *FAST[:1],
            "attention=fast",
            "conditioner.encoder.checkpoint=null",
            IMAGE,
        ],
        "LingBot-World-Fast 14B, attention=fast (flash-attn 4 at 40 heads when installed)",
    ),
    "lingbot_w15_fp8": (
        "gpu",
        "bench",
        [
            "recipe=lingbot_world_fast_taehv_window15_sink3",
            *FAST8,
            "precision=fp8",
            "conditioner.encoder.checkpoint=null",
            IMAGE,
        ],
        "LingBot-World-Fast 14B, window 15 + sink 3, FP8 attention + FP8 GEMMs",
    ),
    "lingbot_w15_80gb": (
        "gpu",
        "bench",
        [
            "recipe=lingbot_world_fast_taehv_window15_sink3",
            *FAST,
            "conditioner.encoder.checkpoint=null",
            IMAGE,
            "bench.memory_fraction={cap80}",
        ],
        "LingBot-World-Fast 14B, window 15 + sink 3, capped at 80 GB (one H100)",
    ),
    "causal_wan22_80gb": (
        "gpu",
        "bench",
        [*CW22, *FAST, *CW22_IMAGE, *FP8_CAP80],
        "causal Wan2.2 A14B, FP8 weights + FP8 KV caches, capped at 80 GB (one H100)",
    ),
    "causal_wan22_80gb_fp8_attn": (
        "gpu",
        "bench",
        [*CW22, "graph=compile", "attention=cudnn_fp8", *CW22_IMAGE, *FP8_CAP80],
        "causal Wan2.2 A14B, FP8 weights + KV caches + attention, graph=compile, capped at 80 GB",
    ),
    "causal_wan22_80gb_compile": (
        "gpu",
        "bench",
        [*CW22, "graph=compile", "attention=sdpa_cudnn", *CW22_IMAGE, *FP8_CAP80],
        "as causal_wan22_80gb without CUDA-graph memory pools",
    ),
    "causal_wan22_80gb_idle": (
        "gpu",
        "bench",
        [
            *CW22,
            "graph=compile",
            "attention=sdpa_cudnn",
            *CW22_IMAGE,
            "precision.kv_cache=fp8",
            "model.offload_idle_expert=true",
            "bench.memory_fraction={cap80}",
        ],  # fmt: skip
        "causal Wan2.2 A14B, bf16, idle expert in pinned host memory, FP8 KV, 80 GB cap",
    ),
    "lingbot_w63": (
        "h200",
        "bench",
        ["recipe=lingbot_world_fast", *FAST, "conditioner.encoder.checkpoint=null", IMAGE],
        "LingBot-World-Fast 14B, window 63 (H200)",
    ),
    "causal_wan22": (
        "h200",
        "bench",
        [*CW22, *FAST, *CW22_IMAGE],
        "causal Wan2.2 A14B, two experts (H200)",
    ),
    "cp_sf": (
        "multi",
        "parallel",
        CP_SF,
        "Self-Forcing 1.3B: single vs ulysses vs ring",
    ),
    "cp_14b": (
        "multi",
        "parallel",
        CP_14B,
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
    "cp_sf_extras": (
        "multi",
        "parallel",
        CP_SF,
        "Self-Forcing 1.3B: Ulysses with the FP8 all-to-all and the async q/k/v exchanges",
    ),
    "cp_14b_extras": (
        "multi",
        "parallel",
        CP_14B,
        "Wan2.1 14B causal shape: Ulysses with the FP8 all-to-all and the async q/k/v exchanges",
    ),
    "cp_lingbot_w15": (
        "multi",
        "parallel",
        [
            "recipe=lingbot_world_fast_taehv_window15_sink3",
            *RANDOM,
            "graph=cuda_graph",
            "attention=sdpa_cudnn",
            "conditioner.encoder.checkpoint=null",
            IMAGE,
        ],
        "LingBot-World-Fast 14B (camera branch, window 15 + sink 3, decode): Ulysses vs one GPU "
        "(the field: 629 ms per step on 4x H100)",
    ),
    "cp_hy_worldplay": (
        "multi",
        "parallel",
        [
            "recipe=hy_worldplay_wan_i2v_5b",
            *RANDOM,
            "conditioner.encoder.checkpoint=null",
            "graph=cuda_graph",
            "attention=sdpa_cudnn",
            "rollout.total_blocks=8",
            "pose=w-31",
            IMAGE,
        ],
        "HY-WorldPlay WAN-5B (memory re-run, both PRoPE branches): Ulysses vs one GPU, per chunk",
    ),
}
# the policies a parallel run compares (``bench_parallel.py --policies``; NAME+OPTION sets
# parallel.OPTION=true): default single / ulysses / ring
EXTRAS = ["single", "ulysses", "ulysses+fp8_all_to_all", "ulysses+async_qkv",
          "ulysses+fp8_all_to_all+async_qkv"]  # fmt: skip
POLICIES: dict[str, list[str]] = {"cp_sf_extras": EXTRAS, "cp_14b_extras": EXTRAS,
                                  "cp_lingbot_w15": ["single", "ulysses"],
                                  "cp_hy_worldplay": ["single", "ulysses"]}  # fmt: skip
TINY = ["model.dim=64", "model.num_heads=4", "model.num_layers=2", "model.ffn_dim=128",
        "model.text_dim=32", "model.text_len=16", "device=cpu", "dtype=float32", "graph=eager",
        "attention=sdpa", "rollout.height=32", "rollout.width=32", "rollout.total_blocks=3"]  # fmt: skip
TINY_DROP = ("graph=", "graph.", "attention=", "attention.", "precision", "bench.memory_fraction=",
             "rollout.total_blocks=", "vae.compile=", "rollout.overlap_decode=", "quality=")  # fmt: skip
TINY_PARTS = {"vae.base_dim=8": ("wan21_t2v", "wan21_i2v", "wan22", "causal_wan22", "cp_hy"),
              # HY-WorldPlay's Wan 2.2 VAE (both sides) at 8x: 4 latent tokens per 32x32 frame
              **{f"{side}.{k}": ("cp_hy",) for side in ("vae", "conditioner.encoder")
                 for k in ("dim_mult=[1,2,2]", "temperal_downsample=[true,true]")},
              "vae.num_res_blocks=1": ("cp_hy",),
              "model.memory_points=2000": ("cp_hy",),
              "conditioner.encoder.base_dim=8": ("cf_i2v", "wan21_i2v", "causal_wan22", "wan22_ti2v",
                                                 "lingbot", "cp_hy"),
              "conditioner.encoder.num_res_blocks=1": ("cf_i2v", "wan21_i2v", "causal_wan22",
                                                       "wan22_ti2v", "lingbot", "cp_hy")}  # fmt: skip


def command(name: str, out: Path, image: Path, tiny: bool, nproc: int, key: str = "") -> list[str]:
    """The command line of run ``name`` (Hydra overrides filled in), writing under ``key``."""
    key = key or name
    _, entry, overrides, _ = RUNS[name]
    total = _total_memory()
    cap12 = 12e9 / total if not tiny else 0.15
    cap80 = min(1.0, H100_BYTES / total) if not tiny else 0.9
    prompts = image.with_name("prompts3.txt")
    args = [o.format(image=image, cap12=f"{cap12:.4f}", cap80=f"{cap80:.4f}", prompts=prompts)
            for o in overrides]  # fmt: skip
    if entry in ("bench", "run", "profile"):
        args = [*RANDOM, *args]  # flashdreams-bench forces random DiT weights; decoders too
    if tiny:
        args = [a for a in args if not a.startswith(TINY_DROP)] + TINY
        args += [p for p, names in TINY_PARTS.items() if name.startswith(names)]
        if entry == "parallel":
            args = [a for a in args if not a.startswith("model=")]
    if entry == "pytest":
        return [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *overrides]
    if entry == "profile":
        return [sys.executable, str(ROOT / "scripts" / "profile_step.py"), *args]
    if entry == "parallel":
        policies = ["--policies", *POLICIES[name]] if name in POLICIES else []
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={nproc}", str(ROOT / "scripts" / "bench_parallel.py"),
                "--out", str(out / f"{key}.json"), *policies, "--", *args]  # fmt: skip
    main = {"bench": "bench_main", "run": "run_main"}[entry]
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from flashdreams.cli import {main}; {main}()"
    return [sys.executable, "-c", code, *args, f"hydra.run.dir={out / key}"]


def _total_memory() -> float:
    import torch

    return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 8e10


def _gpus() -> int:
    import torch

    return max(torch.cuda.device_count(), 2)


def summarize(name: str, out: Path, entry: str) -> dict:
    """The DESIGN.md metrics a finished run ``name`` (its key) wrote (stats / bench / parallel)."""
    if entry == "profile":
        return {"result": f"kernel table in {name}.log"}
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


@dataclass
class Job:
    key: str  # result name: the run's name, with _x<N> when several GPU counts are asked for
    name: str
    need: int  # GPUs it occupies
    cmd: list[str]


def jobs_for(names: list[str], out: Path, image: Path, tiny: bool, gpus: int,
             nprocs: list[int]) -> list[Job]:  # fmt: skip
    """One job per run, the multi-GPU runs once per GPU count (single-GPU runs need one GPU)."""
    jobs = []
    for n in names:
        entry = RUNS[n][1]
        if entry == "parallel":
            for k in nprocs:
                key = n if len(nprocs) == 1 else f"{n}_x{k}"
                jobs.append(Job(key, n, k, command(n, out, image, tiny, k, key)))
        else:  # tests/gpu holds a two-GPU context-parallel test
            need = min(2, gpus) if entry == "pytest" else 1
            jobs.append(Job(n, n, need, command(n, out, image, tiny, 2)))
    return jobs


def schedule(
    jobs: list[Job], out: Path, gpus: int, timeout: float, budget: float, concurrent: bool = True
) -> dict:
    """Run ``jobs`` in order, each on its own free GPUs, up to ``gpus`` GPUs busy at once.

    A job starts when the GPUs it needs are free (in list order, so a 4-GPU run is not starved by
    later 1-GPU runs) and sees only its GPUs through ``CUDA_VISIBLE_DEVICES``. A job past
    ``timeout`` seconds, or still running when the suite's ``budget`` ends, is killed and
    recorded; ``suite.json`` is rewritten after every job, so a cut-short call keeps the rest.
    """
    suite_path, suite = out / "suite.json", {}
    free, running, pending = list(range(gpus)), [], list(jobs)
    t0 = time.perf_counter()

    def finish(job, proc, ids, start, why=None):
        free.extend(ids)
        free.sort()
        log = (out / f"{job.key}.log").read_text(errors="replace")
        result = {"command": " ".join(job.cmd), "rc": proc.returncode if why is None else -1,
                  "wall_s": round(time.perf_counter() - start, 1), "gpus": ids,
                  "concurrent": concurrent}  # fmt: skip
        if why is None and proc.returncode == 0:
            try:
                result["summary"] = summarize(job.key, out, RUNS[job.name][1])
            except (OSError, ValueError, KeyError) as err:
                result["error"] = f"finished but its results could not be read: {err}"
        else:
            lines = [ln for ln in log.strip().splitlines() if ln.strip()]
            last = next((ln for ln in reversed(lines) if "error" in ln.lower()),
                        lines[-1] if lines else "no output")  # fmt: skip
            result["error"] = f"{why}; {last}" if why else last
        if "error" in result:
            print(f"   {job.key} failed: {result['error']}", flush=True)
        else:
            print(f"   {job.key} done in {result['wall_s']:.0f} s", flush=True)
        suite[job.key] = result
        suite_path.write_text(json.dumps(suite, indent=1))

    while pending or running:
        elapsed = time.perf_counter() - t0
        while pending and elapsed < budget:
            job = pending[0]
            if job.need > gpus:
                pending.pop(0)
                suite[job.key] = {"command": " ".join(job.cmd), "rc": -1,
                                  "error": f"needs {job.need} GPUs, --gpus is {gpus}"}  # fmt: skip
                continue
            if job.need > len(free):
                break
            ids, free[:] = free[: job.need], free[job.need :]
            env = dict(os.environ)
            if concurrent:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, ids))
            print(f"== {job.key} on GPU {ids}: {RUNS[job.name][3]}", flush=True)
            log = open(out / f"{job.key}.log", "w")  # noqa: SIM115 (closed when the job ends)
            proc = subprocess.Popen(job.cmd, cwd=ROOT, env=env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
            running.append((job, proc, ids, time.perf_counter(), log))
            pending.pop(0)
        if elapsed >= budget:
            for job in pending:
                suite[job.key] = {"command": " ".join(job.cmd), "rc": -1,
                                  "error": f"not started: the suite budget of {budget:.0f} s ran out"}  # fmt: skip
            pending.clear()
        for item in list(running):
            job, proc, ids, start, log = item
            why = None
            if proc.poll() is None:
                if time.perf_counter() - start > timeout:
                    why = f"timed out after {timeout:.0f} s"
                elif time.perf_counter() - t0 > budget:
                    why = f"killed when the suite budget of {budget:.0f} s ran out"
                else:
                    continue
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            log.close()
            running.remove(item)
            finish(job, proc, ids, start, why)
        time.sleep(0.2)
    suite_path.write_text(json.dumps(suite, indent=1))
    return suite


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="results folder (created)")
    parser.add_argument("--set", default="gpu", help="gpu, h200, multi, all, or a comma list")
    parser.add_argument("--only", default="", help="comma-separated run names (any set)")
    parser.add_argument("--tiny", action="store_true", help="tiny model on CPU (plumbing)")
    parser.add_argument("--list", action="store_true", help="print names and commands, run none")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per run")
    parser.add_argument("--budget", type=float, default=float("inf"),
                        help="seconds for the whole suite: later runs are skipped, running ones killed")  # fmt: skip
    parser.add_argument("--gpus", type=int, default=1,
                        help="run jobs side by side on this many GPUs (one GPU per 1-GPU run)")  # fmt: skip
    parser.add_argument("--nproc", default="",
                        help="comma-separated GPU counts for the multi runs (default: every GPU)")  # fmt: skip
    args = parser.parse_args()
    sets = [x for x in args.set.split(",") if x]
    bad_sets = [x for x in sets if x not in ("gpu", "h200", "multi", "all")]
    if bad_sets:
        parser.error(f"--set: unknown set(s) {', '.join(bad_sets)}; known: gpu, h200, multi, all")
    names = [n for n in args.only.split(",") if n] or [
        n for n, (s, *_) in RUNS.items() if "all" in sets or s in sets]  # fmt: skip
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        parser.error(f"--only: unknown run(s) {', '.join(unknown)}; known: {', '.join(RUNS)}")
    try:
        nprocs = [int(k) for k in args.nproc.split(",") if k] or [2 if args.tiny else _gpus()]
    except ValueError:
        parser.error(f"--nproc: expected GPU counts like 2,4, got {args.nproc!r}")
    if args.gpus < 1 or min(nprocs) < 1:
        parser.error("--gpus and --nproc need at least 1 GPU")
    out = (args.out or Path("bench_suite_out")).resolve()
    image = out / "first_frame.png"
    if args.list:
        for n in names:
            print(
                f"{n:18} {RUNS[n][3]}\n    {' '.join(command(n, out, image, args.tiny, nprocs[0])[3:])}"
            )
        return
    if args.out is None:
        parser.error("--out is required to run")
    out.mkdir(parents=True, exist_ok=True)
    _write_image(image, 32 if args.tiny else 480, 32 if args.tiny else 832)
    image.with_name("prompts3.txt").write_text(
        "a red fox running through fresh snow\na lighthouse in a storm at night\n"
        "a busy street market seen from above\n")  # fmt: skip
    jobs = jobs_for(names, out, image, args.tiny, args.gpus, nprocs)
    gpus = args.gpus
    if gpus == 1:  # one job at a time, each seeing every GPU
        gpus = max(j.need for j in jobs)
        for j in jobs:
            j.need = gpus
    suite = schedule(jobs, out, gpus, args.timeout, args.budget, concurrent=args.gpus > 1)
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
