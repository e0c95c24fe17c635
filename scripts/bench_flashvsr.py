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
(the diffuse stage minus the projector) and decode (TCDecoder + colour correction); on CUDA
also the DiT floor of a steady chunk (``chunk_floor``) and floor / DiT. A time
budget (``--budget-s``) skips the (scene, mode) pairs left when it is used up (listed as
skipped), so the run fits its slot whatever the compile times. ``--pipeline-decode both`` runs
every (scene, mode) with ``rollout.pipeline_decode`` off and on (the TCDecoder of chunk n beside
chunk n + 1's DiT, frames one chunk late); ``on`` only the pipelined one.

Steps run without a device sync (the pipelined decode overlaps only so); CUDA-event stage times
are resolved once the scene's chunks are done, and ``wall_fps`` is the output frames handed out
by chunks >= 2 over the host's wall time from the end of chunk 1 to the device done after the last.

``--chained``: the issue's chained stream instead, Self-Forcing Wan2.1-T2V-1.3B at 480x832
(``self_forcing_wan21_t2v_1_3b_taehv``, random weights) for ``--steps`` AR steps, each step's
frames upscaled as they come by ``postprocess=flashvsr_v1_1_tiny`` at 2x (dense attention;
``--size-multiple 16`` keeps 960x1664, the release's 128 crops it to 896x1664). Reported: the
sustained FPS (upscaled frames handed out by source steps >= 2 over their wall time, the
device synchronised at both ends), the generator's step and period and the VSR chunk's stages.

``--official PATH``: after ours, in the same process, the official runner (a copy of
OpenImagingLab/FlashVSR at PATH: ``diffsynth/`` and ``examples/WanVSR/utils/``) built as its
``infer_flashvsr_tiny.py`` builds it, with random weights at the same config (no downloads: their
classes, random init; the prompt tensor a random one of the same shape), run on the same scenes and
chunk count: a warm-up call, then one timed ``pipe(...)`` call per scene. Its DiT loop streams chunk by
chunk and decodes all latents at the end, so per chunk = the median over chunks >= 2 of the stream
period (projector + DiT, CUDA events around their own functions) plus the end-of-call decode and colour
fix amortised over the output frames (8 per chunk). Their attention is always block-sparse
(mit-han-lab ``block_sparse_attn``, .vendor/bsa/build.py; ``--official-sparse-ratio``, local_range 11,
kv_ratio 3 as their script). Every substitution is listed in the JSON (``official.substitutions``).
With ``--tiny`` only, ``block_sparse_attn`` is replaced by a labelled CPU stand-in (masked SDPA).

GPU:  python scripts/bench_flashvsr.py --out benchmarks/<date>_flashvsr/flashvsr.json
      python scripts/bench_flashvsr.py --chained --out benchmarks/<date>_flashvsr/chained.json
      PYTHONPATH=<bsa build>:$PWD python scripts/bench_flashvsr.py --official .vendor/flashvsr
CPU smoke (tiny sizes): python scripts/bench_flashvsr.py --tiny [--chained] [--official PATH]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
import types
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
PIPELINE = {"off": (False,), "on": (True,), "both": (False, True)}
# the chained stream: Self-Forcing at 480x832 (random weights), upscaled 2x by the VSR
CHAINED = ["recipe=self_forcing_wan21_t2v_1_3b_taehv", "postprocess=flashvsr_v1_1_tiny",
           "model.checkpoint=null", "text_encoder=random", "vae.checkpoint=null"]  # fmt: skip
CHAINED_VSR = ["model.checkpoint=null", "vae.decoder.checkpoint=null", "control.checkpoint=null",
               "text_encoder=random", "vsr.scale=2"]  # fmt: skip
TINY_GEN = ["rollout.height=32", "rollout.width=48", "model.dim=64", "model.num_heads=2",
            "model.num_layers=2", "model.ffn_dim=128", "model.text_dim=16",
            "vae.channels=[8,8,8,8]", "device=cpu", "dtype=float32", "graph=eager",
            "vae.compile=false"]  # fmt: skip


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def overrides(args, height: int, width: int, scale: int) -> list[str]:
    base = ["recipe=flashvsr_v1_1_tiny", "model.checkpoint=null", "vae.decoder.checkpoint=null",
            "control.checkpoint=null", "text_encoder=random", "control.stream=true",
            f"control.stream_size=[{height // scale},{width // scale}]", f"vsr.scale={scale}",
            "vsr.resize=torch", f"rollout.height={height}", f"rollout.width={width}",
            "rollout.total_blocks=null", "attention=flex", f"seed={args.seed}"]  # fmt: skip
    if not args.tiny:
        base += [f"graph={args.graph}", f"vae.decoder.compile={str(args.graph != 'eager').lower()}"]
    return base + (TINY if args.tiny else [])


def chunk_floor(model, cfg, block_frames: int) -> dict:
    """The DiT floor of a steady chunk: one forward of its latent frames over the KV window
    (``cache.window_frames``), the model's own FLOP count (``DiT.forward_flops``: with the
    sparse ratio set, the kept window blocks only) at the GEMM rate and the run's attention
    backend's dense rate, both measured here at the chunk's shape."""
    from flashdreams.bench import flops_ms, measure_throughput

    _, ph, pw = model.patch_size
    tpf = (cfg.rollout.height // 8 // ph) * (cfg.rollout.width // 8 // pw)
    kv = cfg.cache.window_frames + cfg.cache.get("sink_frames", 0)
    flops = model.forward_flops(block_frames * tpf, kv * tpf, tpf)
    rate = measure_throughput(model.attention.backend, model.num_heads, model.head_dim,
                              block_frames * tpf, kv * tpf)  # fmt: skip
    return {"dit_floor_ms": round(flops_ms(flops, rate), 2),
            "attention_tflops": round(rate["attention_tflops"], 1)}  # fmt: skip


def run_scene(shared, cfg, chunks: int, sparse: float | None) -> dict:
    from flashdreams.build import assemble_rollout

    shared.model._step.sparse_ratio = sparse  # the same weights, dense or sparse attention
    rollout = assemble_rollout(cfg, shared)
    pipelined = rollout.pipeline_decode
    control, dev = rollout.control, rollout.device
    h0, w0 = control.stream_size
    rollout.start([cfg.prompt])
    g = torch.Generator(dev).manual_seed(0)
    latents = rollout.run_frames(chunks)  # the schedule's: 6, then 2 per chunk
    lr = torch.randint(0, 256, (1, 4 * latents + 1, h0, w0, 3), generator=g, device=dev,
                       dtype=torch.uint8)  # fmt: skip
    control.push_frames(lr[0])
    timers, wall_start, wall_frames = [], None, 0
    for i in range(chunks):
        out = rollout.step()  # no sync: a pipelined decode overlaps the next chunk's DiT
        out.timer.add_parts(control.take_parts(), control.parts_inside())  # projector_ms, dit_ms
        timers.append(out.timer)
        if i == 1:
            sync(dev)
            wall_start = time.perf_counter()
        elif i > 1:
            wall_frames += out.timer.num_frames
    sync(dev)
    wall_s = time.perf_counter() - wall_start if wall_start is not None else None
    rows = [t.resolve() for t in timers]
    for row in rows:
        row["dit_ms"] = row["diffuse_ms"] - row["projector_ms"]
    steady = rows[2:] if len(rows) > 2 else rows

    def med(key: str) -> float:
        return round(statistics.median(r[key] for r in steady), 2)

    period = med("period_ms")
    frames = 4 * rollout.frames_per_block
    floor = {}
    if dev.type == "cuda":
        try:  # the measured chunk stands whatever the floor's micro-benchmarks do
            floor = chunk_floor(shared.model, cfg, rollout.frames_per_block)
            floor["floor_over_dit"] = round(floor["dit_floor_ms"] / med("dit_ms"), 3)
        except Exception as err:  # noqa: BLE001
            floor = {"floor": f"failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}"}
    return {**floor, "ms_per_chunk": period, "fps": round(frames * 1e3 / period, 2),
            "projector_ms": med("projector_ms"), "dit_ms": med("dit_ms"),
            "decode_ms": med("decode_ms"), "chunks": len(rows), "pipeline_decode": pipelined,
            "wall_fps": round(wall_frames / wall_s, 2) if wall_s else None,
            "peak_gib": round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
            if dev.type == "cuda" else None}  # fmt: skip


# --- the official runner (--official PATH) ---------------------------------------------------------
OFFICIAL_COMMIT = "OpenImagingLab/FlashVSR ccac0ac (2025-10-18, v1 tiny pipeline)"
OFFICIAL_PIPELINE = "diffsynth/pipelines/flashvsr_tiny.py"


def _bsa_standin() -> types.ModuleType:
    """``block_sparse_attn`` for the ``--tiny`` CPU smoke only: the block mask as masked SDPA."""
    import torch.nn.functional as F

    def block_sparse_attn_func(q, k, v, cu_q, cu_k, head_mask_type, streaming_info, base_blockmask,
                               max_q, max_k, p_dropout, deterministic=False, softmax_scale=None,
                               is_causal=False, exact_streaming=False, return_attn_probs=False):  # fmt: skip
        mask = base_blockmask[0].repeat_interleave(128, 1).repeat_interleave(128, 2)
        mask = mask[:, : q.shape[0], : k.shape[0]]
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1),
                                             v.transpose(0, 1), attn_mask=mask)  # fmt: skip
        return out.transpose(0, 1)

    mod = types.ModuleType("block_sparse_attn")
    mod.block_sparse_attn_func = block_sparse_attn_func
    mod.__file__ = "<CPU stand-in: masked SDPA (--tiny smoke only, never timed on a GPU)>"
    return mod


def _load_official(root: Path, tiny: bool) -> tuple[dict, list[str]]:
    """Their modules, imported without running ``diffsynth/__init__`` (it imports every model)."""
    subs = []
    if tiny:
        sys.modules["block_sparse_attn"] = _bsa_standin()
        subs.append("block_sparse_attn: CPU stand-in (masked SDPA), --tiny smoke only")
    try:
        import torchvision.transforms  # noqa: F401  (their base.py imports GaussianBlur, unused here)
    except ImportError:
        tv, tvt = types.ModuleType("torchvision"), types.ModuleType("torchvision.transforms")
        tvt.GaussianBlur = None
        tv.transforms = tvt
        sys.modules.update({"torchvision": tv, "torchvision.transforms": tvt})
        subs.append("torchvision absent: GaussianBlur (imported by their base.py, unused) = None")
    for name in ("diffsynth", "diffsynth.models", "diffsynth.pipelines", "diffsynth.schedulers"):
        mod = types.ModuleType(name)
        mod.__path__ = [str(root.joinpath(*name.split(".")))]
        sys.modules[name] = mod
    sys.modules["diffsynth.models"].ModelManager = None  # no weights: their classes built directly
    subs.append(
        "diffsynth package __init__s not run (they import every model); ModelManager unused"
    )
    mods = {}
    for name, rel in (("flashvsr_official_utils", "examples/WanVSR/utils/utils.py"),
                      ("flashvsr_official_tcdecoder", "examples/WanVSR/utils/TCDecoder.py")):  # fmt: skip
        spec = importlib.util.spec_from_file_location(name, root / rel)
        mods[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mods[name])
    import diffsynth.models.wan_video_dit as dit_mod
    import diffsynth.pipelines.flashvsr_tiny as pipe_mod

    mods.update(dit=dit_mod, pipe=pipe_mod)
    return mods, subs


def _build_official(mods: dict, cfg, device, dtype, subs: list[str]):
    """Their init_pipeline() with random weights at our config's sizes."""
    import torch

    m, c = cfg.model, cfg.control
    with torch.device(device):
        dit = mods["dit"].WanModel(dim=m.dim, in_dim=m.in_dim, ffn_dim=m.ffn_dim, out_dim=m.out_dim,
                                   text_dim=m.text_dim, freq_dim=m.freq_dim, eps=m.eps,
                                   patch_size=tuple(m.patch_size), num_heads=m.num_heads,
                                   num_layers=m.num_layers, has_image_input=False)  # fmt: skip
    dit.freqs = tuple(f.cpu() for f in dit.freqs)  # as their constructor leaves them
    dit = dit.to(dtype=dtype)
    pipe = mods["pipe"].FlashVSRTinyPipeline(device=str(device), torch_dtype=dtype)
    pipe.dit, pipe.vae = dit, None
    proj_cls = mods["flashvsr_official_utils"].Buffer_LQ4x_Proj
    if (c.hidden_dim1, c.hidden_dim2) == (2048, 3072):
        proj = proj_cls(in_dim=3, out_dim=m.dim, layer_num=m.lr_layers)
    else:  # --tiny: their class hard-codes 2048 / 3072; the same layers, narrower
        u = mods["flashvsr_official_utils"]
        with torch.device("meta"):
            proj = proj_cls(in_dim=3, out_dim=m.dim, layer_num=m.lr_layers)
        proj.hidden_dim1, proj.hidden_dim2 = c.hidden_dim1, c.hidden_dim2
        proj.conv1 = u.CausalConv3d(3 * 256, c.hidden_dim1, (4, 3, 3), stride=(2, 1, 1), padding=1)
        proj.norm1 = u.RMS_norm(c.hidden_dim1, images=False)
        proj.conv2 = u.CausalConv3d(c.hidden_dim1, c.hidden_dim2, (4, 3, 3), stride=(2, 1, 1),
                                    padding=1)  # fmt: skip
        proj.norm2 = u.RMS_norm(c.hidden_dim2, images=False)
        proj.linear_layers = torch.nn.ModuleList(
            [torch.nn.Linear(c.hidden_dim2, m.dim) for _ in range(m.lr_layers)])  # fmt: skip
        subs.append(f"--tiny: their LR projector at hidden {c.hidden_dim1}/{c.hidden_dim2}")
    pipe.dit.LQ_proj_in = proj.to(device, dtype=dtype)
    channels = list(cfg.vae.decoder.channels)
    pipe.TCDecoder = mods["flashvsr_official_tcdecoder"].build_tcdecoder(
        new_channels=channels, device=device, dtype=dtype, new_latent_channels=16 + 768
    )
    pipe.to(device)
    pipe.enable_vram_management(num_persistent_param_in_dit=None)  # as their script (all on GPU)
    g = torch.Generator("cpu").manual_seed(0)
    ctx = torch.randn(1, m.text_len, m.text_dim, generator=g)
    subs.append(f"prompt tensor posi_prompt.pth: random {list(ctx.shape)} (not in the snapshot)")
    pipe.init_cross_kv(context_tensor=ctx)
    pipe.load_models_to_device(["dit", "vae"])
    return pipe


def _run_official_scene(mods, pipe, height, width, scale, chunks, ratio, seed, device, dtype):
    import torch
    import torch.nn.functional as F

    cuda = device.type == "cuda"
    frames = 8 * (chunks + 2) + 1  # their pipe: (num_frames - 1) // 8 - 2 chunks
    g = torch.Generator(device).manual_seed(seed)
    lr = torch.randint(0, 256, (frames, 3, height // scale, width // scale), generator=g,
                       device=device, dtype=torch.uint8)  # fmt: skip
    lq = F.interpolate(lr.float() / 127.5 - 1, size=(height, width), mode="bicubic")
    lq = lq.clamp(-1, 1).to(dtype).permute(1, 0, 2, 3).unsqueeze(0)  # 1 C F H W, as their script
    marks = []  # (kind, start event, end event) in call order

    def event():
        if not cuda:
            return time.perf_counter()
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def timed(kind, fn):
        def wrapper(*a, **kw):
            start = event()
            out = fn(*a, **kw)
            marks.append((kind, start, event()))
            return out

        return wrapper

    def ms(a, b) -> float:
        return a.elapsed_time(b) if cuda else (b - a) * 1e3

    proj = pipe.dit.LQ_proj_in
    model_fn = mods["pipe"].model_fn_wan_video
    proj.stream_forward = timed("projector", type(proj).stream_forward.__get__(proj))
    mods["pipe"].model_fn_wan_video = timed("dit", model_fn)
    kwargs = dict(prompt="", negative_prompt="", cfg_scale=1.0, num_inference_steps=1, seed=seed,
                  height=height, width=width, is_full_block=False, if_buffer=True,
                  topk_ratio=ratio * 768 * 1280 / (height * width), kv_ratio=3.0,
                  local_range=11, color_fix=True)  # fmt: skip
    try:
        pipe(LQ_video=lq[:, :, :33], num_frames=33, **kwargs)  # warm-up: 2 chunks
        marks.clear()
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        start = event()
        video = pipe(LQ_video=lq, num_frames=frames, **kwargs)
        end = event()
        if cuda:
            torch.cuda.synchronize(device)
    finally:
        del proj.stream_forward
        mods["pipe"].model_fn_wan_video = model_fn
    starts, dit_ms, proj_ms, chunk = [], [], [], []  # per chunk: first event, DiT, projector
    for kind, a, b in marks:
        if not chunk:
            starts.append(a)
            chunk = [0.0]
        if kind == "projector":
            chunk[0] += ms(a, b)
        else:
            proj_ms.append(chunk[0])
            dit_ms.append(ms(a, b))
            last_dit_end, chunk = b, []
    periods = [ms(starts[i], starts[i + 1]) for i in range(len(starts) - 1)]
    periods.append(ms(starts[-1], last_dit_end))
    out_frames = video.shape[1]
    decode_ms = ms(last_dit_end, end)  # their TCDecoder over all latents + colour fix, at the end
    call_ms = ms(start, end)
    steady = slice(2, None) if len(periods) > 2 else slice(None)

    def med(xs) -> float:
        return statistics.median(xs[steady])

    stream = med(periods)
    per_chunk = stream + decode_ms * 8 / out_frames
    return {"ms_per_chunk": round(per_chunk, 2), "fps": round(8e3 / per_chunk, 2),
            "stream_ms": round(stream, 2), "projector_ms": round(med(proj_ms), 2),
            "dit_ms": round(med(dit_ms), 2), "decode_ms_total": round(decode_ms, 2),
            "decode_ms_per_chunk": round(decode_ms * 8 / out_frames, 2),
            "call_ms": round(call_ms, 2), "call_fps": round(out_frames * 1e3 / call_ms, 2),
            "chunks": len(periods), "output_frames": out_frames,
            "peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            if cuda else None}  # fmt: skip


def write(args, results: dict) -> None:
    """The JSON so far: a run cut short by its time box keeps what it measured."""
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


def official(args, results: dict, shared, scenes, t0: float) -> None:
    """The official runner on the scenes ours ran (``--official PATH``), into ``results``."""
    import torch

    from flashdreams.postprocess import compose_run

    mods, subs = _load_official(args.official, args.tiny)
    cfg = compose_run(overrides(args, *scenes[0]))
    device, dtype = shared.device, (torch.float32 if args.tiny else torch.bfloat16)
    start = time.perf_counter()
    pipe = _build_official(mods, cfg, device, dtype, subs)
    dit_mod = mods["dit"]
    cross = next(n for n, ok in (("flash_attn_3", dit_mod.FLASH_ATTN_3_AVAILABLE),
                                 ("flash_attn_2", dit_mod.FLASH_ATTN_2_AVAILABLE),
                                 ("sageattention", dit_mod.SAGE_ATTN_AVAILABLE), ("sdpa", True))
                 if ok)  # fmt: skip
    bsa = sys.modules["block_sparse_attn"]
    out = {"code": OFFICIAL_COMMIT, "weights": "random", "dtype": str(dtype).split(".")[-1],
           "block_sparse_attn": getattr(bsa, "__file__", None),
           "cross_attention": cross, "sparse_ratio": args.official_sparse_ratio,
           "local_range": 11, "kv_ratio": 3.0, "input": "random LR frames, bicubic upscaled on "
           "the device before the call (their script: PIL on the host, also before the call)",
           "substitutions": subs, "build_s": round(time.perf_counter() - start, 1), "scenes": []}  # fmt: skip
    results["official"] = out
    for height, width, scale in scenes:
        entry = {"scene": f"{height}x{width}", "scale": scale}
        if height % 128 or width % 128:
            entry["official"] = "n/a (their window partition needs multiples of 128)"
        elif time.perf_counter() - t0 > args.budget_s + args.official_budget_s:
            entry["official"] = "skipped (time budget)"
        else:
            try:
                entry["official"] = _run_official_scene(mods, pipe, height, width, scale,
                                                        args.chunks, args.official_sparse_ratio,
                                                        args.seed, device, dtype)  # fmt: skip
            except Exception as err:  # noqa: BLE001  (record it, measure the others)
                entry["official"] = (
                    f"failed: {type(err).__name__}: {str(err).splitlines()[0][:300]}"
                )
            torch.cuda.empty_cache() if device.type == "cuda" else None
        ours = next((e for e in results["scenes"] if e["scene"] == entry["scene"]), {})
        for mode in ("dense", "sparse"):
            if isinstance(ours.get(mode), dict) and isinstance(entry["official"], dict):
                entry[f"speedup_{mode}"] = round(
                    entry["official"]["ms_per_chunk"] / ours[mode]["ms_per_chunk"], 2
                )
        print(f"{entry['scene']:>10} x{scale} official: {entry}", flush=True)
        out["scenes"].append(entry)
        write(args, results)


def chained(args) -> dict:
    """The chained stream (``--chained``): a generator run with each step upscaled as it comes."""
    from flashdreams.build import build_rollout
    from flashdreams.postprocess import build_postprocess, compose_run

    pipe = str(args.pipeline_decode == "on").lower()
    vsr = [*CHAINED_VSR, f"vsr.size_multiple={args.size_multiple}", f"seed={args.seed}",
           f"rollout.pipeline_decode={pipe}"]  # fmt: skip
    gen = [*CHAINED, f"rollout.total_blocks={args.steps}", f"seed={args.seed}",
           f"rollout.pipeline_decode={pipe}"]  # fmt: skip
    if args.tiny:
        gen += TINY_GEN
        vsr += [o for o in TINY if not o.startswith(("device=", "dtype="))]
    else:
        gen += [f"graph={args.graph}"]
        vsr += [f"graph={args.graph}", f"vae.decoder.compile={str(args.graph != 'eager').lower()}"]
    quoted = ",".join(f'"{o}"' for o in vsr)
    t0 = time.perf_counter()
    cfg = compose_run([*gen, f"postprocess.overrides=[{quoted}]"])
    source = build_rollout(cfg)
    post = build_postprocess(cfg, source)
    dev, vsr_run = source.device, post.rollout
    build_s = time.perf_counter() - t0
    source.start([cfg.prompt])
    source.precapture()
    post.start()
    timers, wall_start, out_frames, src_frames, first = [], None, 0, 0, None
    for i in range(args.steps):
        out = source.step()
        timers.append(out.timer)
        up = post.push(out.frames)
        if wall_start is not None:
            out_frames += 0 if up is None else up.shape[1]
            src_frames += out.timer.num_frames
        elif i >= 1 and up is not None and i + 2 < args.steps:
            # the window opens once the upscaler streams (its backlog of the first chunk out)
            sync(dev)
            wall_start, first = time.perf_counter(), i + 1
        if i + 1 == args.steps:
            sync(dev)
            wall_s = time.perf_counter() - wall_start if wall_start is not None else None
            tail = post.finish()  # the padded end of the stream, outside the timed window
            sync(dev)
    gen_rows = [t.resolve() for t in timers][2:] or [t.resolve() for t in timers]
    vsr_rows = post.take_rows()
    for row in vsr_rows:
        row["dit_ms"] = row["diffuse_ms"] - row.get("projector_ms", 0.0)
    vsr_steady = vsr_rows[2:] if len(vsr_rows) > 2 else vsr_rows

    def med(rows, key: str) -> float:
        return round(statistics.median(r[key] for r in rows), 2)

    return {
        "workload": "self_forcing_wan21_t2v_1_3b_taehv -> flashvsr_v1_1_tiny x2",
        "weights": "random", "graph": "eager" if args.tiny else args.graph, "pipeline_decode": args.pipeline_decode == "on",
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__, "build_s": round(build_s, 1), "steps": args.steps,
        "source_size": f"{source.height}x{source.width}",
        "output_size": f"{vsr_run.height}x{vsr_run.width}",
        "sustained_fps": round(out_frames / wall_s, 2) if wall_s else None,
        "source_fps": round(src_frames / wall_s, 2) if wall_s else None,
        "timed_window": f"source steps {first}..{args.steps - 1}: {out_frames} upscaled "
                        f"frames in {wall_s or 0:.2f} s" if wall_s else "none (too few --steps)",
        "tail_frames": 0 if tail is None else tail.shape[1],
        "generator": {k: med(gen_rows, f"{k}_ms") for k in ("step", "period", "diffuse",
                                                             "decode", "commit")},
        "vsr_chunks": len(vsr_rows),
        "vsr_chunk": {k: med(vsr_steady, f"{k}_ms") for k in ("period", "projector", "dit",
                                                              "decode")},
        "peak_gib": round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
        if dev.type == "cuda" else None,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="JSON file to write")
    ap.add_argument("--chunks", type=int, default=8, help="chunks per (scene, mode)")
    ap.add_argument("--graph", default="compile", help="graph policy of the DiT")
    ap.add_argument("--sparse-ratio", type=float, default=2.0, help="the sparse mode's ratio")
    ap.add_argument("--budget-s", type=float, default=270.0, help="skip pairs after this")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modes", default="dense,sparse", help="attention modes to run, in order")
    ap.add_argument("--scenes", default=None,
                    help="only these output sizes, e.g. 768x1408,384x384 (default: all)")  # fmt: skip
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test at tiny sizes")
    ap.add_argument("--pipeline-decode", choices=sorted(PIPELINE), default="off",
                    help="rollout.pipeline_decode per (scene, mode): off, on or both")  # fmt: skip
    ap.add_argument("--chained", action="store_true",
                    help="the chained Self-Forcing 480x832 -> FlashVSR x2 stream instead")  # fmt: skip
    ap.add_argument("--steps", type=int, default=24, help="--chained: source AR steps")
    ap.add_argument("--size-multiple", type=int, default=16,
                    help="--chained: vsr.size_multiple (16: 960x1664; 128: 896x1664)")  # fmt: skip
    ap.add_argument("--official", type=Path, default=None,
                    help="after ours: the official runner from this FlashVSR copy")  # fmt: skip
    ap.add_argument("--official-sparse-ratio", type=float, default=2.0,
                    help="--official: their sparse_ratio (the script's 2.0; 1.5 faster)")  # fmt: skip
    ap.add_argument("--official-budget-s", type=float, default=150.0,
                    help="--official: seconds past --budget-s before skipping its scenes")  # fmt: skip
    args = ap.parse_args()
    scenes = TINY_SCENES if args.tiny else SCENES
    if args.scenes:
        known = {f"{h}x{w}": (h, w, scale) for h, w, scale in scenes}
        wanted = args.scenes.split(",")
        if unknown := sorted(set(wanted) - set(known)):
            ap.error(f"--scenes: {', '.join(unknown)} not among {', '.join(known)}")
        scenes = [known[name] for name in known if name in wanted]  # in the bench's order
    if args.official is not None and args.chained:
        ap.error("--official compares the per-scene run; leave out --chained")
    if args.official is not None and not (args.official / OFFICIAL_PIPELINE).is_file():
        ap.error(f"--official={args.official}: no {OFFICIAL_PIPELINE} there (a FlashVSR copy)")
    if args.chained:
        if args.pipeline_decode == "both":
            ap.error("--chained measures one --pipeline-decode setting per run (off or on)")
        if args.steps < 4:
            ap.error(f"--steps={args.steps} must be >= 4 (2 warm-up steps, then timed ones)")
        stream = chained(args)
        print(json.dumps(stream, indent=2))
        write(args, stream)
        return

    from flashdreams.build import build_shared
    from flashdreams.config.options import scope_options
    from flashdreams.postprocess import compose_run

    t0 = time.perf_counter()
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
        modes = [(f"{attn}{'+pipeline' if pipe else ''}", ratios[attn], pipe)
                 for attn in args.modes.split(",")
                 for pipe in PIPELINE[args.pipeline_decode]]  # fmt: skip
        for mode, ratio, pipe in modes:
            if ratio is not None and (height % 128 or width % 128):
                entry[mode] = "n/a (needs multiples of 128)"
                continue
            if time.perf_counter() - t0 > args.budget_s:
                entry[mode] = "skipped (time budget)"
                continue
            extra = [f"rollout.pipeline_decode={str(pipe).lower()}"]
            cfg = compose_run(overrides(args, height, width, scale) + extra)
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
        write(args, results)  # as it goes: a run cut short keeps its scenes
    if args.official is not None:
        official(args, results, shared, scenes, t0)
    results["total_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(results, indent=2))
    write(args, results)


if __name__ == "__main__":
    main()
