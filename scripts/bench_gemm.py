"""Every linear of a Wan block at the reference shape: time and TFLOP/s per layout.

At one block's tokens (default: the 1.3B reference workload, 3 frames x 1560 tokens, width 1536,
FFN 8960) it times, on one GPU in one process, each projection of a block (fused q/k/v, self-
attention out, cross-attention q and out, FFN up with its GELU, FFN down) as the model runs it
(``F.linear`` with bias; the FFN up as a GEMM with a GELU epilogue) and in other layouts cuBLAS
may serve better: the weight pre-transposed (``addmm`` on a (K, N) matrix), without the bias
epilogue and (``--inductor``) Inductor's autotuned GEMM templates. Each timing is the median
over CUDA-graph replays of 20 back-to-back calls. The point: which GEMMs fall short of the
matmul throughput the floor assumes, and whether a layout recovers it.

    python scripts/bench_gemm.py --out benchmarks/<dir>/gemm_13b.json
    python scripts/bench_gemm.py --width 5120 --ffn 13824          # the 14B blocks
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from flashdreams.bench import time_graph


def variants(x, w, b, gelu: bool, inductor: bool) -> dict:
    """name -> zero-argument call computing ``x @ w.T + b`` (then GELU(tanh) if ``gelu``)."""
    wt = w.t().contiguous()  # (K, N)
    if gelu:
        out = {
            "model (GELU epilogue)": lambda: torch._addmm_activation(b, x, w.t(), use_gelu=True),
            "linear + gelu": lambda: F.gelu(F.linear(x, w, b), approximate="tanh"),
            "weight (K, N), GELU epilogue": lambda: torch._addmm_activation(b, x, wt, use_gelu=True),
        }  # fmt: skip
    else:
        out = {
            "model (linear)": lambda: F.linear(x, w, b),
            "weight (K, N)": lambda: torch.addmm(b, x, wt),
        }
    out["no bias"] = lambda: x @ w.t()
    if inductor:

        def ref(x, w, b):
            y = F.linear(x, w, b)
            return F.gelu(y, approximate="tanh") if gelu else y

        compiled = torch.compile(ref, mode="max-autotune-no-cudagraphs", dynamic=False)
        out["inductor max-autotune"] = lambda: compiled(x, w, b)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", type=int, default=4680, help="rows (tokens of one block)")
    p.add_argument("--width", type=int, default=1536, help="model width")
    p.add_argument("--ffn", type=int, default=8960, help="FFN hidden width")
    p.add_argument("--repeats", type=int, default=10, help="timed graph replays per variant")
    p.add_argument("--inductor", action="store_true", help="also Inductor's autotuned GEMMs")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_gemm: needs a CUDA GPU")
    dev, bf16 = torch.device("cuda"), torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    m, c, f = a.tokens, a.width, a.ffn
    shapes = {  # name: (K, N, GELU epilogue); each runs once per block forward
        "qkv": (c, 3 * c, False),
        "self out": (c, c, False),
        "cross q": (c, c, False),
        "cross out": (c, c, False),
        "ffn up": (c, f, True),
        "ffn down": (f, c, False),
    }
    rows, block_us = [], 0.0
    print(f"{torch.cuda.get_device_name()}  tokens {m}  width {c}  ffn {f}  (us per call)")
    for name, (k, n, gelu) in shapes.items():
        x = torch.randn(m, k, device=dev, dtype=bf16, generator=g)
        w = torch.randn(n, k, device=dev, dtype=bf16, generator=g) * k**-0.5
        b = torch.randn(n, device=dev, dtype=bf16, generator=g) * 0.1
        flops = 2 * m * k * n
        for label, fn in variants(x, w, b, gelu, a.inductor).items():
            us = time_graph(fn, a.repeats, calls=20) * 1000
            rows.append({"gemm": name, "variant": label, "m": m, "k": k, "n": n, "us": us,
                         "tflops": flops / us / 1e6})  # fmt: skip
            print(
                f"  {name:<10} {label:<30} {m}x{k}x{n}  {us:8.1f}  {flops / us / 1e6:6.0f} TFLOP/s"
            )
            if label.startswith("model"):
                block_us += us
    total = 2 * m * sum(k * n for k, n, _ in shapes.values())
    print(f"  block as the model runs it: {block_us:.1f} us, {total / block_us / 1e6:.0f} TFLOP/s")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "python": platform.python_version(), "argv": sys.argv, "rows": rows,
              "block_us": block_us, "block_tflops": total / block_us / 1e6}  # fmt: skip
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
