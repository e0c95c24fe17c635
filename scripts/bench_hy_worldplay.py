"""HY-WorldPlay WAN-5B per AR step at 704x1280: DiT, decode and total, peak memory, the floor.

Runs the ``hy_worldplay_wan_i2v_5b`` recipe with random weights (DiT, VAE and prompt
embeddings; no downloads) for 8 blocks of 4 latent frames along ``pose='w-31'``: blocks 1-3
re-run 4, 8, 12 history frames, blocks 4-7 run with the full 16-frame memory (the fixed-shape
steady state: every one replays the same two captured graphs, the memory's and the block's).
The graphs are captured during warm-up (``Rollout.precapture``); the script counts captures
made during the timed steps (``captures_in_steps``: 0 means every step replayed graphs).

Per step: ``dit_ms`` (the diffuse stage: the memory re-run + 4 Euler steps), ``decode_ms``
(Wan 2.2 VAE, streaming), ``step_ms``; medians over steps >= 2 and over the steady steps >= 4.
The DiT floor of a step: its FLOPs (``flashdreams.bench.block_flops`` of the model: the memory
forward over n frames attending to n, 4 block forwards over 4 frames attending to n + 4; both
RoPE and PRoPE branches) at the measured bf16 GEMM rate and the attention backend's rate
(``flashdreams.bench.measure_throughput``).

GPU:  python scripts/bench_hy_worldplay.py --out benchmarks/<date>_hy_worldplay/bench.json
      python scripts/bench_hy_worldplay.py --memory-fraction 0.17   (a 24 GB budget on an H200)
CPU smoke (tiny sizes, no floor): python scripts/bench_hy_worldplay.py --tiny
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

TINY = ["model.dim=64", "model.num_heads=2", "model.num_layers=2", "model.ffn_dim=128",
        "model.text_dim=32", "model.text_len=8", "model.memory_points=2000",
        "vae.base_dim=8", "vae.dim_mult=[1,2,2]", "vae.num_res_blocks=1",
        "vae.temperal_downsample=[true,true]", "rollout.height=32", "rollout.width=32",
        "device=cpu", "dtype=float32", "graph=eager", "attention=sdpa"]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--graph", default="cuda_graph", help="graph policy")
    parser.add_argument("--attention", default="sdpa_cudnn", help="attention backend")
    parser.add_argument("--blocks", type=int, default=8, help="AR blocks (memory from block 4)")
    parser.add_argument(
        "--memory-fraction",
        type=float,
        default=None,
        help="cap CUDA allocations at this fraction of the GPU (24 GB: 0.17)",
    )
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run at tiny sizes")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here")
    parser.add_argument("overrides", nargs="*", help="extra config overrides")
    args = parser.parse_args()

    from flashdreams.bench import block_flops, flops_ms, measure_throughput
    from flashdreams.build import build_rollout
    from tests.unit.test_config import compose_run

    cuda = torch.cuda.is_available() and not args.tiny
    if cuda and args.memory_fraction:
        torch.cuda.set_per_process_memory_fraction(args.memory_fraction)
    overrides = ["recipe=hy_worldplay_wan_i2v_5b", "model.checkpoint=null", "text_encoder=random",
                 "vae.checkpoint=null", "conditioner.encoder.checkpoint=null", "profile=true",
                 f"rollout.total_blocks={args.blocks}", f"pose=w-{4 * args.blocks - 1}",
                 *([*TINY] if args.tiny else [f"graph={args.graph}", f"attention={args.attention}",
                                              "device=cuda", "dtype=bfloat16"]),
                 *args.overrides]  # fmt: skip
    cfg = compose_run(overrides)
    rollout = build_rollout(cfg)
    rollout.start(["a walk through a marble city"])
    t0 = time.perf_counter()
    rollout.precapture()
    warmup_s = time.perf_counter() - t0
    graphs = getattr(rollout.graph, "graphs", {})
    captured = len(graphs)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rows = []
    for _ in range(args.blocks):
        out = rollout.step(sync=True)
        row = out.timer.resolve()
        rows.append({"step": row["step"], "dit_ms": row["diffuse_ms"],
                     "decode_ms": row["decode_ms"], "step_ms": row["step_ms"],
                     "history_frames": rollout.cache.context})  # fmt: skip
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    result = {"config": overrides, "warmup_s": warmup_s, "graphs_precaptured": captured,
              "captures_in_steps": len(getattr(rollout.graph, "graphs", {})) - captured,
              "steps": rows, "peak_memory_gib": peak / 2**30}  # fmt: skip
    for name, lo in (("median", 2), ("steady", 4)):
        timed = [r for r in rows if r["step"] >= lo] or rows
        result[name] = {k: statistics.median(r[k] for r in timed)
                        for k in ("dit_ms", "decode_ms", "step_ms")}  # fmt: skip
    if cuda:
        m, r = cfg.model, cfg.rollout
        tpf = rollout.cache_tokens_per_frame()
        rate = measure_throughput(rollout.model.attention, m.num_heads, m.dim // m.num_heads,
                                  r.frames_per_block * tpf, 20 * tpf)  # fmt: skip
        steps = len(cfg.scheduler.timesteps)
        for row in rows:
            hist, fpb = row["history_frames"], r.frames_per_block
            f = block_flops(rollout.model, tpf, fpb, hist + fpb, steps, hist)
            row["dit_floor_ms"] = flops_ms(f, rate)
        steady = [row for row in rows if row["step"] >= 4]
        floor = statistics.median(row["dit_floor_ms"] for row in steady)
        result["floor"] = {**rate, "steady_dit_floor_ms": floor,
                           "floor_over_measured": floor / result["steady"]["dit_ms"]}  # fmt: skip
    print(f"{'step':>4} {'hist':>4} {'DiT ms':>9} {'decode ms':>9} {'total ms':>9}")
    for row in rows:
        print(f"{row['step']:>4} {row['history_frames']:>4} {row['dit_ms']:>9.1f} "
              f"{row['decode_ms']:>9.1f} {row['step_ms']:>9.1f}")  # fmt: skip
    print(json.dumps({k: v for k, v in result.items() if k not in ("steps", "config")}, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
