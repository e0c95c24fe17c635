"""The Triton kernels, run by Triton's CPU interpreter, against the torch math they replace.

CI has no GPU, so this is where every commit checks the kernels' logic: which rows share a
frame's modulation, the gate / shift / scale chunks and the next block's table, the chunked
two-pass kernel of wide rows (a partial last chunk, merged statistics), the (rows, heads, pairs)
tiles of q/k with a padded head axis; the split-KV log-sum-exp merge, the K/V row scatter into
the cache and the FP8 quantization passes. Speed and the exact bf16 rounding are checked on a
GPU (``tests/gpu``), compilation for sm90 by ``test_kernels_compile.py``. The interpreter rounds
to bf16 its own way, so outputs agree to 2e-2 relative L2 (one bf16 step is 3.9e-3; a swapped
modulation chunk gives ~0.6).

``TRITON_INTERPRET=1`` must be set before Triton is imported, so the kernels run in a child
process (this module run with ``python -m``); each test reads its case from that run. Skipped where
Triton is not installed (it is in the ``dev`` extra).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.gpu.helpers import rel_l2

TOL = 2e-2
NORM_CASES = [f"{kind}-{width}-{chunk}" for kind in ("norm1", "norm3", "norm2", "chain", "gated")
              for width, chunk in ((192, None), (192, 128))]  # fmt: skip
# 192 columns: whole rows in 256-lane tiles, or the chunked kernel with chunks of 128 and 64
QK_CASES = ["qk-3", "qk-4"]  # heads; 3 pads the head axis to tiles of 4
# Matrix-Game's action modules: per-head q/k norm + frame RoPE (q and k from a fused q/k/v
# projection's slices, 3 heads padded to 4; q alone), attention along frames (the mouse: one
# key per position, read from a cache buffer's window; the keyboard: one key per frame; a
# frame mask)
ACTION_CASES = ["head-qk", "head-q", "frames-mouse", "frames-keyboard", "frames-mask"]
# split-KV merge over 2 / 3 chunks; K/V row scatter into the cache (a strided V view);
# FP8 e4m3 per-tensor quantization of contiguous / strided tensors and the dequantization
OTHER_CASES = ["merge-2", "merge-3", "scatter", "fp8-contiguous", "fp8-strided", "fp8-dequant",
               "fp8-dequant-offset", "fp8-offset-contiguous", "fp8-offset-strided",
               "fp8-batch-strided", "fp8-offset-batch-strided", "act-none", "act-gelu",
               "act-gelu_tanh", "act-none-split", "act-gelu-split", "act-gelu_tanh-split"]  # fmt: skip
# (the offset cases: a per-channel mean taken off inside the amax and quantize passes)
# per-output tolerances where not TOL: the FP8 scale exactly; the interpreter casts to e4m3 by
# truncation, so quantized values agree to about one e4m3 step (a wrong scale or row: ~1)
TOLS = {f"fp8-{kind}": (1e-6, 0.15) for kind in ("contiguous", "strided", "batch-strided",
                                                 "offset-contiguous", "offset-strided",
                                                 "offset-batch-strided")}  # fmt: skip
# the per-row FP8 input quantization (with the GELU before an FFN's second linear): the row
# scales to 1e-5 (the activation's bf16 rounding in the interpreter), values to an e4m3 step
TOLS |= {f"act-{act}{split}": (1e-5, 0.15) for act in ("none", "gelu", "gelu_tanh")
         for split in ("", "-split")}  # fmt: skip


def _run_all() -> dict[str, list[float]]:
    """Every case's relative L2 error per output (run with ``TRITON_INTERPRET=1``)."""
    from flashdreams.attention import split_kv
    from flashdreams.cache import scatter
    from flashdreams.model import fused_norms as fused
    from flashdreams.model import fused_rope
    from flashdreams.model.matrix_game import fused as action_fused
    from flashdreams.precision import fp8_act, fp8_tensor

    builders = {fused: "_kernels", fused_rope: "_kernels", split_kv: "_merge_kernel",
                scatter: "_kernel", fp8_tensor: "kernels", fp8_act: "kernels",
                action_fused: "_kernels"}  # fmt: skip
    for module, builder in builders.items():  # CPU tensors go to the (interpreted) kernels
        module.cuda_kernels = lambda kernels, *tensors: kernels()
        # the interpreter looks helper kernels up in the module's globals, not in the closure
        built = getattr(module, builder)()  # one kernel, a tuple or a dict of them
        kernels = built.values() if isinstance(built, dict) else built
        for kernel in kernels if isinstance(built, (tuple, dict)) else (built,):
            cells = zip(kernel.fn.__code__.co_freevars, kernel.fn.__closure__ or (), strict=True)
            for name, cell in cells:
                setattr(module, name, cell.cell_contents)
    out = {}
    for case in NORM_CASES:
        kind, width, chunk = case.split("-")
        fused.CHUNK = {} if chunk == "None" else {int(width): int(chunk)}
        got, want = _norm_case(fused, kind, int(width))
        out[case] = [rel_l2(a, r) if a.shape == r.shape else float("inf")
                     for a, r in zip(got, want, strict=True)]  # fmt: skip
    for case in QK_CASES:
        out[case] = _qk_case(fused_rope, int(case.split("-")[1]))
    for splits in (2, 3):
        out[f"merge-{splits}"] = _merge_case(split_kv, splits)
    out["scatter"] = _scatter_case(scatter)
    out.update(_fp8_cases(fp8_tensor))
    out.update(_act_cases(fp8_act))
    out.update(_action_cases(action_fused))
    return out


def _action_cases(fused, frames: int = 3, per_frame: int = 6) -> dict[str, list[float]]:
    """The action modules' kernels against their torch math, on 2 batch rows of ``frames``
    frames of ``per_frame`` tokens, 3 heads of 16 dims."""
    from flashdreams.model.matrix_game.action import FrameRope

    bf16, heads, d = torch.bfloat16, 3, 16
    g = torch.Generator().manual_seed(7)
    length = frames * per_frame
    qkv = (torch.randn(2, length, 3, heads, d, generator=g) * 2).to(bf16)
    q, k, v = qkv.unbind(2)  # the fused projection's slices: rows 3x as far apart
    cos, sin = FrameRope(d, (4, 6, 6)).cos_sin(torch.arange(5, 5 + frames))
    out = {}
    got = fused.head_norm_rope(q, k, cos, sin, 1e-6)
    want = [fused.head_norm_rope_reference(t, cos, sin, 1e-6) for t in (q, k)]
    out["head-qk"] = [rel_l2(a, r) for a, r in zip(got, want, strict=True)]
    (got,) = fused.head_norm_rope(q, None, cos, sin, 1e-6)
    out["head-q"] = [rel_l2(got, want[0])]
    qf = q.unflatten(1, (frames, per_frame))
    window = 5  # key frames in the cache's valid range, a buffer of 7 frames
    buffer = torch.randn(2, 2, 7 * per_frame, heads, d, generator=g).to(bf16)
    kc, vc = (t[:, : window * per_frame].unflatten(1, (window, per_frame)) for t in buffer)
    kk, vk = (torch.randn(2, window, 1, heads, d, generator=g).to(bf16) for _ in range(2))
    mask = torch.rand(frames, window, generator=g) > 0.4
    mask[:, 0] = True  # every frame sees one
    for name, args in (("mouse", (qf, kc, vc)), ("keyboard", (qf, kk, vk)),
                       ("mask", (qf, kc, vc, mask))):  # fmt: skip
        got = fused.frame_attention(*args)
        want = fused.frame_attention_reference(*args).to(bf16)
        out[f"frames-{name}"] = [rel_l2(got, want) if got.shape == want.shape else float("inf")]
    return out


def _act_cases(fp8_act) -> dict[str, list[float]]:
    """``quant_act_rows`` on (rows, 200) bf16 rows (one 256-lane tile, 8 rows per program, a
    masked tail) and (rows, 140) rows (split as 128 + 8 + 4 lanes) against
    ``quantize_rowwise(gelu(x))`` in torch: relative error of the scales and of the values."""
    g = torch.Generator().manual_seed(6)
    base = (torch.randn(37, 400, generator=g) * 3).to(torch.bfloat16)
    out = {}
    for split, x in (("", base[:, 100:300]), ("-split", base[:, 50:190])):  # row strides
        assert (fp8_act.pieces(x.shape[1])[1] > 0) == (split == "-split")
        for act in ("none", "gelu", "gelu_tanh"):
            q, scale = fp8_act.quant_act_rows(x, act)  # the interpreted kernel
            q_ref, scale_ref = fp8_act._reference(x, act)
            out[f"act-{act}{split}"] = [float(((scale / scale_ref) - 1).abs().max()),
                                        rel_l2(q.float() * scale, q_ref.float() * scale_ref)]  # fmt: skip
    return out


def _merge_case(split_kv, splits: int, b: int = 2, h: int = 3, lq: int = 70, d: int = 32):
    g = torch.Generator().manual_seed(2)
    parts = torch.randn(b * splits, h, lq, d, generator=g).to(torch.bfloat16)
    lse = torch.randn(b * splits, h, lq, generator=g) * 3
    got = split_kv.merge(parts, lse, splits, torch.bfloat16)
    want = split_kv.merge_torch(parts, lse, splits).to(torch.bfloat16)
    return [rel_l2(got, want) if got.shape == want.shape else float("inf")]


def _scatter_case(scatter, b: int = 2, cap: int = 40, n: int = 21, h: int = 3, d: int = 16):
    g = torch.Generator().manual_seed(3)
    buffer = torch.randn(b, cap, h, d, generator=g).to(torch.bfloat16)
    want = buffer.clone()
    qkv = torch.randn(b, n, 3 * h * d, generator=g).to(torch.bfloat16)
    v = qkv[..., 2 * h * d :].unflatten(-1, (h, d))  # rows 3x as far apart as their width
    index = torch.randperm(cap, generator=g)[:n]
    scatter.write_rows(buffer, index, v)
    want.index_copy_(1, index, v)
    return [0.0 if torch.equal(buffer, want) else float("inf")]


def _fp8_cases(fp8_tensor) -> dict[str, list[float]]:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 50, 4, 32, generator=g) * 5
    strided = torch.randn(3, 50, 3 * 128, generator=g)[..., 128:256].unflatten(-1, (4, 32))
    # a cache's valid range over several batch rows: rows packed, the batch stride larger
    batched = (torch.randn(3, 70, 4, 32, generator=g) * 2)[:, :50]
    shifted = (torch.randn(3, 70, 4, 32, generator=g) + 2)[:, :50]  # the same, mean off 0
    out = {}
    for name, t in (("fp8-contiguous", x), ("fp8-strided", strided),
                    ("fp8-batch-strided", batched)):  # fmt: skip
        q, descale = fp8_tensor.quantize_tensor_device(t)
        q_ref, descale_ref = fp8_tensor.quantize_tensor(t)
        scale_err = abs(float(descale.reshape(())) / float(descale_ref.reshape(())) - 1)
        out[name] = [
            scale_err,
            rel_l2(q.float() * descale.reshape(()), q_ref.float() * descale_ref),
        ]
    for name, t in (("fp8-offset-contiguous", x + 7), ("fp8-offset-strided", strided - 3),
                    ("fp8-offset-batch-strided", shifted)):  # fmt: skip
        m = t.mean(dim=(0, 1), keepdim=True)  # (1, 1, H, D), as the FP8 attention's K/V means
        q, descale = fp8_tensor.quantize_tensor_device(t, offset=m)
        q_ref, descale_ref = fp8_tensor.quantize_tensor(t, offset=m)
        scale_err = abs(float(descale.reshape(())) / float(descale_ref.reshape(())) - 1)
        out[name] = [
            scale_err,
            rel_l2(q.float() * descale.reshape(()), q_ref.float() * descale_ref),
        ]
    q, descale = fp8_tensor.quantize_tensor(x)
    got = fp8_tensor.dequantize_tensor(q, descale, torch.bfloat16)
    out["fp8-dequant"] = [rel_l2(got, (q.float() * descale).to(torch.bfloat16))]
    m = torch.randn(1, 1, *x.shape[-2:], generator=torch.Generator().manual_seed(5))  # V's mean
    got = fp8_tensor.dequantize_tensor(q, descale, torch.bfloat16, offset=m)
    out["fp8-dequant-offset"] = [rel_l2(got, (q.float() * descale + m).to(torch.bfloat16))]
    return out


def _norm_case(fused, kind: str, width: int, seq: int = 24, frames: int = 3):
    from flashdreams.model.layers import gated_residual

    bf16 = torch.bfloat16
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, seq, width, generator=g) * 3 + 1
    y = torch.randn(2, seq, 2 * width, generator=g).to(bf16)[..., width:]  # a projection's view
    e0 = torch.randn(2, frames, 6, width, generator=g) * 0.3
    table, nxt = (torch.randn(1, 6, width, generator=g) * 0.1 for _ in range(2))
    w, b = torch.randn(width, generator=g) * 0.2 + 1, torch.randn(width, generator=g) * 0.2
    mod = table + e0
    if kind == "norm1":
        got = (fused.norm_modulate(x, None, None, e0, table, 0, 1, 1e-6, bf16),)
        return got, (fused._norm_reference(x, None, None, mod[:, :, 0], mod[:, :, 1], 1e-6, bf16),)
    if kind == "gated":
        return (fused.gated_add(x, y, e0, table, 5),), (gated_residual(x, y, mod[:, :, 5]),)
    gate, w, b, shift, scale, following = {
        "norm3": (2, w, b, -1, -1, None),
        "norm2": (-1, None, None, 3, 4, None),
        "chain": (5, None, None, 0, 1, nxt),  # the FFN residual + the next block's norm1
    }[kind]
    got = fused.add_norm(x, y, e0, table, gate, w, b, shift, scale, 1e-6, bf16, following)
    xo = gated_residual(x, y, mod[:, :, gate] if gate >= 0 else None)
    src = mod if following is None else following + e0
    sh, sc = (src[:, :, k] if k >= 0 else None for k in (shift, scale))
    return got, (xo, fused._norm_reference(xo, w, b, sh, sc, 1e-6, bf16))


def _qk_case(fused_rope, heads: int, frames: int = 3, seq: int = 24) -> list[float]:
    from flashdreams.model.layers import Rope3D

    width = 64 * heads
    g = torch.Generator().manual_seed(1)
    qkv = (torch.randn(2, seq, 3 * width, generator=g) * 2).to(torch.bfloat16)
    q, k = qkv[..., :width], qkv[..., width : 2 * width]  # views of the fused projection
    wq, wk = (torch.rand(width, generator=g) + 0.5 for _ in range(2))
    cos, sin = Rope3D(64).cos_sin(torch.arange(2, 2 + frames), 2, seq // frames // 2)
    got = fused_rope.qk_norm_rope(q, k, wq, wk, cos, sin, heads, 1e-6)
    want = fused_rope.qk_norm_rope_reference(q, k, wq, wk, cos, sin, heads, 1e-6)
    return [rel_l2(a, r) if a.shape == r.shape else float("inf")
            for a, r in zip(got, want, strict=True)]  # fmt: skip


@pytest.fixture(scope="module")
def interpreted() -> dict[str, list[float]]:
    pytest.importorskip("triton", minversion="3.8")  # older interpreters: no runtime loop bounds
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-m", __name__], env=env, capture_output=True,
                          text=True, timeout=600, cwd=Path(__file__).parents[2])  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", NORM_CASES + QK_CASES + OTHER_CASES + ACTION_CASES)
def test_kernel_matches_the_torch_path(interpreted, case):
    errors = interpreted[case]
    tols = TOLS.get(case, (TOL,) * len(errors))
    assert errors and all(e <= t for e, t in zip(errors, tols, strict=True)), f"{case}: {errors}"


if __name__ == "__main__":
    print(json.dumps(_run_all()))
