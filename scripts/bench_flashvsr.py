"""FlashVSR v1.1 per scene: ms per chunk, FPS, dense and sparse attention, stage times.

Builds ``flashvsr_v1_1_tiny`` once with random weights at the real size (Wan 2.1 1.3B DiT, LR
projector, TCDecoder 512/256/128/128, no downloads) and runs, per scene and attention mode, a
stream of chunks (the release's first of 6 latent frames, then 2 = 8 output frames each) fed
random LR frames (``control.stream``, bicubic on the device): the 4x scene 768x1408 first (the
speed target: 38 FPS on one H200), then six 2x scenes from 384x384 to 704x1280 (the issue's
end points; the four in between are ours). Sparse attention (``vsr.sparse_ratio``, FlexAttention block masks) needs
sizes in multiples of 128; other scenes report it as n/a.

Per (scene, mode): median over chunks >= 2 of the chunk period (``period_ms``), FPS = 8 output
frames / period, and its stages: projector (the LR control's forwards, CUDA events), DiT
(the diffuse stage minus the projector) and decode (TCDecoder + colour correction). A time
budget (``--budget-s``) skips the (scene, mode) pairs left when it is used up (listed as
skipped), so the run fits its slot whatever the compile times.

GPU:  python scripts/bench_flashvsr.py --out benchmarks/<date>_flashvsr/flashvsr.json
CPU smoke (tiny sizes): python scripts/bench_flashvsr.py --tiny
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

SCENES = [  # (height, width, scale): output size
    (768, 1408, 4),
    (384, 384, 2), (512, 512, 2), (512, 896, 2), (640, 1152, 2), (768, 1280, 2), (704, 1280, 2),
]  # fmt: skip
TINY = ["model.dim=64", "model.num_heads=2", "model.num_layers=2", "model.ffn_dim=128",
        "model.text_dim=16", "model.text_len=4", "control.hidden_dim1=8", "control.hidden_dim2=8",
        "vae.decoder.channels=[8,8,4,4]", "device=cpu", "dtype=float32", "graph=eager",
        "vsr.size_multiple=16"]  # fmt: skip
TINY_SCENES = [(128, 128, 4), (64, 96, 2)]


def overrides(args, height: int, width: int, scale: int) -> list[str]:
    base = ["recipe=flashvsr_v1_1_tiny", "model.checkpoint=null", "vae.decoder.checkpoint=null",
            "control.checkpoint=null", "text_encoder=random", "control.stream=true",
            f"control.stream_size=[{height // scale},{width // scale}]", f"vsr.scale={scale}",
            "vsr.resize=torch", f"rollout.height={height}", f"rollout.width={width}",
            "rollout.total_blocks=null", "attention=flex", f"seed={args.seed}"]  # fmt: skip
    if not args.tiny:
        base += [f"graph={args.graph}", f"vae.decoder.compile={str(args.graph != 'eager').lower()}"]
    return base + (TINY if args.tiny else [])


def run_scene(shared, cfg, chunks: int, sparse: float | None) -> dict:
    from flashdreams.build import assemble_rollout

    shared.model._step.sparse_ratio = sparse  # the same weights, dense or sparse attention
    rollout = assemble_rollout(cfg, shared)
    control, dev = rollout.control, rollout.device
    h0, w0 = control.stream_size
    rollout.start([cfg.prompt])
    g = torch.Generator(dev).manual_seed(0)
    latents = rollout.run_frames(chunks)  # the schedule's: 6, then 2 per chunk
    lr = torch.randint(0, 256, (1, 4 * latents + 1, h0, w0, 3), generator=g, device=dev,
                       dtype=torch.uint8)  # fmt: skip
    control.push_frames(lr[0])
    rows = []
    for _ in range(chunks):
        out = rollout.step(sync=True)
        out.timer.add_parts(control.take_parts())  # the projector's forwards: projector_ms
        row = out.timer.resolve()
        row["dit_ms"] = row["diffuse_ms"] - row["projector_ms"]
        rows.append(row)
    steady = rows[2:] if len(rows) > 2 else rows

    def med(key: str) -> float:
        return round(statistics.median(r[key] for r in steady), 2)

    period = med("period_ms")
    frames = 4 * rollout.frames_per_block
    return {"ms_per_chunk": period, "fps": round(frames * 1e3 / period, 2),
            "projector_ms": med("projector_ms"), "dit_ms": med("dit_ms"),
            "decode_ms": med("decode_ms"), "chunks": len(rows),
            "peak_gib": round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
            if dev.type == "cuda" else None}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="JSON file to write")
    ap.add_argument("--chunks", type=int, default=8, help="chunks per (scene, mode)")
    ap.add_argument("--graph", default="compile", help="graph policy of the DiT")
    ap.add_argument("--sparse-ratio", type=float, default=2.0, help="the sparse mode's ratio")
    ap.add_argument("--budget-s", type=float, default=270.0, help="skip pairs after this")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modes", default="dense,sparse", help="attention modes to run, in order")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test at tiny sizes")
    args = ap.parse_args()

    from flashdreams.build import build_shared
    from flashdreams.config.options import scope_options
    from flashdreams.postprocess import compose_run

    t0 = time.perf_counter()
    scenes = TINY_SCENES if args.tiny else SCENES
    first = compose_run(overrides(args, *scenes[0]))
    scope_options(first)
    shared = build_shared(first)
    device = str(shared.device)
    results = {"recipe": "flashvsr_v1_1_tiny", "weights": "random", "graph": args.graph,
               "device": torch.cuda.get_device_name() if shared.device.type == "cuda" else "cpu",
               "torch": torch.__version__, "build_s": round(time.perf_counter() - t0, 1),
               "scenes": []}  # fmt: skip
    for height, width, scale in scenes:
        entry = {"scene": f"{height}x{width}", "scale": scale}
        ratios = {"dense": None, "sparse": args.sparse_ratio}
        for mode in args.modes.split(","):
            ratio = ratios[mode]
            if ratio is not None and (height % 128 or width % 128):
                entry[mode] = "n/a (needs multiples of 128)"
                continue
            if time.perf_counter() - t0 > args.budget_s:
                entry[mode] = "skipped (time budget)"
                continue
            cfg = compose_run(overrides(args, height, width, scale))
            scope_options(cfg)
            start = time.perf_counter()
            try:
                entry[mode] = run_scene(shared, cfg, args.chunks, ratio)
                entry[mode]["wall_s"] = round(time.perf_counter() - start, 1)
            except Exception as err:  # noqa: BLE001  (record it, measure the others)
                entry[mode] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:300]}"
            torch.cuda.empty_cache() if device.startswith("cuda") else None
            print(f"{entry['scene']:>10} x{scale} {mode:>6}: {entry[mode]}", flush=True)
        results["scenes"].append(entry)
        if args.out is not None:  # written as it goes: a run cut short keeps its scenes
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2) + "\n")
    results["total_s"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
