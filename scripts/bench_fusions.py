"""The fused norm / residual / q-k RoPE kernels against Inductor's code for the same math.

At a Wan block's shape (default: the 1.3B reference workload, 3 frames of 1560 tokens, width
1536, 12 heads) it times, on one GPU in one process, each op of ``flashdreams.model.fused_norms`` and ``fused_rope``
two ways: the Triton kernel (each rows-per-tile x warps [x tiles-per-program] of ``--configs``)
and the unfused reference math compiled by ``torch.compile`` (what a compiled block ran before;
the modulation ``table + e0`` is computed outside the timed reference, inside the timed kernel).
Each timing is the median over CUDA-graph replays of 20 back-to-back calls, so launch gaps do
not count. Prints microseconds per call, the bytes each call must move and the bandwidth that
makes, the same for a pointwise op moving the same bytes (the ceiling a one-pass kernel can
reach on this GPU), and the largest error of the kernel against the eager reference.

    python scripts/bench_fusions.py --out benchmarks/<dir>/fusions.json
    python scripts/bench_fusions.py --width 5120 --heads 40   # the 14B blocks
    python scripts/bench_fusions.py --action --configs auto,2x4,4x4,8x4,4x8  # Matrix-Game's
        action kernels (``flashdreams.model.matrix_game.fused``) at the released shape: 3 frames
        of 880 tokens, 16 heads of 64 dims, a 6-frame window; the reference is the math the
        compiled modules ran before (products, softmax and sums along frames as Inductor fuses
        them)
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

from flashdreams.bench import time_graph
from flashdreams.model import fused_norms as fused
from flashdreams.model import fused_rope
from flashdreams.model.layers import Rope3D, gated_residual
from flashdreams.model.matrix_game import fused as action_fused


def graph_time(fn, repeats: int) -> float:
    """Median microseconds of one ``fn()`` over replays of a graph of 20 calls."""
    return time_graph(fn, repeats, calls=20) * 1000


def max_err(out, ref) -> float:
    outs = out if isinstance(out, tuple) else (out,)
    refs = ref if isinstance(ref, tuple) else (ref,)
    return max(float((o.float() - r.float()).abs().max()) for o, r in zip(outs, refs, strict=True))


def cases(seq: int, frames: int, width: int, heads: int):
    """(name, kernel call, reference call, ceiling call, inputs, bytes moved) at one block
    shape; the ceiling is a pointwise op over the same inputs and outputs (no reduction, no
    broadcast), compiled: what moving those bytes costs on this GPU."""
    dev, bf16 = torch.device("cuda"), torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape, dtype=torch.float32, scale=1.0):
        return torch.randn(*shape, device=dev, generator=g, dtype=dtype) * scale

    x = rnd(1, seq, width)
    y = rnd(1, seq, width, dtype=bf16)
    e0 = rnd(1, frames, 6, width, scale=0.1)  # the per-frame time embedding
    table = rnd(1, 6, width, scale=0.1)  # the block's modulation parameter
    w, b = rnd(width, scale=0.1) + 1, rnd(width, scale=0.1)
    qkv = rnd(1, seq, 3 * width, dtype=bf16)
    q, k = qkv[..., :width], qkv[..., width : 2 * width]
    wq, wk = rnd(width, scale=0.1) + 1, rnd(width, scale=0.1) + 1
    grid = seq // frames
    side = int(grid**0.5)
    while grid % side:
        side -= 1
    cos, sin = Rope3D(width // heads).cos_sin(torch.arange(frames, device=dev), side, grid // side)
    row32, row16 = seq * width * 4, seq * width * 2

    def mod(k):  # what the unfused block computes: (modulation + e0) chunk k
        return (table + e0)[:, :, k]

    def ref_norm(x):
        return fused._norm_reference(x, None, None, mod(0), mod(1), 1e-6, bf16)

    def ref_add_affine(x, y):
        xo = gated_residual(x, y, mod(2))
        return xo, fused._norm_reference(xo, w, b, None, None, 1e-6, bf16)

    def ref_add_mod(x, y):
        xo = gated_residual(x, y, None)
        return xo, fused._norm_reference(xo, None, None, mod(3), mod(4), 1e-6, bf16)

    def ref_gated(x, y):
        return gated_residual(x, y, mod(5))

    following = rnd(1, 6, width, scale=0.1)  # the next block's modulation parameter

    def ref_next(x, y):  # the FFN's gated residual, then the next block's norm1
        xo = gated_residual(x, y, mod(5))
        nxt = (following + e0)[:, :, :2]
        return xo, fused._norm_reference(xo, None, None, nxt[:, :, 0], nxt[:, :, 1], 1e-6, bf16)

    def ref_qk(q, k):
        return fused_rope.qk_norm_rope_reference(q, k, wq, wk, cos, sin, heads, 1e-6)

    # the bandwidth ceilings: pointwise ops reading and writing the same tensors, no reduction
    def copy_norm(x):
        return (x * 2).to(bf16)

    def copy_add(x, y):
        s = x + y.float()
        return s, (s * 2).to(bf16)

    def copy_gated(x, y):
        return x + y.float()

    def copy_qk(q, k):
        return q * 2, k * 2

    return [
        ("norm_modulate (norm1)",
         lambda: fused.norm_modulate(x, None, None, e0, table, 0, 1, 1e-6, bf16),
         ref_norm, copy_norm, (x,), row32 + row16, fused.TUNE, "norm"),
        ("add_norm gate+affine (norm3)",
         lambda: fused.add_norm(x, y, e0, table, 2, w, b, -1, -1, 1e-6, bf16),
         ref_add_affine, copy_add, (x, y), 2 * row32 + 2 * row16, fused.TUNE, "norm"),
        ("add_norm +modulate (norm2)",
         lambda: fused.add_norm(x, y, e0, table, -1, None, None, 3, 4, 1e-6, bf16),
         ref_add_mod, copy_add, (x, y), 2 * row32 + 2 * row16, fused.TUNE, "norm"),
        ("gated_add (FFN out)", lambda: fused.gated_add(x, y, e0, table, 5), ref_gated,
         copy_gated, (x, y), 2 * row32 + row16, fused.TUNE, "norm"),
        ("add_norm gate+next norm1 (chain)",
         lambda: fused.add_norm(x, y, e0, table, 5, None, None, 0, 1, 1e-6, bf16, following),
         ref_next, copy_add, (x, y), 2 * row32 + 2 * row16, fused.TUNE, "norm"),
        ("qk_norm_rope", lambda: fused_rope.qk_norm_rope(q, k, wq, wk, cos, sin, heads, 1e-6),
         ref_qk, copy_qk, (q, k), 4 * row16, fused_rope.TUNE, "qk"),
    ]  # fmt: skip


def action_cases(frames: int = 3, per_frame: int = 880, heads: int = 16, head_dim: int = 64,
                 window: int = 6):  # fmt: skip
    """``cases`` for Matrix-Game's action kernels: the mouse q/k norm + RoPE (from the fused
    projection's slices) and the keyboard q's; the mouse attention over a cache window (one
    key per position) and the keyboard's (one key per frame). References: the unfused math
    as the compiled modules ran it (Inductor)."""
    from flashdreams.model.matrix_game.action import FrameRope

    dev, bf16 = torch.device("cuda"), torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    length, width = frames * per_frame, heads * head_dim
    qkv = torch.randn(1, length, 3, heads, head_dim, device=dev, generator=g).to(bf16)
    q, k, _ = qkv.unbind(2)
    cos, sin = FrameRope(head_dim).cos_sin(torch.arange(frames, device=dev))
    buffer = torch.randn(2, 1, (window + 3) * per_frame, heads, head_dim, device=dev,
                         generator=g).to(bf16)  # fmt: skip
    kc, vc = (t[:, : window * per_frame].unflatten(1, (window, per_frame)) for t in buffer)
    kk, vk = (torch.randn(1, window, 1, heads, head_dim, device=dev, generator=g).to(bf16)
              for _ in range(2))  # fmt: skip
    qf = q.contiguous().unflatten(1, (frames, per_frame))
    row16 = length * width * 2

    def ref_head_qk(q, k):
        return tuple(action_fused.head_norm_rope_reference(t, cos, sin, 1e-6) for t in (q, k))

    def ref_head_q(q):
        return action_fused.head_norm_rope_reference(q, cos, sin, 1e-6)

    def copy_two(q, k):
        return q * 2, k * 2

    def copy_one(q):
        return q * 2

    def copy_frames(q, k, v):  # reads q, k and v once and writes q's size
        return q * 2, k * v

    def copy_keyboard(q, k, v):  # the keys are a few rows: q read, the output written
        return q * 2

    tune = action_fused.TUNE
    # the modules' unfused math: compiled, the products, softmax and sums Inductor fuses
    ref_frames = action_fused.frame_attention_unfused
    return [
        ("action head_norm_rope q+k",
         lambda: tuple(action_fused.head_norm_rope(q, k, cos, sin, 1e-6)), ref_head_qk,
         copy_two, (q, k), 4 * row16, tune, "head"),
        ("action head_norm_rope q",
         lambda: action_fused.head_norm_rope(q, None, cos, sin, 1e-6)[0], ref_head_q,
         copy_one, (q,), 2 * row16, tune, "head"),
        ("action frame_attention mouse", lambda: action_fused.frame_attention(qf, kc, vc),
         ref_frames, copy_frames, (qf, kc, vc), 2 * row16 + 2 * window * per_frame * width * 2,
         tune, "frames"),
        ("action frame_attention keyboard", lambda: action_fused.frame_attention(qf, kk, vk),
         ref_frames, copy_keyboard, (qf, kk, vk), 2 * row16, tune, "frames"),
    ]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=4680)
    ap.add_argument("--frames", type=int, default=3)
    ap.add_argument("--width", type=int, default=1536)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--configs", default="auto,1x4,1x8,2x4,2x8,4x8,4x16",
                    help="rows per tile x warps [x tiles per program] [c<columns per chunk>: "
                         "the chunked kernel, c0: whole rows] to sweep (auto: the built-in "
                         "choice)")  # fmt: skip
    ap.add_argument("--action", action="store_true",
                    help="Matrix-Game's action kernels instead of the Wan block's")  # fmt: skip
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_fusions: needs a CUDA GPU")
    rows = []
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    with torch.no_grad():
        todo = action_cases() if args.action else cases(args.seq, args.frames, args.width,
                                                          args.heads)  # fmt: skip
        for name, call, ref, copy, inputs, nbytes, tune, kind in todo:
            compiled = torch.compile(ref, fullgraph=True)
            row = {"op": name, "bytes": nbytes}
            row["inductor_us"] = graph_time(lambda c=compiled, i=inputs: c(*i), args.repeats)
            ceiling = torch.compile(copy, fullgraph=True)
            row["ceiling_us"] = graph_time(lambda c=ceiling, i=inputs: c(*i), args.repeats)
            expect = ref(*inputs)
            best = None
            for cfg in configs:
                shape, _, chunk = cfg.partition("c")  # "c<N>": the chunked kernel, N columns
                fused.CHUNK = {args.width: int(chunk)} if chunk and kind == "norm" else {}
                if shape in ("auto", ""):
                    tune[kind] = None
                else:  # rows x warps [x tiles per program]
                    sizes = (*map(int, shape.split("x")), 1)
                    tune[kind] = sizes[:3] if kind == "norm" else sizes[:2]
                try:
                    us = graph_time(call, args.repeats)
                    err = max_err(call(), expect)
                except Exception as e:  # noqa: BLE001 - a config the compiler rejects
                    row[cfg] = {"error": str(e).splitlines()[0][:200]}
                    continue
                row[cfg] = {"us": us, "tb_s": nbytes / us / 1e6, "max_err": err}
                best = us if best is None else min(best, us)
            tune[kind], fused.CHUNK = None, {}
            row["kernel_best_us"] = best
            rows.append(row)
            auto = row.get("auto", {})
            print(f"{name:32s} inductor {row['inductor_us']:7.1f} us "
                  f"({nbytes / row['inductor_us'] / 1e6:5.2f} TB/s)  kernel auto "
                  f"{auto.get('us', float('nan')):7.1f} us ({auto.get('tb_s', float('nan')):5.2f}"
                  f" TB/s, err {auto.get('max_err', float('nan')):.2e})  best {best}  ceiling "
                  f"{row['ceiling_us']:.1f} us ({nbytes / row['ceiling_us'] / 1e6:.2f} TB/s)",
                  flush=True)  # fmt: skip
            for cfg in configs:
                print(f"    {cfg:6s} {row[cfg]}", flush=True)
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "shape": "matrix-game action (3 x 880 tokens, 16 x 64, window 6)"
        if args.action
        else {"seq": args.seq, "frames": args.frames, "width": args.width, "heads": args.heads},
        "rows": rows,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
