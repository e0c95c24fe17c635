"""HY-WorldPlay WAN-5B per AR step at 704x1280: DiT, decode and total, peak memory, the floor.

Runs the ``hy_worldplay_wan_i2v_5b`` recipe with random weights (DiT, VAE and prompt
embeddings; no downloads) for 8 blocks of 4 latent frames along ``pose='w-31'``: blocks 1-3
re-run 4, 8, 12 history frames, blocks 4-7 run with the full 16-frame memory (the fixed-shape
steady state: every one replays the same two captured graphs, the memory's and the block's).
The graphs are captured during warm-up (``Rollout.precapture``); the script counts captures
made during the timed steps by any of its graph policies, the DiT's, the decoder's and the
control's (``captures_in_steps``: 0 means every step replayed graphs).

Per step: ``dit_ms`` (the diffuse stage: the memory re-run + 4 Euler steps), ``decode_ms``
(Wan 2.2 VAE, streaming), ``step_ms``; medians over steps >= 2 and over the steady steps >= 4.
The DiT floor of a step: its FLOPs (``flashdreams.bench.block_flops`` of the model: the memory
forward over n frames attending to n, 4 block forwards over 4 frames attending to n + 4; both
RoPE and PRoPE branches) at the measured GEMM rate (e4m3 when ``precision=fp8`` made the block
linears FP8, else bf16) and the attention backend's rate (``flashdreams.bench.measure_throughput``).

``--vendor PATH`` (a copy of the release's ``wan/`` + ``hyvideo/`` files, e.g. ``.vendor/hyworld``)
then frees our model and runs the release's own pipeline in this process over the same clip
(``scripts/hy_worldplay_vendor.py``: its ``WanPipeline`` chunk call with its memory selection,
K/V lists, 4 Euler steps and ``MyVAE`` decode; its transformer and VAE classes with random
weights; same prompt embeddings, poses and initial noise), timing ``dit_ms`` (call start to VAE
decode start) and ``decode_ms`` per chunk after ``--vendor-warmup`` untimed passes (compiles).
What the GPU machine lacks (sageattention -> SDPA on our backend, the sequence-parallel launcher,
the text encoder, the pose parser) is substituted at import time and listed in the JSON
(``vendor.substitutions``). ``speedup`` = the release's median / ours (DiT, DiT + decode).
``--vendor-only`` skips our timed run (ours builds only to give the clip's prompt embeddings,
poses and noise). The release's ``generate.py`` compiles by default (``@torch.compile`` on its
transformer block, torch's default arguments, so shapes turn dynamic after the first recompile:
minutes of symbolic-shape work on an H200; and its ``DistWrapper`` compiles the VAE decoder), so
the first row is that (``--vendor-compile all``) within ``--vendor-compile-budget-s``; a row cut
there is followed by a ``--vendor-compile none`` row in what is left of ``--vendor-budget-s``
(default 420 s on CUDA: the whole release pass; compiled as it ships, the release needed 267 s
on a fresh H200, warm-up pass included, and a 200 s box cut it). Every row lands in
``vendor_rows`` (status ok / over_budget, the chunks timed so far) and the JSON is rewritten
after each chunk; ``vendor`` is the first complete row.
``--parity`` (default with ``--tiny``) saves the release's random transformer as its ``model.pt``
envelope, loads it into ours through our checkpoint conversion and reports the largest
difference of each chunk's latents (``vendor.parity``) and whether the memory frames agree.

GPU:  python scripts/bench_hy_worldplay.py --out benchmarks/<date>_hy_worldplay/bench.json
      python scripts/bench_hy_worldplay.py --memory-fraction 0.17   (a 24 GB budget on an H200)
      python scripts/bench_hy_worldplay.py --vendor .vendor/hyworld --out .../vendor.json
      python scripts/bench_hy_worldplay.py --vendor .vendor/hyworld --vendor-only --out .../vendor.json
CPU smoke (tiny sizes, no floor): python scripts/bench_hy_worldplay.py --tiny
      python scripts/bench_hy_worldplay.py --tiny --blocks 2 --vendor .vendor/hyworld
      python scripts/bench_hy_worldplay.py --tiny --blocks 2 --vendor .vendor/hyworld --vendor-only \
          --vendor-compile dit --vendor-budget-s 120 --vendor-compile-budget-s 3   (cut, then eager)
      (352x640 with the tiny 8x VAE: the release hard-codes a 44x80 latent, 880 tokens/frame)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import signal
import statistics
import time
from pathlib import Path

import torch

TINY = ["model.dim=64", "model.num_heads=2", "model.num_layers=2", "model.ffn_dim=128",
        "model.text_dim=32", "model.text_len=8", "model.memory_points=2000",
        "vae.base_dim=8", "vae.dim_mult=[1,2,2]", "vae.num_res_blocks=1",
        "vae.temperal_downsample=[true,true]", "rollout.height=32", "rollout.width=32",
        "device=cpu", "dtype=float32", "graph=eager", "attention=sdpa"]  # fmt: skip


def count_graphs(rollout) -> int:
    """CUDA graphs captured so far by the rollout's policies: the DiT's, and the decoder's and
    the control's (each has its own instance: ``vae.graph=follow``, a captured HDMap encode)."""
    owners = (rollout, rollout.vae, rollout.control)
    policies = {id(p): p for p in (getattr(o, n, None) for o in owners for n in ("graph", "_graph"))
                if p is not None}  # fmt: skip
    return sum(len(getattr(p, "graphs", {})) for p in policies.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--graph",
        default="compile_cuda_graph",
        help="graph policy (the H200 measured compile_cuda_graph a 23 percent faster DiT than cuda_graph)",
    )
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
        "--vendor-only",
        action="store_true",
        help="skip our timed run (ours measured already): build ours only for the clip's "
        "prompt embeddings, poses and noise, then run the release",
    )
    parser.add_argument(
        "--vendor-budget-s",
        type=float,
        default=None,
        help="wall seconds of the whole release pass, warm-up and compiles included "
        "(default 420 on CUDA, none on the CPU)",
    )
    parser.add_argument(
        "--vendor-compile-budget-s",
        type=float,
        default=None,
        help="seconds the first (compiled) release row may take before it is cut and a "
        "--vendor-compile none row runs in what is left (default: budget - 90)",
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
    parser.add_argument(
        "--save-latents",
        type=Path,
        default=None,
        help="save our clean latents per chunk here (torch .pt), to compare configurations",
    )
    parser.add_argument(
        "--compare-latents",
        type=Path,
        default=None,
        help="a --save-latents file of another configuration (same seed and weights): "
        "report the relative L2 of our chunks against it",
    )
    parser.add_argument("overrides", nargs="*", help="extra config overrides")
    args = parser.parse_args()

    from flashdreams.bench import block_flops, flops_ms, measure_throughput, ran_fp8_linears
    from flashdreams.build import build_rollout
    from flashdreams.config import compose_run

    cuda = torch.cuda.is_available() and not args.tiny
    if cuda and args.memory_fraction:
        torch.cuda.set_per_process_memory_fraction(args.memory_fraction)
    if args.vendor_only and args.vendor is None:
        raise SystemExit("--vendor-only runs the release alone: give --vendor PATH")
    if args.vendor_only and args.parity:
        raise SystemExit("--parity compares our chunks with the release's: not with --vendor-only")
    if args.vendor is not None and args.blocks > 8:
        raise SystemExit(f"--blocks={args.blocks} with --vendor: at most 8 (the release's "
                         "memory selection wants 32 posed frames or fewer here)")  # fmt: skip
    parity = (args.vendor is not None and not args.vendor_only
              and (args.tiny if args.parity is None else args.parity))  # fmt: skip
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
    if args.vendor_only:
        result = {"config": overrides, "vendor_only": True}
        noise = [rollout.noise((rollout.batch_size, rollout.model.out_dim,
                                rollout.schedule.frames(i), *rollout.latent_hw))
                 for i in range(args.blocks)]  # fmt: skip
        latents, rows, box = [(n, None) for n in noise], [], [rollout]
        del rollout
        _run_vendor(args, cfg, box, prompts, latents, rows, result, vendor, ns, vendor_dit,
                    compile_mode, cuda)  # fmt: skip
        return
    t0 = time.perf_counter()
    rollout.precapture()
    warmup_s = time.perf_counter() - t0
    captured = count_graphs(rollout)
    noise, memory = _record(rollout)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rows, latents, clean = [], [], []
    for _ in range(args.blocks):
        noise.clear(), memory.clear()
        out = rollout.step(sync=True)
        row = out.timer.resolve()
        rows.append({"step": row["step"], "dit_ms": row["diffuse_ms"],
                     "decode_ms": row["decode_ms"], "step_ms": row["step_ms"],
                     "history_frames": rollout.cache.context,
                     "memory_frames": list(memory[-1]) if memory else []})  # fmt: skip
        keep = parity or args.save_latents or args.compare_latents
        got = out.latents.float().cpu() if keep else None
        if args.vendor is not None:
            latents.append((noise[0].cpu(), got if parity else None))
        if args.save_latents or args.compare_latents:
            clean.append(got)
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    result = {"config": overrides, "warmup_s": warmup_s, "graphs_precaptured": captured,
              "captures_in_steps": count_graphs(rollout) - captured,
              "steps": rows, "peak_memory_gib": peak / 2**30}  # fmt: skip
    _medians(result, rows)
    if args.save_latents:
        args.save_latents.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"config": overrides, "latents": clean}, args.save_latents)
    if args.compare_latents:
        result["latents_vs"] = _compare_latents(clean, args.compare_latents)
    if cuda:
        m, r = cfg.model, cfg.rollout
        tpf = rollout.cache_tokens_per_frame()
        # the linears' rate: e4m3 when the blocks' GEMMs ran in FP8 (precision=fp8 on this GPU)
        fp8 = ran_fp8_linears({"precision": rollout.precision.effective})
        rate = measure_throughput(rollout.model.attention, m.num_heads, m.dim // m.num_heads,
                                  r.frames_per_block * tpf, 20 * tpf, fp8_linears=fp8)  # fmt: skip
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
    del out
    if args.vendor is not None:
        box = [rollout]
        del rollout
        _run_vendor(args, cfg, box, prompts, latents, rows, result, vendor, ns, vendor_dit,
                    compile_mode, cuda)  # fmt: skip
        if tmp is not None:
            tmp.cleanup()
        return
    _summary(result)
    _write(args.out, result)


def _run_vendor(args, cfg, box: list, prompts, latents, rows, result, vendor, ns, vendor_dit,
                compile_mode, cuda) -> None:  # fmt: skip
    """Free ours (the rollout handed over in ``box``), then the release's rows over the same
    clip (written as they go)."""
    rollout = box.pop()
    frames = rollout.run_frames(args.blocks)
    given = rollout.forwards.inputs(0, frames)
    peer = {"embeds": rollout.text_encoder.encode(prompts, rollout.device, rollout.dtype),
            "inputs": {k: given[k].to(rollout.device) for k in ("viewmats", "intrinsics",
                                                                "action")},
            "noise": torch.cat([n for n, _ in latents], dim=2).to(rollout.device)}  # fmt: skip
    vae_cfg, device, dtype = cfg.vae, rollout.device, rollout.dtype
    del rollout  # free ours before the release's run
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    run_vendor(vendor, ns, args, cfg, vae_cfg, vendor_dit, peer, [ours for _, ours in latents],
               rows, device, dtype, compile_mode, cuda, result)  # fmt: skip
    if "steps" in result and "vendor" in result:
        _compare(result)
    _summary(result)
    _write(args.out, result)


def _compare_latents(clean: list[torch.Tensor], path: Path) -> dict:
    """Relative L2 of each chunk's clean latents against another run's (``--save-latents``)."""
    ref = torch.load(path)
    if len(ref["latents"]) != len(clean):
        raise SystemExit(f"--compare-latents {path}: {len(ref['latents'])} chunks, this run "
                         f"{len(clean)}")  # fmt: skip
    rel = [
        float((a - b).norm() / b.norm().clamp_min(1e-12))
        for a, b in zip(clean, ref["latents"], strict=True)
    ]
    print(
        "clean latents vs " + str(path) + ": rel L2 per chunk " + ", ".join(f"{r:.4f}" for r in rel)
    )
    return {"path": str(path), "config": ref["config"], "rel_l2": rel}


def _summary(result: dict) -> None:
    skip = ("steps", "config", "vendor_rows")
    brief = {k: v for k, v in result.items() if k not in skip}
    if "vendor" in result:
        brief["vendor"] = {k: v for k, v in result["vendor"].items() if k != "steps"}
    print(json.dumps(brief, indent=1))


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


class _OverBudget(Exception):
    """A release row ran past its time box (raised from SIGALRM between bytecodes)."""


@contextlib.contextmanager
def _time_box(seconds: float | None):
    """Raise ``_OverBudget`` in the main thread after ``seconds`` (None: no limit); yields a
    dict whose ``fired`` says whether it did (dynamo re-raises it wrapped in its own error)."""
    state = {"fired": False}
    if seconds is None:
        yield state
        return
    if seconds <= 0:
        state["fired"] = True
        raise _OverBudget

    def alarm(signum, frame):
        state["fired"] = True
        raise _OverBudget

    previous = signal.signal(signal.SIGALRM, alarm)
    # repeating: an alarm raised where the exception is swallowed (a callback, a __del__)
    # is followed by another every second until the row leaves the box
    signal.setitimer(signal.ITIMER_REAL, seconds, 1.0)
    try:
        yield state
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_vendor(vendor, ns, args, cfg, vae_cfg, dit, peer, ours, our_rows, device, dtype,
               compile_mode, cuda, result) -> None:  # fmt: skip
    """The release's pipeline over the same clip: same prompt embeddings, poses and noise.

    Rows, each time-boxed: the release as it ships (``compile_mode``; its ``generate.py``
    compiles by default: ``@torch.compile`` on every transformer block, the VAE decoder
    compiled by its ``DistWrapper``) within ``--vendor-compile-budget-s``; if that row is cut,
    a ``--vendor-compile none`` row in what is left of ``--vendor-budget-s``. Each row lands in
    ``result["vendor_rows"]`` (``status`` ok / over_budget, the chunks timed so far) and the
    JSON is rewritten after every chunk; ``result["vendor"]`` is the first complete row."""
    t0 = time.perf_counter()
    total = args.vendor_budget_s if args.vendor_budget_s is not None else (420.0 if cuda else None)
    first = args.vendor_compile_budget_s
    if first is None and total is not None:  # the compiled release took 267 s on a fresh H200
        first = max(total - 90.0, total / 2) if compile_mode != "none" else total
    if dit is None:
        dit = vendor.build_transformer(ns, cfg.model, device, dtype)
    dit = dit.to(device, dtype)
    vae = vendor.build_vae(ns, vae_cfg, args.tiny, device, dtype)
    setup_s = time.perf_counter() - t0
    modes = [compile_mode] + (["none"] if compile_mode != "none" and total is not None else [])
    result["vendor_rows"] = []
    for k, mode in enumerate(modes):
        left = None if total is None else total - (time.perf_counter() - t0)
        box = left if k or first is None else min(first, left)
        row = _vendor_row(vendor, ns, args, dit, vae, peer, ours, our_rows, mode, cuda, box,
                          result)  # fmt: skip
        row["setup_s"] = setup_s
        _write(args.out, result)
        if row["status"] == "ok":
            result["vendor"] = row
            _print_rows(f"vendor (HY-WorldPlay's pipeline, compile={mode})", row["steps"])
            break
        print(f"vendor compile={mode}: over its {box:.0f} s box after {row['elapsed_s']:.0f} s "
              f"({len(row['steps'])} chunks timed)")  # fmt: skip


def _vendor_row(vendor, ns, args, dit, vae, peer, ours, our_rows, mode, cuda, box,
                result) -> dict:  # fmt: skip
    """One time-boxed release row; the row dict is in ``result["vendor_rows"]`` from the start."""
    passes = args.vendor_warmup if args.vendor_warmup is not None else (1 if cuda else 0)
    row = {"path": str(args.vendor), "compile": mode, "status": "running", "time_box_s": box,
           "warmup_passes": passes, "substitutions": vendor.SUBSTITUTIONS,
           "attention_backends": [str(b) for b in _sdpa_backends(args.attention) or []]
           if cuda else [], "steps": []}  # fmt: skip
    result["vendor_rows"].append(row)
    t0 = time.perf_counter()
    vendor.set_dit_compile(ns, mode != "none")
    torch._dynamo.reset()  # a row cut mid-compile leaves no half-built state behind
    run = vendor.VendorRun(ns, dit, vae, peer["embeds"], peer["inputs"], peer["noise"],
                           compile_vae=mode == "all")  # fmt: skip
    num_frames = (peer["noise"].shape[2] - 1) * 4 + 1
    diffs, box_state = [], {"fired": False}
    try:
        with _time_box(box) as box_state:
            for _ in range(passes):
                for i in range(args.blocks):
                    run.chunk(i, num_frames)
            row["warmup_s"] = time.perf_counter() - t0
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            for i in range(args.blocks):
                dit_ms, decode_ms, latents, selected, _ = run.chunk(i, num_frames)
                row["steps"].append({"step": i, "dit_ms": dit_ms, "decode_ms": decode_ms,
                                     "step_ms": dit_ms + decode_ms,
                                     "memory_frames": list(selected or [])})  # fmt: skip
                if ours[i] is not None:
                    ref = ours[i]
                    diffs.append({"step": i,
                                  "max_abs_diff": (latents.cpu() - ref).abs().max().item(),
                                  "ref_max_abs": ref.abs().max().item(),
                                  "same_memory": row["steps"][-1]["memory_frames"]
                                  == our_rows[i]["memory_frames"]})  # fmt: skip
                row["elapsed_s"] = time.perf_counter() - t0
                _write(args.out, result)  # partial: the chunks timed so far
        row["status"] = "ok"
    except Exception as err:  # noqa: BLE001 (the time box, possibly wrapped by dynamo)
        if not (isinstance(err, _OverBudget) or box_state["fired"]):
            raise
        row["status"] = "over_budget"
    finally:
        row["elapsed_s"] = time.perf_counter() - t0
        del run
        gc.collect()
    row["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0
    if row["steps"]:
        _medians(row, row["steps"])
    if diffs:
        row["parity"] = diffs
    return row


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
