"""Attention kernels side by side at the Wan shapes: time, TFLOP/s and error against bf16 SDPA.

For each (Lq, Lk) it times, in one process on one GPU: SDPA pinned to cuDNN and to flash (bf16),
cuDNN over 2..N key chunks batched into one launch and merged by log-sum-exp (``kv_splits``; the
launch alone too), an installed flash-attn 4 / FlashAttention-3 package (bf16, also split),
``attention=cudnn_fp8`` end to end (per-tensor quantization of Q/K/V + the FP8 kernel + O back to
bf16), the FP8 kernel alone on pre-quantized inputs, and the quantization of K/V alone. Error of
each against SDPA-cuDNN bf16 (relative L2, cosine), and of the FP8 kernel against the fp32
emulation of the same e4m3 scheme (``reference_fp8_attention``) on a smaller shape. Times are
medians over CUDA-graph replays of 20 back-to-back calls (what a captured rollout pays; a single
short call timed with events mostly measures its host launch), ``--eager-timing`` for the latter.

    python scripts/bench_attention.py --heads 12 --lq 4680 --lk 4680,14040,23400,32760 \
        --out benchmarks/<dir>/attention.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from flashdreams.attention.base import route_lines, route_report
from flashdreams.attention.cudnn_fp8 import CudnnFp8Attention, reference_fp8_attention
from flashdreams.attention.flash_attn import FlashAttnAttention, find_flash_attn
from flashdreams.attention.sdpa import SdpaAttention
from flashdreams.bench import time_cuda, time_replayed
from flashdreams.graph.cuda_graph import capture
from flashdreams.parallel.ring_attention import attention_lse
from flashdreams.precision.fp8_tensor import quantize_tensor_device


def error(out: torch.Tensor, ref: torch.Tensor) -> dict:
    o, r = out.float().flatten(), ref.float().flatten()
    return {"rel_l2": float((o - r).norm() / r.norm()),
            "cosine": float(F.cosine_similarity(o, r, dim=0))}  # fmt: skip


def _row(lq: int, lk: int, h: int, d: int, backends: dict, fp8, repeats: int, max_splits: int,
         timed=time_replayed) -> dict:  # fmt: skip
    """Every backend at one (Lq, Lk): median ms, TFLOP/s, error against SDPA-cuDNN bf16."""
    dev = torch.device("cuda")
    q = torch.randn(1, lq, h, d, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, lk, h, d, device=dev, dtype=torch.bfloat16)
    v = torch.randn(1, lk, h, d, device=dev, dtype=torch.bfloat16)
    flops = 4 * lq * lk * h * d
    ref = backends["sdpa_cudnn"](q, k, v)
    row = {"lq": lq, "lk": lk, "heads": h, "head_dim": d}
    for name, fn in backends.items():
        ms = timed(lambda fn=fn: fn(q, k, v), repeats)
        row[name] = {"ms": ms, "tflops": flops / ms / 1e9, **error(fn(q, k, v), ref)}
    # as in a rollout: the KV cache hands over a running bound on |K|, |V| (one pass less)
    kb, vb = k.detach(), v.detach()
    bound = tuple(x.abs().amax().float().reshape(1) for x in (k, v))
    ms = timed(lambda: fp8(q, kb, vb, None, bound), repeats)
    row["cudnn_fp8_kv_bound"] = {"ms": ms, "tflops": flops / ms / 1e9}
    for name, fn in backends.items():  # the split count "auto" chose for this shape
        if getattr(fn, "kv_splits", 1) == "auto":  # fmt: skip
            row[name]["splits"] = fn.splits_for(q, k)
    for s in range(2, max_splits + 1):  # the batched launch alone, without the merge
        if lk % s == 0:
            qs = q.expand(s, lq, h, d).contiguous().transpose(1, 2)
            ks, vs = (x.reshape(s, lk // s, h, d).transpose(1, 2) for x in (k, v))
            ms = timed(lambda qs=qs, ks=ks, vs=vs: attention_lse(qs, ks, vs, "cudnn"), repeats)
            row[f"sdpa_cudnn_split{s}_kernel"] = {"ms": ms, "tflops": flops / ms / 1e9}
    plan = fp8._plan(q, k) if fp8._declines(q) is None else None
    if plan is not None:
        (q8, dq), (k8, dk), (v8, dv) = (quantize_tensor_device(x) for x in (q, k, v))
        ms = timed(lambda: plan.run(q8, dq, k8, dk, v8, dv), repeats)
        row["cudnn_fp8_kernel"] = {"ms": ms, "tflops": flops / ms / 1e9}
        row["quantize_kv_ms"] = timed(
            lambda: (quantize_tensor_device(k), quantize_tensor_device(v)), repeats
        )
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--lq", type=int, default=4680)
    ap.add_argument("--lk", default="4680,14040,23400,32760")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--max-splits", type=int, default=4, help="split-KV counts 2..N")
    ap.add_argument(
        "--fa4-tiles", default="", help="flash-attn 4 tiles to try, e.g. 128x176,192x128"
    )
    ap.add_argument(
        "--eager-timing", action="store_true",
        help="time single calls with events (host launch cost included) instead of CUDA-graph "
        "replays of 20 back-to-back calls",
    )  # fmt: skip
    ap.add_argument(
        "--fp8-max-keys", default="",
        help="also run attention=cudnn_fp8 with these attention.max_keys (key chunks merged by "
        "log-sum-exp), e.g. 8192,16384: error against bf16 SDPA per key chunk size",
    )  # fmt: skip
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_attention: needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    dev, h, d = torch.device("cuda"), args.heads, args.head_dim
    fp8 = CudnnFp8Attention(min_kv_tokens=0)
    backends = {"sdpa_cudnn": SdpaAttention("cudnn"), "sdpa_flash": SdpaAttention("flash"),
                "cudnn_fp8": fp8}  # fmt: skip
    for keys in filter(None, args.fp8_max_keys.split(",")):
        backends[f"cudnn_fp8_keys{keys}"] = CudnnFp8Attention(min_kv_tokens=0, max_keys=int(keys))
    for splits in (*range(2, args.max_splits + 1), "auto"):  # one launch over key chunks
        backends[f"sdpa_cudnn_split{splits}"] = SdpaAttention("cudnn", kv_splits=splits)
    for version in ("4", "3"):  # optional FlashAttention packages, when installed
        if find_flash_attn(version)[1] is not None:
            backends[f"flash_attn{version}"] = FlashAttnAttention(version)
            if version == "4":
                for splits in (*range(2, args.max_splits + 1), "auto"):
                    backends[f"flash_attn4_split{splits}"] = FlashAttnAttention(
                        "4", kv_splits=splits
                    )
                for tile in filter(None, args.fa4_tiles.split(",")):
                    m, n = (int(x) for x in tile.split("x"))
                    for splits in (1, "auto"):
                        backends[f"flash_attn4_{tile}_split{splits}"] = FlashAttnAttention(
                            "4", kv_splits=splits, tile=[m, n])  # fmt: skip

    rows = []
    for lk in (int(x) for x in args.lk.split(",")):
        rows.append(_row(args.lq, lk, h, d, backends, fp8, args.repeats, args.max_splits,
                         time_cuda if args.eager_timing else time_replayed))  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    # the kernel against the fp32 emulation of the same e4m3 scheme (small shape: the emulation
    # materializes the score matrix)
    q = torch.randn(1, 1024, h, d, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, 2048, h, d, device=dev, dtype=torch.bfloat16) * 3
    v = torch.randn(1, 2048, h, d, device=dev, dtype=torch.bfloat16) * 0.5
    plan = fp8._plan(q, k) if fp8._declines(q) is None else None
    o_fp8 = plan is not None and plan.out_dtype == torch.float8_e4m3fn
    parity = {"shape": [1024, 2048, h, d], "o_dtype": str(plan and plan.out_dtype),
              "kernel_vs_emulation": error(fp8(q, k, v), reference_fp8_attention(q, k, v, None, o_fp8)),
              "emulation_vs_bf16": error(reference_fp8_attention(q, k, v),
                                         backends["sdpa_cudnn"](q, k, v))}  # fmt: skip
    # captured in a CUDA graph (what graph=cuda_graph does) and replayed on new inputs
    static = [q.clone(), k.clone(), v.clone()]
    graph, captured = capture(lambda: fp8(*static))
    for t, scale in zip(static, (2.0, 0.5, 4.0), strict=True):
        t.mul_(scale)
    graph.replay()
    parity["cuda_graph_replay_vs_eager"] = error(captured, fp8(*static))
    print(json.dumps(parity), flush=True)
    # which kernel each backend's numbers are of: its calls per route (a captured call once)
    routes = {name: route_report(fn) for name, fn in backends.items()}
    for name, report in routes.items():
        if not name.startswith("sdpa"):  # the FP8 and flash-attn backends, which may fall back
            for line in route_lines(report):
                print(f"{name}: {line}", flush=True)
    result = {
        "device": torch.cuda.get_device_name(dev), "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(), "python": platform.python_version(),
        "cudnn_frontend": getattr(fp8._cudnn, "__version__", None),
        "command": " ".join(sys.argv), "rows": rows, "parity": parity,
        "attention_routes": routes,
        "timing": "events, single calls" if args.eager_timing else "CUDA-graph replays of 20 calls",
    }  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
