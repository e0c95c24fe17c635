"""Step caching on a many-step bidirectional recipe: time, hit rate and quality vs uncached.

Builds the recipe once (default ``wan21_t2v_1_3b_480p``: Wan 2.1 T2V 1.3B, 81 frames at
480x832, UniPC 50 steps, CFG 5 as two forwards; random weights and prompt embeddings, no VAE:
the clip's denoising alone is timed) and runs the same clip (same seed, same noise) under each
step cache in one process: uncached, DBCache F8B0 at two thresholds (``--thresholds``), the
same + TaylorSeer order 1, and a fixed 50 % reuse mask (every odd step reuses;
``mask_policy=static``). For each: the clip's wall time (median of ``--repeats``), the speed-up over uncached, the hit rate
(forwards that reused the middle blocks), and the final latents' cosine and PSNR against the
uncached run (PSNR over the uncached latents' peak-to-peak range). Random weights change much
more per step than trained ones, so thresholds hit less often than with real weights: compare
times at equal hit rates (the fixed mask is the like-for-like speed check: target <= 0.55x).

With ``--cache-dit`` (needs ``cache_dit`` importable, e.g. ``pip install --no-deps --target
.vendor/site cache-dit`` and ``PYTHONPATH=.vendor/site``) every setting also runs on diffusers'
``WanPipeline`` (same DiT weights, prompt embeddings and noise; ``output_type="latent"``) with
cache-dit's DBCache / TaylorSeer at the same settings: its time, hit rate and latents' cosine
against ours are added to the row (the same reuse pattern is the like-for-like comparison).

Wan 2.2 A14B T2V (``--recipe wan22_t2v_a14b_480p``: 40 steps, two experts, CFG 4 / 3) runs the
same rows; ``--frames N`` (latent frames, 4 N - 3 video frames) shortens the clip so random-weight
A14B rows fit in minutes (its cache-dit peer is diffusers' WanPipeline with ``transformer_2`` and
the model's boundary; the peer's DiTs share our weight tensors, so no second copy is held).

GPU:  python scripts/bench_step_cache.py --out benchmarks/<date>_step_cache/wan21_1_3b.json
      python scripts/bench_step_cache.py --graph eager --repeats 1
      python scripts/bench_step_cache.py --recipe wan22_t2v_a14b_480p --frames 5 --graph eager \
          --repeats 1 --only mask_50pct,dbcache_0.24
CPU smoke (tiny sizes): python scripts/bench_step_cache.py --tiny
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

TINY = ["model.dim=64", "model.num_heads=4", "model.num_layers=10", "model.ffn_dim=128",
        "model.text_dim=32", "model.text_len=16", "device=cpu", "dtype=float32",
        "rollout.height=32", "rollout.width=32", "rollout.frames_per_block=3",
        "scheduler.num_steps=12"]  # fmt: skip


def configs(steps: int, front: int, thresholds: list[float]) -> dict[str, dict]:
    """Name -> DBCache keyword arguments (None: uncached)."""
    base = dict(front_blocks=front, back_blocks=0, warmup_steps=min(8, steps // 4))
    out: dict[str, dict | None] = {"none": None}
    for order in (0, 1):
        for th in thresholds:
            name = f"dbcache_{th:g}" if order == 0 else f"taylorseer{order}_{th:g}"
            out[name] = {**base, "threshold": th, "taylorseer_order": order}
    out["mask_50pct"] = {**base, "threshold": 0.0, "warmup_steps": 0, "mask_policy": "static",
                         "mask": [int(i % 2 == 0) for i in range(steps)]}  # fmt: skip
    return out


def psnr(out: torch.Tensor, ref: torch.Tensor) -> float:
    peak = float(ref.max() - ref.min())
    mse = float((out.double() - ref.double()).pow(2).mean())
    return 100.0 if mse == 0 else 10 * math.log10(peak * peak / mse)


def _diffusers_dit(expert, device, dtype):
    """diffusers' ``WanTransformer3DModel`` on one of our Wan DiTs' weights (the same tensors
    where the dtype agrees, not a copy: built on the meta device and assigned our parameters;
    RoPE tables rebuilt), its ``_keep_in_fp32_modules`` in float32 as ``from_pretrained`` keeps
    them, the rest in ``dtype``."""
    from diffusers import WanTransformer3DModel as Dit

    from flashdreams.io.keymap import wan_to_diffusers

    m = expert
    with torch.device("meta"):
        dit = Dit(patch_size=m.patch_size, num_attention_heads=m.num_heads,
                  attention_head_dim=m.head_dim, in_channels=m.in_dim, out_channels=m.out_dim,
                  text_dim=m.text_dim, freq_dim=m.freq_dim, ffn_dim=m.blocks[0].ffn[0].weight.shape[0],
                  num_layers=m.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                  eps=1e-6)  # fmt: skip
    missing, _ = dit.load_state_dict(wan_to_diffusers(m.state_dict()), strict=False, assign=True)
    if missing:
        raise RuntimeError(f"diffusers' DiT lacks {len(missing)} weights, e.g. {missing[0]}")
    rope = dit.rope  # its tables are non-persistent buffers: computed, not loaded
    dit.rope = type(rope)(m.head_dim, m.patch_size, rope.max_seq_len)
    keep = set(getattr(dit, "_keep_in_fp32_modules", None) or ())  # as from_pretrained(torch_dtype)
    for name, t in [*dit.named_parameters(), *dit.named_buffers()]:
        fp32 = t.is_floating_point() and keep.intersection(name.split("."))
        t.data = t.data.to(device, torch.float32 if fp32 else dtype)
    return dit.eval().requires_grad_(False)


class _Peer:
    """diffusers' ``WanPipeline`` around our DiT's weights, cached by cache-dit, in this process.

    Wan 2.2 A14B (``WanMoE``): ``transformer`` / ``transformer_2`` are the high- / low-noise
    experts with the model's ``boundary`` and the guidance's ``low_noise_scale``.
    """

    def __init__(self, rollout, cfg, steps: int, compile_blocks: bool = False) -> None:
        from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline

        m = rollout.model
        experts = [_diffusers_dit(e, rollout.device, rollout.dtype)
                   for e in getattr(m, "experts", [m])]  # fmt: skip
        shift = float(cfg.scheduler.get("shift", 5.0))
        sched = UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
                                        use_flow_sigmas=True, flow_shift=shift)  # fmt: skip
        moe = len(experts) == 2
        self.pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=AutoencoderKLWan(),
                                scheduler=sched, transformer=experts[0],
                                transformer_2=experts[1] if moe else None,
                                boundary_ratio=m.boundary if moe else None)  # fmt: skip
        self.pipe.set_progress_bar_config(disable=True)
        emb = rollout.text_encoder.encode([cfg.prompt, cfg.negative_prompt], rollout.device,
                                          rollout.dtype)  # fmt: skip
        self.pos, self.neg = emb[:1], emb[1:]
        self.rollout, self.steps, self.scale = rollout, steps, float(cfg.guidance.scale)
        low = cfg.guidance.get("low_noise_scale") if moe else None
        self.scale_2 = None if low is None else float(low)
        self.transformers = len(experts)
        self.cuda = rollout.device.type == "cuda"
        self.compile_blocks, self.compiled = compile_blocks, False

    def _compile(self) -> None:
        """cache-dit's own recipe for a compiled pipeline: its global compile settings, then
        diffusers' regional compilation (``compile_repeated_blocks``), after the cache is on."""
        if not self.compile_blocks or self.compiled:
            return
        import cache_dit

        cache_dit.set_compile_configs()
        torch._dynamo.config.recompile_limit = 128  # one entry per cache setting and shape
        for dit in [self.pipe.transformer, self.pipe.transformer_2]:
            if dit is not None:
                dit.compile_repeated_blocks()
        self.compiled = True

    def _clip(self) -> torch.Tensor:
        r = self.rollout
        gen = torch.Generator(device=r.device).manual_seed(r.seed)  # our run's only draw
        noise = torch.randn((r.batch_size, r.model.out_dim, r.frames_per_block, *r.latent_hw),
                            generator=gen, device=r.device)  # fmt: skip
        frames = 1 + 4 * (r.frames_per_block - 1)
        out = self.pipe(prompt_embeds=self.pos, negative_prompt_embeds=self.neg,
                        height=r.height, width=r.width, num_frames=frames,
                        num_inference_steps=self.steps, guidance_scale=self.scale,
                        guidance_scale_2=self.scale_2, latents=noise, output_type="latent", return_dict=False)[0]  # fmt: skip
        if self.cuda:
            torch.cuda.synchronize()
        return out.float()

    def run(self, kwargs: dict | None, ours: torch.Tensor, repeats: int) -> dict:
        import cache_dit
        from cache_dit import DBCacheConfig, TaylorSeerCalibratorConfig

        if kwargs is not None:
            mask = kwargs.get("mask")
            config = DBCacheConfig(
                Fn_compute_blocks=kwargs["front_blocks"], Bn_compute_blocks=kwargs["back_blocks"],
                residual_diff_threshold=kwargs["threshold"],
                max_warmup_steps=kwargs["warmup_steps"], enable_separate_cfg=True,
                num_inference_steps=self.steps, steps_computation_mask=mask,
                steps_computation_policy=kwargs.get("mask_policy", "dynamic"),
            )  # fmt: skip
            order = kwargs.get("taylorseer_order", 0)
            calibrator = TaylorSeerCalibratorConfig(taylorseer_order=order) if order else None
            cache_dit.enable_cache(self.pipe, cache_config=config, calibrator_config=calibrator)
        self._compile()
        try:
            self._clip()  # warm-up
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                out = self._clip()
                times.append((time.perf_counter() - start) * 1e3)
            hits = None
            if kwargs is not None:
                stats = cache_dit.summary(self.pipe, logging=False)[: self.transformers]
                cached = sum(len(st.cached_steps) + len(st.cfg_cached_steps) for st in stats)
                hits = cached / (2 * self.steps)  # each step runs one expert, two CFG branches
        finally:
            if kwargs is not None:
                cache_dit.disable_cache(self.pipe)
        cos = float(torch.nn.functional.cosine_similarity(out.flatten(), ours.flatten(), dim=0))
        return {"cache_dit_clip_ms": statistics.median(times), "cache_dit_hit_rate": hits or 0.0,
                "cosine_vs_cache_dit": cos}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default="wan21_t2v_1_3b_480p")
    parser.add_argument("--graph", default="compile", help="eager | compile (no CUDA graphs)")
    parser.add_argument("--attention", default="sdpa")
    parser.add_argument("--front", type=int, default=8, help="DBCache front_blocks (F)")
    parser.add_argument("--thresholds", default="0.08,0.24", help="comma-separated")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--frames", type=int, default=None,
                        help="latent frames of the clip (video frames 4 N - 3); default: the "
                             "recipe's (21 = 81 video frames)")  # fmt: skip
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test at tiny sizes")
    parser.add_argument("--cache-dit", action="store_true", help="also cache-dit on diffusers")
    parser.add_argument("--peer-compile", action="store_true",
                        help="compile the peer as cache-dit recommends (set_compile_configs + "
                             "diffusers' compile_repeated_blocks)")  # fmt: skip
    parser.add_argument(
        "--only", default="", help="comma-separated setting names (uncached always)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="write the rows as JSON (after each)"
    )
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    args = parser.parse_args()

    from hydra import compose, initialize_config_module

    import flashdreams.config.schema  # noqa: F401  (registers the config schemas)
    from flashdreams.build import build_rollout
    from flashdreams.step_cache.base import StepCache, hit_rate
    from flashdreams.step_cache.dbcache import DBCache

    overrides = [f"recipe={args.recipe}", "model.checkpoint=null", "text_encoder=random",
                 "vae=none", "~vae.checkpoint", "~vae.chunk_frames", f"graph={args.graph}",
                 f"attention={args.attention}", *(TINY if args.tiny else []),
                 *([] if args.frames is None else [f"rollout.frames_per_block={args.frames}"]),
                 *args.overrides]  # fmt: skip
    with initialize_config_module("flashdreams.conf", version_base="1.3"):
        cfg = compose("run", overrides=overrides)
    rollout = build_rollout(cfg)
    cuda = rollout.device.type == "cuda"
    steps = rollout.scheduler.num_steps
    front = min(args.front, rollout.model.num_layers - 1)

    def clip() -> torch.Tensor:
        rollout.start([cfg.prompt])
        if cuda:
            torch.cuda.synchronize()
        return rollout.step().latents.float()

    peer = _Peer(rollout, cfg, steps, args.peer_compile) if args.cache_dit else None
    rows, ref, ref_ms = [], None, None
    thresholds = [float(t) for t in args.thresholds.split(",")]
    only = {n for n in args.only.split(",") if n}
    table = configs(steps, front, thresholds)
    settings = {n: kw for n, kw in table.items() if not only or n == "none" or n in only}
    unknown = only - set(table)
    if unknown:
        raise SystemExit(f"--only: unknown setting(s) {sorted(unknown)}")
    meta = {"recipe": args.recipe, "graph": args.graph, "attention": args.attention,
            "steps": steps, "latent_frames": rollout.frames_per_block, "device": torch.cuda.get_device_name(rollout.device) if cuda else "cpu",
            "overrides": args.overrides, "front_blocks": front,
            "peer": None if peer is None else ("cache-dit on diffusers, " + ("compiled blocks" if args.peer_compile else "eager"))}  # fmt: skip
    for name, kwargs in settings.items():
        cache = StepCache() if kwargs is None else DBCache(**kwargs)
        rollout.model.set_step_cache(cache)
        clip()  # warm-up (compilation, allocator)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = clip()
            if cuda:
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1e3)
        ms = statistics.median(times)
        if ref is None:
            ref, ref_ms = out, ms
        cos = float(torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0))
        diffs = [r["diff"] for r in cache.records() if r.get("diff") is not None]
        row = {"name": name, "settings": kwargs, "clip_ms": ms, "speedup": ref_ms / ms,
               "hit_rate": hit_rate(cache.records()) or 0.0, "latent_cosine": cos,
               "residual_diff_median": statistics.median(diffs) if diffs else None,
               "latent_psnr_db": psnr(out, ref)}  # fmt: skip
        if peer is not None:
            row.update(peer.run(kwargs, out, args.repeats))
        rows.append(row)
        peer_cols = "" if peer is None else (
            f"  | cache-dit {row['cache_dit_clip_ms']:.1f} ms  hit {row['cache_dit_hit_rate']:.2f}"
            f"  cos vs ours {row['cosine_vs_cache_dit']:.5f}")  # fmt: skip
        print(f"{name:18s} {ms:10.1f} ms  x{row['speedup']:.2f}  hit {row['hit_rate']:.2f}  "
              f"cos {cos:.5f}  psnr {row['latent_psnr_db']:.1f} dB{peer_cols}", flush=True)  # fmt: skip
        if args.out is not None:  # after every row: a time limit keeps what was measured
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({**meta, "rows": rows}, indent=1))
    rollout.model.set_step_cache(StepCache())


if __name__ == "__main__":
    main()
