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

``--vendor PATH`` (a copy of the release's ``wan/`` + ``hyvideo/`` files, e.g. ``.vendor/hyworld``)
then frees our model and runs the release's own pipeline in this process over the same clip
(``scripts/hy_worldplay_vendor.py``: its ``WanPipeline`` chunk call with its memory selection,
K/V lists, 4 Euler steps and ``MyVAE`` decode; its transformer and VAE classes with random
weights; same prompt embeddings, poses and initial noise), timing ``dit_ms`` (call start to VAE
decode start) and ``decode_ms`` per chunk after ``--vendor-warmup`` untimed passes (compiles).
What the GPU machine lacks (sageattention -> SDPA on our backend, the sequence-parallel launcher,
the text encoder, the pose parser) is substituted at import time and listed in the JSON
(``vendor.substitutions``). ``speedup`` = the release's median / ours (DiT, DiT + decode).
``--parity`` (default with ``--tiny``) saves the release's random transformer as its ``model.pt``
envelope, loads it into ours through our checkpoint conversion and reports the largest
difference of each chunk's latents (``vendor.parity``) and whether the memory frames agree.

GPU:  python scripts/bench_hy_worldplay.py --out benchmarks/<date>_hy_worldplay/bench.json
      python scripts/bench_hy_worldplay.py --memory-fraction 0.17   (a 24 GB budget on an H200)
      python scripts/bench_hy_worldplay.py --vendor .vendor/hyworld --out .../vendor.json
CPU smoke (tiny sizes, no floor): python scripts/bench_hy_worldplay.py --tiny
      python scripts/bench_hy_worldplay.py --tiny --blocks 2 --vendor .vendor/hyworld
      (352x640 with the tiny 8x VAE: the release hard-codes a 44x80 latent, 880 tokens/frame)
"""

from __future__ import annotations

import argparse
import gc
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
    parser.add_argument(
        "--vendor",
        type=Path,
        default=None,
        help="HY-WorldPlay copy: also run the release's own pipeline (peer)",
    )
    parser.add_argument(
        "--vendor-compile",
        choices=("none", "dit", "all"),
        default=None,
        help="torch.compile of the release (its block @torch.compile; all: "
        "+ the VAE decoder, as its DistWrapper); default all on CUDA",
    )
    parser.add_argument(
        "--vendor-warmup",
        type=int,
        default=None,
        help="untimed passes of the release over the clip (default 1 on CUDA)",
    )
    parser.add_argument(
        "--parity",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="load the release's random weights into ours (via our checkpoint "
        "conversion) and compare the chunks (default: with --tiny)",
    )
    parser.add_argument("overrides", nargs="*", help="extra config overrides")
    args = parser.parse_args()

    from flashdreams.bench import block_flops, flops_ms, measure_throughput
    from flashdreams.build import build_rollout
    from tests.unit.test_config import compose_run

    cuda = torch.cuda.is_available() and not args.tiny
    if cuda and args.memory_fraction:
        torch.cuda.set_per_process_memory_fraction(args.memory_fraction)
    if args.vendor is not None and args.blocks > 8:
        raise SystemExit(f"--blocks={args.blocks} with --vendor: at most 8 (the release's "
                         "memory selection wants 32 posed frames or fewer here)")  # fmt: skip
    parity = args.vendor is not None and (args.tiny if args.parity is None else args.parity)
    size = []
    if args.tiny:  # the release hard-codes 880 tokens per frame: a 44x80 latent (8x tiny VAE)
        size = ["rollout.height=352", "rollout.width=640"] if args.vendor else []
    overrides = ["recipe=hy_worldplay_wan_i2v_5b", "model.checkpoint=null", "text_encoder=random",
                 "vae.checkpoint=null", "conditioner.encoder.checkpoint=null", "profile=true",
                 f"rollout.total_blocks={args.blocks}", f"pose=w-{4 * args.blocks - 1}",
                 *([*TINY, *size] if args.tiny else [f"graph={args.graph}",
                                                     f"attention={args.attention}",
                                                     "device=cuda", "dtype=bfloat16"]),
                 *args.overrides]  # fmt: skip
    cfg = compose_run(overrides)
    vendor, tmp, vendor_dit = None, None, None
    if args.vendor is not None:
        import tempfile

        import hy_worldplay_vendor as vendor

        compile_mode = args.vendor_compile or ("all" if cuda else "none")
        ns = vendor.import_vendor(args.vendor, _sdpa_backends(args.attention) if cuda else None,
                                  compile_dit=compile_mode != "none")  # fmt: skip
        if parity:  # the release's weights in its own format, read by our conversion
            vendor_dit = vendor.build_transformer(ns, cfg.model, "cuda" if cuda else "cpu",
                                                  _dtype(cfg.dtype))  # fmt: skip
            tmp = tempfile.TemporaryDirectory(prefix="hyworld_vendor_")
            overrides.append(f"model.checkpoint={vendor.release_checkpoint(vendor_dit, tmp.name)}")
            cfg = compose_run(overrides)
            vendor_dit.cpu()
    rollout = build_rollout(cfg)
    if args.vendor is not None and tuple(rollout.latent_hw) != (44, 80):
        raise SystemExit(f"--vendor: rollout.height={cfg.rollout.height} x rollout.width="
                         f"{cfg.rollout.width} gives a {tuple(rollout.latent_hw)} latent; the "
                         "release hard-codes 44x80 (880 tokens per frame)")  # fmt: skip
    prompts = ["a walk through a marble city"]
    rollout.start(prompts)
    t0 = time.perf_counter()
    rollout.precapture()
    warmup_s = time.perf_counter() - t0
    graphs = getattr(rollout.graph, "graphs", {})
    captured = len(graphs)
    noise, memory = _record(rollout)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rows, latents = [], []
    for _ in range(args.blocks):
        noise.clear(), memory.clear()
        out = rollout.step(sync=True)
        row = out.timer.resolve()
        rows.append({"step": row["step"], "dit_ms": row["diffuse_ms"],
                     "decode_ms": row["decode_ms"], "step_ms": row["step_ms"],
                     "history_frames": rollout.cache.context,
                     "memory_frames": list(memory[-1]) if memory else []})  # fmt: skip
        if args.vendor is not None:
            latents.append((noise[0].cpu(), out.latents.float().cpu() if parity else None))
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    result = {"config": overrides, "warmup_s": warmup_s, "graphs_precaptured": captured,
              "captures_in_steps": len(getattr(rollout.graph, "graphs", {})) - captured,
              "steps": rows, "peak_memory_gib": peak / 2**30}  # fmt: skip
    _medians(result, rows)
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
    _print_rows("ours", rows)
    _write(args.out, result)  # ours lands even if the release's run fails
    if args.vendor is not None:
        frames = rollout.run_frames(args.blocks)
        given = rollout.forwards.inputs(0, frames)
        peer = {"embeds": rollout.text_encoder.encode(prompts, rollout.device, rollout.dtype),
                "inputs": {k: given[k].to(rollout.device) for k in ("viewmats", "intrinsics",
                                                                    "action")},
                "noise": torch.cat([n for n, _ in latents], dim=2).to(rollout.device)}  # fmt: skip
        vae_cfg, device, dtype = cfg.vae, rollout.device, rollout.dtype
        del rollout, out  # free ours before the release's run
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        result["vendor"] = run_vendor(vendor, ns, args, cfg, vae_cfg, vendor_dit, peer,
                                      [ours for _, ours in latents], rows, device, dtype,
                                      compile_mode, cuda)  # fmt: skip
        _compare(result)
        if tmp is not None:
            tmp.cleanup()
    print(json.dumps({k: v for k, v in result.items() if k not in ("steps", "config")}
                     | ({"vendor": {k: v for k, v in result["vendor"].items() if k != "steps"}}
                        if "vendor" in result else {}), indent=1))  # fmt: skip
    _write(args.out, result)


def _write(out: Path | None, result: dict) -> None:
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))


def _dtype(name) -> torch.dtype:
    from flashdreams.io.checkpoint import as_dtype

    return as_dtype(name)


def _sdpa_backends(attention: str) -> list | None:
    """The SDPA backend the release's attention stand-in uses: ours when it is an SDPA one."""
    from torch.nn.attention import SDPBackend

    named = {"sdpa_cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa_flash": SDPBackend.FLASH_ATTENTION,
             "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION}  # fmt: skip
    return [named[attention]] if attention in named else None


def _record(rollout) -> tuple[list, list]:
    """Record the noise draws of each step and the memory frames our model plans."""
    noise, memory = [], []
    draw, plan = rollout.noise, rollout.model.context_plan

    def recorded_noise(shape):
        noise.append(draw(shape))
        return noise[-1]

    def recorded_plan(start, num, inputs):
        out = plan(start, num, inputs)
        memory.append(out.frames)
        return out

    rollout.noise, rollout.model.context_plan = recorded_noise, recorded_plan
    return noise, memory


def _medians(result: dict, rows: list[dict]) -> None:
    for name, lo in (("median", 2), ("steady", 4)):
        timed = [r for r in rows if r["step"] >= lo] or rows
        result[name] = {k: statistics.median(r[k] for r in timed)
                        for k in ("dit_ms", "decode_ms", "step_ms")}  # fmt: skip
        result[name]["dit_decode_ms"] = statistics.median(r["dit_ms"] + r["decode_ms"]
                                                          for r in timed)  # fmt: skip


def _print_rows(name: str, rows: list[dict]) -> None:
    print(f"{name}\n{'step':>4} {'hist':>4} {'DiT ms':>9} {'decode ms':>9} {'total ms':>9}")
    for row in rows:
        print(f"{row['step']:>4} {len(row['memory_frames']):>4} {row['dit_ms']:>9.1f} "
              f"{row['decode_ms']:>9.1f} {row['step_ms']:>9.1f}")  # fmt: skip


def run_vendor(vendor, ns, args, cfg, vae_cfg, dit, peer, ours, our_rows, device, dtype,
               compile_mode, cuda) -> dict:  # fmt: skip
    """The release's pipeline over the same clip: same prompt embeddings, poses and noise."""
    t0 = time.perf_counter()
    if dit is None:
        dit = vendor.build_transformer(ns, cfg.model, device, dtype)
    dit = dit.to(device, dtype)
    vae = vendor.build_vae(ns, vae_cfg, args.tiny, device, dtype)
    run = vendor.VendorRun(ns, dit, vae, peer["embeds"], peer["inputs"], peer["noise"],
                           compile_vae=compile_mode == "all")  # fmt: skip
    num_frames = (peer["noise"].shape[2] - 1) * 4 + 1
    passes = args.vendor_warmup if args.vendor_warmup is not None else (1 if cuda else 0)
    for _ in range(passes):
        for i in range(args.blocks):
            run.chunk(i, num_frames)
    warmup_s = time.perf_counter() - t0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rows, diffs = [], []
    for i in range(args.blocks):
        dit_ms, decode_ms, latents, selected, _ = run.chunk(i, num_frames)
        rows.append({"step": i, "dit_ms": dit_ms, "decode_ms": decode_ms,
                     "step_ms": dit_ms + decode_ms, "memory_frames": list(selected or [])})  # fmt: skip
        if ours[i] is not None:
            ref = ours[i]
            diffs.append({"step": i, "max_abs_diff": (latents.cpu() - ref).abs().max().item(),
                          "ref_max_abs": ref.abs().max().item(),
                          "same_memory": rows[-1]["memory_frames"] == our_rows[i]["memory_frames"]})  # fmt: skip
    out = {"path": str(args.vendor), "compile": compile_mode, "warmup_passes": passes,
           "warmup_s": warmup_s, "substitutions": vendor.SUBSTITUTIONS,
           "attention_backends": [str(b) for b in _sdpa_backends(args.attention) or []]
           if cuda else [], "steps": rows,
           "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0}  # fmt: skip
    _medians(out, rows)
    if diffs:
        out["parity"] = diffs
    _print_rows("vendor (HY-WorldPlay's pipeline)", rows)
    return out


def _compare(result: dict) -> None:
    """Our speed-up over the release (its median / ours), per stage."""
    v = result["vendor"]
    result["speedup"] = {
        name: {k: v[name][k] / result[name][k] for k in ("dit_ms", "dit_decode_ms", "decode_ms")
               if result[name][k] > 0}
        for name in ("median", "steady")
    }  # fmt: skip


if __name__ == "__main__":
    main()
