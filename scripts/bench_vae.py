"""Streaming VAE stages alone on the GPU: ms per AR block, NCDHW against channels-last, per
graph policy.

Cases (random weights at real size, bf16):
- ``wan22_decode``: Wan 2.2 VAE decoder, 4 latent frames per block at 44x80 (HY-WorldPlay, 704x1280).
- ``wan21_decode``: Wan 2.1 VAE decoder, 3 latent frames per block at 60x104 (Self-Forcing, 480x832).
- ``lightvae_encode``: Wan 2.1 VAE encoder pruned to base_dim 24 (LightVAE), 8 frames per block at
  704x1280 (OmniDreams' HDMap encode).
- ``wan21_encode``: the full Wan 2.1 VAE encoder on the same blocks.
- ``taehv_decode``: TAEHV (taew2_1 widths), 3 latent frames per block at 44x80 (Matrix-Game, 352x640).
- ``lighttae_decode``: the same network, 2 latent frames at 88x160 (OmniDreams fast, 704x1280).
  TAEHV compiles with its own ``vae.compile`` (any ``--graphs`` row other than eager).
- ``taehv_encode``: TAEHV's encoder (taew2_1: width 64), 8 frames per block at 704x1280 (OmniDreams'
  HDMap encode in ``omnidreams_single_view_taehv``), under the graph policy as the control runs it.

``--profile N`` adds, per row, the N kernels of one more steady block that take the most GPU time.

Every case streams ``--blocks`` blocks through one causal cache (the first block's first frame
alone, as a clip starts) and reports the median over blocks >= 2 (steady shapes: compiled and
captured once under ``compile_cuda_graph``), and the largest difference of the channels-last
output from the NCDHW one. ``--cudnn-benchmark false,true`` repeats every row with cuDNN's timed
algorithm choice (``torch.backends.cudnn.benchmark``: no gain on the H200 at the Wan 2.2 decode
and LightVAE encode shapes, seventeenth session) and reports the largest difference from the heuristics' row.

GPU:  python scripts/bench_vae.py --out vae.json
CPU smoke (tiny sizes): python scripts/bench_vae.py --tiny
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TAEHV_CASES = ("taehv_decode", "lighttae_decode")  # TAEHV: its own compile flag, no graph policy
STREAM_CACHE_CASES = ("taehv_encode",)  # encoders with a new_cache() and no first-frame step


def policy(name: str):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    return instantiate(OmegaConf.load(ROOT / "flashdreams" / "conf" / "graph" / f"{name}.yaml"))


def build(case: str, channels_last: bool, tiny: bool, graph: str = "eager"):
    from flashdreams.vae.taehv import TAEHVDecoder
    from flashdreams.vae.taehv_encode import TAEHVEncoder
    from flashdreams.vae.wan21 import Wan21StreamingDecoder
    from flashdreams.vae.wan21_encode import Wan21Encoder
    from flashdreams.vae.wan22 import Wan22StreamingDecoder

    small = dict(base_dim=8, dim_mult=[1, 2, 2], num_res_blocks=1) if tiny else {}
    if case in TAEHV_CASES:
        widths = (16, 8, 8, 4) if tiny else (256, 128, 64, 64)
        return TAEHVDecoder(channels=widths, channels_last=channels_last,
                            compile=graph != "eager")  # fmt: skip
    if case == "taehv_encode":
        return TAEHVEncoder(width=8 if tiny else 64, dtype="bfloat16", channels_last=channels_last)
    if case == "wan22_decode":
        return Wan22StreamingDecoder(channels_last=channels_last, **small)
    if case == "wan21_decode":
        return Wan21StreamingDecoder(channels_last=channels_last, **small)
    if case == "lightvae_encode":
        return Wan21Encoder(base_dim=8 if tiny else 24, dtype="bfloat16",
                            channels_last=channels_last)  # fmt: skip
    return Wan21Encoder(dtype="bfloat16", channels_last=channels_last, **small)


def shapes(case: str, tiny: bool) -> tuple:
    """(channels, frames per block, h, w) of one block's input."""
    if case == "wan22_decode":
        return (48, 4, 44, 80) if not tiny else (48, 2, 8, 8)
    if case == "wan21_decode":
        return (16, 3, 60, 104) if not tiny else (16, 2, 8, 8)
    if case == "taehv_decode":
        return (16, 3, 44, 80) if not tiny else (16, 2, 8, 8)
    if case == "lighttae_decode":
        return (16, 2, 88, 160) if not tiny else (16, 2, 8, 8)
    return (3, 8, 704, 1280) if not tiny else (3, 4, 32, 32)


def top_kernels(step, x, count: int) -> list:
    """The ``count`` kernels of one ``step(x)`` with the most GPU time: [name, ms, calls]."""
    from profile_step import device_time_us  # scripts/ (this script's folder)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step(x)
        torch.cuda.synchronize()
    rows = []
    for event in prof.key_averages():
        us = device_time_us(event)
        if us > 0:
            rows.append([event.key[:120], us / 1e3, event.count])
    rows.sort(key=lambda r: -r[1])
    total = sum(r[1] for r in rows)
    return [["(all kernels)", total, sum(r[2] for r in rows)]] + rows[:count]


def run_case(case, channels_last, graph, blocks, device, dtype, tiny, profile_rows=0):
    from flashdreams.graph.runner import GraphRunner

    module = build(case, channels_last, tiny, graph).to(device, dtype).eval()
    c, f, h, w = shapes(case, tiny)
    gen = torch.Generator(device="cpu").manual_seed(0)
    lead = 1 if case not in STREAM_CACHE_CASES and not case.endswith("decode") else 0
    inputs = [torch.randn(1, c, f + (lead if i == 0 else 0), h, w, generator=gen).to(device, dtype)
              for i in range(blocks)]  # fmt: skip
    if case.endswith("decode"):
        if case not in TAEHV_CASES:
            module.set_graph(policy(graph))
        module.reset()

        def step(x):
            return module.decode_step(x)
    elif case in STREAM_CACHE_CASES:
        runner = GraphRunner()
        runner.set_graph(policy(graph))
        cache = [module.new_cache()]

        def step(x):  # steady shapes from the second block on (the first has no past frames)
            steady = tuple(x.shape) if cache[0][0] is not None else None
            out, cache[0] = runner.run_graph("encode", module.encode_step, x, cache[0],
                                             shape_key=steady)  # fmt: skip
            return out
    else:
        runner = GraphRunner()
        runner.set_graph(policy(graph))
        cache = [[None] * module._num_convs]

        def step(x):
            first = None
            if cache[0][0] is None:  # a clip's first frame goes alone, as the HDMap control does
                first, cache[0] = module.encode_step(x[:, :, :1], cache[0])
                x = x[:, :, 1:]
            out, cache[0] = runner.run_graph("encode", module.encode_step, x, cache[0],
                                             shape_key=tuple(x.shape) if first is None else None)  # fmt: skip
            return out if first is None else torch.cat([first, out], dim=2)

    times, outs = [], []
    with torch.no_grad():
        for x in inputs:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = step(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
            outs.append(out.float().cpu())
        kernels = (
            top_kernels(step, inputs[-1], profile_rows)
            if profile_rows and device.type == "cuda"
            else None
        )
    return statistics.median(times[2:] or times), times, outs, kernels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="wan22_decode,wan21_decode,lightvae_encode,wan21_encode")
    parser.add_argument("--graphs", default="eager,compile_cuda_graph")
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--layouts", default="ncdhw,channels_last")
    parser.add_argument(
        "--cudnn-benchmark",
        default="false",
        help="false,true: each row with cuDNN's heuristics, then timed algorithms",
    )
    parser.add_argument("--profile", type=int, default=0, help="top kernels per row (CUDA)")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    rows = []

    def record(row: dict) -> None:  # written after every row: a time-boxed run keeps its rows
        rows.append(row)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"device": torch.cuda.get_device_name() if cuda
                                            else "cpu", "rows": rows}, indent=1))  # fmt: skip

    layouts = [{"ncdhw": False, "channels_last": True}[x] for x in args.layouts.split(",")]
    for case in args.cases.split(","):
        for graph in args.graphs.split(","):
            ref = None
            for channels_last in layouts:
                for bench in (x == "true" for x in args.cudnn_benchmark.split(",")):
                    torch.backends.cudnn.benchmark = bench
                    key = {"case": case, "graph": graph, "channels_last": channels_last,
                           "cudnn_benchmark": bench}  # fmt: skip
                    try:
                        ms, times, outs, kernels = run_case(case, channels_last, graph, args.blocks,
                                                            device, dtype, args.tiny, args.profile)  # fmt: skip
                    except Exception as err:  # noqa: BLE001 (a failed row is reported, not fatal)
                        record({**key, "error": f"{type(err).__name__}: {err}"[:300]})
                        print(rows[-1])
                        continue
                    row = {**key, "median_ms": ms, "ms": times}
                    if kernels:
                        row["top_kernels"] = kernels
                    if ref is None:
                        ref = outs
                    else:  # against the first row of the case (NCDHW / heuristics where run)
                        row["max_abs_diff_vs_first"] = max(float((a - b).abs().max())
                                                           for a, b in zip(outs, ref, strict=True))  # fmt: skip
                    record(row)
                    print(f"{case:16s} {graph:20s} channels_last={channels_last!s:5s} "
                          f"cudnn_benchmark={bench!s:5s} {ms:8.2f} ms/block  "
                          f"{row.get('max_abs_diff_vs_first', '')}")  # fmt: skip
                    for name, kms, calls in kernels or []:
                        print(f"    {kms:8.3f} ms {calls:5d}x  {name}")
                    if cuda:
                        torch.cuda.empty_cache()
    torch.backends.cudnn.benchmark = False


if __name__ == "__main__":
    main()
