"""The FP8 input quantization of a linear, with the GELU before it, at the models' shapes: the
torch ops compiled by Inductor (as ``precision.act_quant=inductor`` runs them inside the compiled
regions; also with ``triton.multi_kernel=1``) against the one-pass kernel
(``precision.act_quant=kernel``). Prints median microseconds per call (calls replayed from a
CUDA graph, as the models run them), the bytes' floor at the H200's 4.8 TB/s, and one JSON line
per shape.

GPU:  python scripts/bench_act_quant.py [--out act_quant.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flashdreams.precision.fp8 import quantize_rowwise  # noqa: E402
from flashdreams.precision.fp8_act import quant_act_rows  # noqa: E402

# (name, rows, columns, activation): the FFN-down inputs (after the GELU) and the QKV inputs
SHAPES = [
    ("omnidreams_ffn2", 7040, 8192, "gelu"),
    ("hy_worldplay_ffn2", 3520, 14336, "gelu_tanh"),
    ("matrix_game_ffn2", 2640, 8960, "gelu_tanh"),
    ("omnidreams_qkv_in", 7040, 2048, "none"),
    ("hy_worldplay_qkv_in", 3520, 3072, "none"),
    ("matrix_game_qkv_in", 2640, 1536, "none"),
]


def _median_us(fn, x, reps: int = 30, calls: int = 20) -> float:
    """Median GPU time of one call, from ``calls`` calls captured in one CUDA graph (as the
    models run them: no launch overhead in the number)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn(x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn(x)
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / calls)
    return sorted(times)[len(times) // 2]


def _torch_ops(act: str):
    def fn(x):
        if act != "none":
            x = F.gelu(x, approximate="tanh" if act == "gelu_tanh" else "none")
        return quantize_rowwise(x)

    return fn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--sweep", default="", help="kernel configs to time as well, "
                        "rows x warps, e.g. 1x8,1x16,1x32,2x16 (fp8_act.TUNE)")  # fmt: skip
    args = parser.parse_args()
    from flashdreams.precision import fp8_act

    rows = []
    for name, m, k, act in SHAPES:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16) * 3
        row = {"shape": name, "rows": m, "cols": k, "act": act,
               "floor_us": m * k * 3 / 4.8e12 * 1e6}  # fmt: skip
        for label, opts in (
            ("inductor", {}),
            ("inductor_multi_kernel", {"triton.multi_kernel": 1}),
        ):
            torch._dynamo.reset()
            row[f"{label}_us"] = _median_us(torch.compile(_torch_ops(act), options=opts), x)
        row["kernel_us"] = _median_us(lambda t, a=act: quant_act_rows(t, a), x)
        if fp8_act.pieces(k)[1]:  # the row as one padded power-of-two tile, as before the split
            fp8_act.SPLIT_ROWS = False
            row["kernel_one_tile_us"] = _median_us(lambda t, a=act: quant_act_rows(t, a), x)
            fp8_act.SPLIT_ROWS = True
        for cfg in filter(None, args.sweep.split(",")):
            fp8_act.TUNE[k] = tuple(int(v) for v in cfg.split("x"))
            row[f"kernel_{cfg}_us"] = _median_us(lambda t, a=act: quant_act_rows(t, a), x)
            fp8_act.TUNE.pop(k)
        rows.append(row)
        print(f"{name:22s} {m}x{k} {act:9s} inductor {row['inductor_us']:7.1f} us | multi_kernel "
              f"{row['inductor_multi_kernel_us']:7.1f} | kernel {row['kernel_us']:7.1f} "
              f"(one tile {row.get('kernel_one_tile_us', row['kernel_us']):7.1f}) | floor "
              f"{row['floor_us']:6.1f}")  # fmt: skip
        print(json.dumps(row))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
