"""Benchmark harness: a profiled run plus the hardware floor and a diffusers peer, as JSON.

The floor of an AR step is its FLOP count (``DiT.forward_flops`` of the run's model, from its
own modules: action, camera and PRoPE branches included, at the KV length of each step)
divided by throughputs measured on the same GPU in the same process: a large GEMM for the
linear layers (bf16, or e4m3 ``_scaled_mm`` when the run's precision is FP8: then every linear
is counted at the FP8 rate, a floor below what the bf16-kept narrow layers allow) and the
configured attention backend at the step's own shape, called as the run calls it (an FP8
attention gets the KV cache's |K|/|V| bound). Every attention of the model (a cross-attention,
an action module's) is charged at that rate: the floor is optimistic for small ones.
"""

from __future__ import annotations

import json
import logging
import statistics
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from flashdreams import ConfigError
from flashdreams.attention.base import Attention, route_lines, route_report
from flashdreams.graph.cuda_graph import capture
from flashdreams.model.base import DiT, add_flops
from flashdreams.rollout.schedule import BlockSchedule

log = logging.getLogger("flashdreams.bench")


def block_flops(model: DiT, tokens_per_frame: int, block_frames: int, kv_frames: int,
                forwards: int, history_frames: int = 0) -> dict[str, float]:  # fmt: skip
    """FLOPs of one AR block's diffuse stage: ``forwards`` forwards of the block's frames over
    ``kv_frames`` key frames (the block's included), after, for a model that re-runs its
    history (``context_frames``), one ``forward_kv`` of the ``history_frames`` attending to each
    other."""
    tpf = tokens_per_frame
    parts = [model.forward_flops(block_frames * tpf, kv_frames * tpf, tpf)] * forwards
    if history_frames:
        parts.append(model.forward_kv_flops(history_frames * tpf, history_frames * tpf, tpf))
    return add_flops(*parts)


def flops_ms(flops: dict[str, float], throughput: dict) -> float:
    """Milliseconds of ``flops`` at the measured rates: GEMMs (``linear``, ``embed``) at the
    linear rate, ``attention`` at the attention backend's."""
    linear = throughput.get("linear_tflops", throughput["matmul_tflops"])
    gemm = flops["linear"] + flops.get("embed", 0.0)
    return (gemm / linear + flops["attention"] / throughput["attention_tflops"]) / 1e9


def time_cuda(fn: Callable[[], Any], repeats: int = 10, warmup: int = 3) -> float:
    """Median milliseconds of ``fn`` on the current CUDA stream."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_graph(fn: Callable[[], Any], repeats: int = 10, calls: int = 20) -> float:
    """Median milliseconds of one ``fn()`` over replays of a CUDA graph of ``calls`` back-to-back
    calls: the kernels' time without the host's launch gaps (which single short calls, e.g. a
    cross-attention over 512 keys, are otherwise dominated by)."""
    graph, _ = capture(lambda: [fn() for _ in range(calls)])
    return time_cuda(graph.replay, repeats, warmup=1) / calls


def time_replayed(fn: Callable[[], Any], repeats: int = 10, calls: int = 20) -> float:
    """``time_graph``, or ``time_cuda`` (launches included, logged) where ``fn`` cannot be
    captured."""
    try:
        return time_graph(fn, repeats, calls)
    except RuntimeError as err:
        log.warning("not capturable (%s); timed with its launches", err)
        return time_cuda(fn, repeats)


def ran_fp8_linears(stats: dict) -> bool:
    """Whether the run's block linears were e4m3 GEMMs: the precision the stats header records
    as applied (``fp8 (scaled_mm)``; a ``precision=fp8`` run on a GPU without FP8 GEMMs records
    that it kept bf16), so the floor charges the linears at the rate they ran at."""
    return str(stats.get("precision", "")).startswith("fp8")


def measure_throughput(attention, heads: int, head_dim: int, q_tokens: int, kv_tokens: int,
                       fp8_linears: bool = False):  # fmt: skip
    """TFLOP/s of an 8192^3 GEMM (bf16; also e4m3 with ``fp8_linears``) and of ``attention``
    at the given shape. ``linear_tflops`` is the rate the floor charges the linear layers."""
    from flashdreams.precision.fp8 import FP8, fp8_supported

    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    bf16 = 2 * n**3 / time_cuda(lambda: a @ a) / 1e9
    out = {"matmul_tflops": bf16, "linear_tflops": bf16}
    if fp8_linears and fp8_supported("cuda"):
        a8, scale = a.to(FP8), torch.ones(n, 1, device="cuda")

        def fp8_gemm():
            return torch._scaled_mm(a8, a8.t(), scale, scale.t().contiguous(),
                                    out_dtype=torch.bfloat16, use_fast_accum=True)  # fmt: skip

        try:
            out["fp8_matmul_tflops"] = out["linear_tflops"] = 2 * n**3 / time_cuda(fp8_gemm) / 1e9
        except RuntimeError as err:  # a build without this GEMM: the floor stays bf16
            log.warning("floor: e4m3 GEMM not timed (%s); linears at the bf16 rate", err)
    q = torch.randn(1, q_tokens, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    # distinct K and V (V = K would read half the bytes: an optimistic floor)
    k, v = (torch.randn(1, kv_tokens, heads, head_dim, device="cuda", dtype=torch.bfloat16)
            for _ in range(2))  # fmt: skip
    amax = None
    if attention.wants_kv_amax:  # as a KV cache with track_amax hands it over
        amax = tuple(t.abs().amax().float().reshape(1) for t in (k, v))
    # the kernels without host launch gaps, as a captured rollout runs them
    attn_ms = time_replayed(lambda: attention(q, k, v, None, amax), calls=10)
    return {
        **out,
        "attention_tflops": 4 * q_tokens * kv_tokens * heads * head_dim / attn_ms / 1e9,
        "attention_shape": [q_tokens, kv_tokens, heads, head_dim],
    }


def step_shapes(cfg: DictConfig, stats: dict, model: DiT) -> list[dict]:
    """Per AR step of the run: its block's latent frames, the key frames it attends to (the
    cache window and sink applied; a reconstituted context's history plus the block) and the
    history frames re-run before it."""
    r = cfg.rollout
    schedule = BlockSchedule(r.frames_per_block, r.get("first_block_frames"))
    window = cfg.cache.get("window_frames") if "window_frames" in cfg.cache else None
    sink = cfg.cache.get("sink_frames", 0) if window else 0
    rows = []
    for s in stats["steps"]:
        block = schedule.frames(s["step"])
        history = 0
        if model.context_frames:  # the history re-run before the block, then the block
            history = min(schedule.start(s["step"]), model.context_frames)
            frames = history + block
        else:
            frames = schedule.total(s["step"] + 1)  # the KV length the step's block attends to
            if window:
                frames = min(frames, window + sink)
        rows.append({"step": s["step"], "block": block, "kv_frames": frames, "history": history})
    return rows


def timed_kv_frames(shapes: list[dict]) -> int:
    """The key frames of the median timed step (steps >= 2, as the medians): the shape the
    floor's attention rate is measured at."""
    timed = [s for s in shapes if s["step"] >= 2] or shapes
    return sorted(s["kv_frames"] for s in timed)[len(timed) // 2]


def step_floor(cfg: DictConfig, stats: dict, throughput: dict, tokens_per_frame: int,
               model: DiT | None = None) -> list[dict]:  # fmt: skip
    """Per-step floor (ms) of the diffuse stage: num_steps forwards of ``model`` (the run's,
    built on the meta device when not given) at that step's KV length (two per step under
    classifier-free guidance, ``forwards_per_step`` in the stats header), plus the history
    re-run of a model with a reconstituted context."""
    from flashdreams.build import construct_model

    model = construct_model(cfg.model) if model is None else model
    num_steps = (
        len(cfg.scheduler.timesteps) if "timesteps" in cfg.scheduler else cfg.scheduler.num_steps
    ) * stats.get("forwards_per_step", 1)
    rows = []
    for s in step_shapes(cfg, stats, model):
        f = block_flops(model, tokens_per_frame, s["block"], s["kv_frames"], num_steps,
                        s["history"])  # fmt: skip
        rows.append({"step": s["step"], "kv_tokens": s["kv_frames"] * tokens_per_frame,
                     "floor_ms": flops_ms(f, throughput), "tflop": sum(f.values()) / 1e12})  # fmt: skip
    return rows


def check_peer(cfg: DictConfig, model: DiT | None = None) -> None:
    """``bench.peer=true`` times diffusers' ``WanTransformer3DModel``: only a plain Wan T2V DiT
    has that peer (one-line ``ConfigError`` otherwise, before the run). ``model``: the run's
    DiT if built already (else built on the meta device)."""
    from flashdreams.build import construct_model
    from flashdreams.model.wan import WanDiT

    if not (cfg.get("bench") or {}).get("peer", False):
        return
    model = construct_model(cfg.model) if model is None else model
    if type(model) is not WanDiT or model.image_dim is not None or model.camera_channels:
        raise ConfigError(f"bench.peer=true times diffusers' WanTransformer3DModel, a plain Wan "
                          f"text-to-video DiT; the model ({type(model).__name__}) has no such "
                          "peer: set bench.peer=false")  # fmt: skip


def diffusers_peer(cfg: DictConfig, ours_forward: Callable, latent_hw, frames: list[int], text):
    """Median ms of diffusers' WanTransformer3DModel vs our bidirectional forward per frame count."""
    from diffusers import WanTransformer3DModel

    m = cfg.model
    peer = WanTransformer3DModel(
        patch_size=tuple(m.patch_size), num_attention_heads=m.num_heads,
        attention_head_dim=m.dim // m.num_heads, in_channels=m.in_dim, out_channels=m.out_dim,
        text_dim=m.text_dim, freq_dim=m.freq_dim, ffn_dim=m.ffn_dim, num_layers=m.num_layers,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=m.eps,
    ).to("cuda", torch.bfloat16).eval()  # fmt: skip
    h, w = latent_hw
    out = {}
    t = torch.full((1,), 500.0, device="cuda")
    with torch.no_grad():
        for f in frames:
            x = torch.randn(1, m.in_dim, f, h, w, device="cuda", dtype=torch.bfloat16)
            out[f] = {
                "diffusers_ms": time_cuda(partial(peer, x, t, text, return_dict=False), 5, 2),
                "ours_ms": time_cuda(partial(ours_forward, x, t), 5, 2),
            }
    del peer
    torch.cuda.empty_cache()
    return out


def apply_memory_fraction(cfg: DictConfig) -> float | None:
    """``bench.memory_fraction``: cap this process's CUDA allocations before anything is built.

    Returns:
        The cap in bytes, or None when unset (or without CUDA, with a warning).
    """
    import os

    fraction = (cfg.get("bench") or {}).get("memory_fraction")
    if fraction is None:
        return None
    if (
        isinstance(fraction, bool)
        or not isinstance(fraction, (int, float))
        or not 0 < fraction <= 1
    ):
        raise ConfigError(f"bench.memory_fraction={fraction!r} must be a number in (0, 1]")
    if not torch.cuda.is_available():
        log.warning("bench.memory_fraction=%s is ignored: CUDA is not available", fraction)
        return None
    name = str(cfg.device)
    device = torch.device(
        name if name.startswith("cuda:") else f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
    )
    torch.cuda.set_per_process_memory_fraction(float(fraction), device)
    cap = float(fraction) * torch.cuda.get_device_properties(device).total_memory
    log.info("bench.memory_fraction=%s: allocations capped at %.2f GiB on %s", fraction,
             cap / 2**30, device)  # fmt: skip
    return cap


def run_bench(cfg: DictConfig, run_dir: Path) -> dict:
    """After a profiled run in ``run_dir``: add floor and peer numbers, write bench.json."""
    from flashdreams.build import build_model, resolve_dtype

    stats = json.loads((run_dir / "stats.json").read_text())
    plain = partial(OmegaConf.to_container, resolve=True)
    result: dict[str, Any] = {"stats": stats, "config": {"graph": cfg.graph._target_,
                              "attention": plain(cfg.attention)}}  # fmt: skip
    bench = cfg.get("bench") or {}
    result["stages_ms"] = stage_medians(stats["steps"])
    if stats.get("attention_routes") is not None:  # the run's calls per kernel / fallback route
        result["attention_routes"] = stats["attention_routes"]
    if "precision" in cfg:
        result["config"].update(precision=plain(cfg.precision), offload=cfg.get("offload"),
                                memory_fraction=bench.get("memory_fraction"))  # fmt: skip
    if torch.cuda.is_available():
        from flashdreams.build import construct_model

        m, r = cfg.model, cfg.rollout
        flops_model = construct_model(m)  # on the meta device: its shapes, no weights
        check_peer(cfg, flops_model)
        hw = (r.height // 8, r.width // 8)  # the diffusers peer: Wan 2.1 VAE geometry
        tpf = stats.get("tokens_per_frame") or (
            (hw[0] // m.patch_size[1]) * (hw[1] // m.patch_size[2])
        )  # stats from before the header had it
        attention = instantiate(cfg.attention)
        # the attention rate at the median timed step's own shape (its cache window applied)
        med_kv = timed_kv_frames(step_shapes(cfg, stats, flops_model)) * tpf
        tp = measure_throughput(attention, flops_model.num_heads, flops_model.head_dim,
                                r.frames_per_block * tpf, med_kv,
                                fp8_linears=ran_fp8_linears(stats))  # fmt: skip
        tp["attention_routes"] = route_report(attention)  # the floor's own timed calls
        floors = step_floor(cfg, stats, tp, tpf, flops_model)
        timed = [f for f in floors if f["step"] >= 2] or floors
        floor_ms = statistics.median(f["floor_ms"] for f in timed)
        measured = stats["summary"]["median_step_ms"]
        result["floor"] = {**tp, "steps": floors, "median_floor_ms": floor_ms,
                           "floor_over_measured": floor_ms / measured,
                           "floor_over_diffuse": floor_ms / result["stages_ms"]["diffuse"]}  # fmt: skip
        if bench.get("peer", False):
            dtype = resolve_dtype(cfg.dtype, torch.device("cuda"))
            model = build_model(m, torch.device("cuda"), dtype, cfg.seed)
            model.set_attention(Attention(attention))
            model = instantiate(cfg.graph).prepare(model)  # same compiled regions as the run
            text = torch.randn(1, m.text_len, m.text_dim, device="cuda", dtype=dtype)
            ctx = model.prepare_context(text)

            def ours(x, t):
                return model(x, t, ctx)

            frames = list(bench.get("peer_frames", [21, 15]))
            result["peer"] = diffusers_peer(cfg, ours, hw, frames, text)
            del model
    (run_dir / "bench.json").write_text(json.dumps(result, indent=1))
    _print(result)
    return result


def stage_medians(steps: list[dict]) -> dict[str, float]:
    """Median ms per AR block (steps >= 2) of each stage: text ``encode``, ``control`` (the
    control's encode: OmniDreams' HDMap), ``diffuse`` (the DiT's denoising steps), ``decode``,
    ``commit``, and the step latency / block period (DESIGN.md section 5)."""
    from flashdreams.stats import STAGES, WARMUP_STEPS

    timed = [s for s in steps if s["step"] >= WARMUP_STEPS] or steps
    keys = [*STAGES, "step", "period"]
    return {k: statistics.median(s.get(f"{k}_ms", 0.0) for s in timed) if timed else 0.0
            for k in keys}  # fmt: skip


def _print(result: dict) -> None:
    s = result["stats"]["summary"]
    attention = result["config"]["attention"]
    name = attention.get("backend") or str(attention.get("_target_", "?")).rsplit(".", 1)[-1]
    print(f"  graph={result['config']['graph'].rsplit('.', 1)[-1]} attention={name}")
    st, cap = result["stats"], result["config"].get("memory_fraction")
    if "precision" in st:
        print(f"  precision={st['precision']} kv_cache={st['kv_cache']} offload={st['offload']}"
              + (f" memory_fraction={cap}" if cap is not None else ""))  # fmt: skip
    print(f"  median step {s['median_step_ms']:.1f} ms | period {s['median_period_ms']:.1f} ms | "
          f"warm-up {s['warmup_s']:.1f} s | peak {s['peak_memory_bytes'] / 2**30:.2f} GiB")  # fmt: skip
    st = result.get("stages_ms")
    if st:
        print(f"  per block: control (HDMap encode) {st['control']:.1f} | DiT {st['diffuse']:.1f} | "
              f"decode {st['decode']:.1f} | commit {st['commit']:.1f} | total {st['period']:.1f}"
              f" ms (text {st['encode']:.1f})")  # fmt: skip
    if "attention_routes" in result:  # which kernel the measured numbers are of
        for line in route_lines(result["attention_routes"]):
            print(f"  {line}")
    if "floor" in result:
        f = result["floor"]
        for line in route_lines(f["attention_routes"])[1:] if "attention_routes" in f else ():
            print(f"  floor {line}")  # its WARNING: the floor's rate is the fallback's
        gemm = f.get("linear_tflops", f["matmul_tflops"])
        print(f"  floor {f['median_floor_ms']:.1f} ms (GEMM {gemm:.0f} TFLOP/s, "
              f"attention {f['attention_tflops']:.0f} TFLOP/s) -> floor/measured "
              f"{f['floor_over_measured']:.2f} (DiT alone {f['floor_over_diffuse']:.2f})")  # fmt: skip
    for frames, p in result.get("peer", {}).items():
        print(
            f"  bidirectional {frames} latent frames: ours {p['ours_ms']:.1f} ms, "
            f"diffusers {p['diffusers_ms']:.1f} ms ({p['diffusers_ms'] / p['ours_ms']:.2f}x)"
        )
