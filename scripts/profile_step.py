"""Profile one steady AR step of any recipe on CUDA and print where the GPU time goes.

The run is built as ``flashdreams-run`` builds it (``Session``: image, HDMap or action inputs
of the recipe are loaded; graphs pre-captured), stepped ``--warm`` times, then one step is
profiled. Prints the top kernels and the GPU time summed per kernel class (``CLASSES``:
attention, convolution, GEMM, fused Triton / norms, copies, elementwise, other), with each
class's share of the step.

Usage (GPU machine):
    python scripts/profile_step.py recipe=self_forcing_wan21_t2v_1_3b_taehv graph=eager \
        attention=sdpa_cudnn model.checkpoint=null text_encoder=random
    python scripts/profile_step.py --json out.json recipe=matrix_game2_universal image=first.png \
        model.checkpoint=null vae.checkpoint=null conditioner.encoder.checkpoint=null \
        image_encoder.checkpoint=null image_encoder.processor=null vae=taehv
CPU smoke (no CUDA kernels, the classes stay empty): add device=cpu
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

# first match wins; names as CUDA / cuDNN / cuBLAS / Triton report their kernels
CLASSES = [
    ("attention", r"flash|fmha|attn|attention|sdpa"),
    ("convolution", r"fprop_implicit|conv|winograd|nchwtonhwc|nhwctonchw"),
    ("gemm", r"gemm|cutlass|xmma|nvjet|cublas|matmul|_mm_|splitk"),
    # Inductor's fused kernels (their names list the fused ops, "_to_copy" among them) and ours
    ("fused (Triton) / norms", r"^triton_|norm|rms|_rows$|qk_rows|reduce|softmax"),
    ("copy", r"copy|memcpy|memset|\bcat\b|cat_|fill|index|scatter|gather"),
    ("elementwise", r"elementwise|vectorized|unrolled|pointwise"),
]


def kernel_class(name: str) -> str:
    lowered = name.lower()
    for label, pattern in CLASSES:
        if re.search(pattern, lowered):
            return label
    return "other"


def device_time_us(event) -> float:
    """GPU time of one profiler row (the attribute's name moved between torch versions)."""
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(event, attr):
            return float(getattr(event, attr))
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warm", type=int, default=4, help="steps before the profiled one")
    parser.add_argument("--rows", type=int, default=30, help="kernels in the table")
    parser.add_argument("--json", default=None, help="also write the per-class sums here")
    parser.add_argument("overrides", nargs="*", help="flashdreams-run overrides")
    args = parser.parse_args()

    from flashdreams.session import Session

    session = Session.from_overrides(list(args.overrides), total_blocks=args.warm + 1)
    for _ in range(args.warm):
        session.step()
    cuda = torch.cuda.is_available() and session.rollout.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        session.step()
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(events.table(sort_by=sort, row_limit=args.rows, max_name_column_width=90))
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for e in events:
        if e.device_type == torch.autograd.DeviceType.CUDA:  # kernels, not their CPU launchers
            label = kernel_class(e.key)
            sums[label] += device_time_us(e)
            counts[label] += e.count
    total = sum(sums.values())
    print(f"GPU kernel time of the step: {total / 1e3:.1f} ms")
    for label, us in sorted(sums.items(), key=lambda kv: -kv[1]):
        print(f"  {label:24s} {us / 1e3:8.1f} ms  {100 * us / max(total, 1e-9):5.1f} %"
              f"  ({counts[label]} kernels)")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"overrides": args.overrides, "total_ms": total / 1e3,
                       "classes_ms": {k: v / 1e3 for k, v in sums.items()},
                       "kernels": counts,
                       "top": [{"name": e.key, "ms": device_time_us(e) / 1e3, "count": e.count}
                               for e in sorted(events, key=device_time_us, reverse=True)[:60]
                               if e.device_type == torch.autograd.DeviceType.CUDA]},
                      f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
