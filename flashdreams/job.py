"""One `flashdreams-run` job: build, roll out, write video / stats / plot / logs."""

from __future__ import annotations

import hashlib
import logging
import os
import resource
import socket
import sys
import time
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from flashdreams.attention.base import route_report
from flashdreams.build import build_rollout, read_prompts
from flashdreams.io.image import load_image
from flashdreams.rollout import Rollout, StepOutput, run_rollout
from flashdreams.stats import WARMUP_STEPS, RunStats, StepTimer
from flashdreams.step_cache.base import hit_rate

log = logging.getLogger("flashdreams")


def output_dir(cfg: DictConfig) -> Path:
    """The run's output dir (Hydra's, or ``paths.root`` when run outside Hydra)."""
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(cfg.paths.root) / "runs" / cfg.run_name / time.strftime("%Y-%m-%d_%H-%M-%S")


def peak_memory_bytes(device: torch.device) -> int:
    """Peak GPU memory allocated on CUDA, else the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _StepSink:
    """Writes each step's frames and resolves its timings without forcing device syncs."""

    def __init__(self, rollout: Rollout, stats: RunStats, logger, writers, clip: int) -> None:
        self.rollout, self.stats, self.logger, self.writers = rollout, stats, logger, writers
        self.clip = clip
        self.pending: list[StepTimer] = []

    def __call__(self, out: StepOutput) -> None:
        if out.frames is not None:
            frames = (out.frames.clamp(0, 1) * 255).round().to(torch.uint8)  # (B, T, 3, H, W)
            frames = frames.permute(0, 1, 3, 4, 2).cpu().numpy()  # (B, T, H, W, 3)
            for writer, clip_frames in zip(self.writers, frames, strict=False):
                writer.write(clip_frames)
        self.pending.append(out.timer)
        self.drain(force=False)

    def drain(self, force: bool) -> None:
        if force and self.rollout.device.type == "cuda":
            torch.cuda.synchronize(self.rollout.device)
        while self.pending:
            timer = self.pending[0]
            if not force and not timer.done():
                return
            row = {"clip": self.clip, **timer.resolve()}
            self.stats.add(row)
            self.logger.log_step(len(self.stats.steps) - 1, row)
            self.pending.pop(0)


def _write(writers, frames) -> None:
    """Write (B, T, 3, H, W) frames in [0, 1] (None: nothing) to one writer per video."""
    if frames is None or not writers:
        return
    frames = (frames.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 1, 3, 4, 2).cpu()
    for writer, clip_frames in zip(writers, frames.numpy(), strict=False):
        writer.write(clip_frames)


def _ms(value) -> str:
    return "n/a" if value is None else f"{value:.1f} ms"


def _print_summary(stats: RunStats, run_dir: Path) -> None:
    s = stats.summary
    over = f"steps>={WARMUP_STEPS}" if s["num_steps"] > WARMUP_STEPS else "all steps"
    warmup = "n/a (run ended before step 2)" if s["warmup_s"] is None else f"{s['warmup_s']:.2f} s"
    rows = [
        ("AR steps", f"{s['num_steps']}"),
        (f"median step latency ({over})", _ms(s["median_step_ms"])),
        (f"median block period ({over})", _ms(s["median_period_ms"])),
        ("warm-up (steps 0-1)", warmup),
        ("peak memory", f"{s['peak_memory_bytes'] / 2**20:.0f} MiB"),
        (
            "frames / wall-clock rate (warm-up included)",
            f"{s['num_frames']} / {s['fps'] or 0:.1f} fps",
        ),
        *_quality_rows(s),
        ("output", str(run_dir)),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"  {k:<{width}}  {v}" for k, v in rows))


def _quality_rows(s: dict) -> list[tuple[str, str]]:
    if s.get("quality_min_cosine") is None:
        return []
    psnr = s.get("quality_min_psnr_db")
    text = f"min DiT cosine {s['quality_min_cosine']:.6f}"
    text += f", min PSNR {psnr:.2f} dB" if psnr is not None else ""
    return [(f"quality vs {s['quality_reference']}", text)]


def run_job(cfg: DictConfig) -> int:
    """Run the composed config; returns the process exit status."""
    from flashdreams.io.plot import plot_latency
    from flashdreams.io.video import Mp4Writer

    image = load_image(cfg.image) if cfg.image else None  # a bad path fails before any loading
    prompts = read_prompts(cfg)  # so does a bad prompt file
    rollout = build_rollout(cfg)
    from flashdreams.postprocess import build_postprocess

    post = build_postprocess(cfg, rollout)  # postprocess=...: upscale the frames as they come
    _raise_on_ctrl_c()  # from here a Ctrl-C closes the video and stats.json properly
    run_dir = rollout.parallel.broadcast(output_dir(cfg))  # rank 0's dir: one per torchrun job
    is_main = rollout.parallel.is_main
    resolved = OmegaConf.to_yaml(cfg, resolve=True)
    header = {
        "run_name": cfg.run_name,
        "config_hash": hashlib.sha1(resolved.encode()).hexdigest(),
        "device": torch.cuda.get_device_name(rollout.device)
        if rollout.device.type == "cuda" else "cpu",
        "dtype": str(rollout.dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "parallel": f"{rollout.parallel.name} x{rollout.parallel.world_size}",
        "precision": precision_label(rollout.precision.effective, rollout.dtype),
        "offload": cfg.get("offload", "none"),
        "kv_cache": rollout.precision.kv_cache or "model dtype",
        # the shape the benchmark floor counts: DiT tokens per latent frame, forwards per step
        "tokens_per_frame": rollout.cache_tokens_per_frame(),
        "forwards_per_step": 2 if rollout.guidance.needs_negative else 1,
        # the block schedule: latent frames of AR step 0 and of every later step
        **rollout.schedule.as_dict(),
        "host": socket.gethostname(), "pid": os.getpid(),  # flashdreams-report: killed runs
    }  # fmt: skip
    logger = instantiate(cfg.logger) if is_main else None
    stats = RunStats(run_dir / "stats.json" if is_main else None, header)
    quality = None
    if cfg.get("quality"):
        from flashdreams.quality import build_quality

        quality = build_quality(cfg, rollout)
        stats.sections["quality"] = quality.steps  # rewritten with stats.json after each step
    step_cache, cache_steps = rollout.model.step_cache, []
    if step_cache.enabled:  # per forward: computed or reused middle blocks, residual diff
        stats.sections["step_cache"] = cache_steps
    post_rows: list = []
    if post is not None:  # per post-processing chunk: stage times (stats.json "postprocess")
        stats.sections["postprocess"] = post_rows
    writers: list = []
    post_writers: list = []
    bar = None
    failed, status, warmup_s, t0 = True, "failed", None, time.perf_counter()
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(resolved)
        logger.start(OmegaConf.to_container(cfg, resolve=True), run_dir, cfg.run_name)
    try:
        b = rollout.batch_size
        batches = [prompts[i : i + b] for i in range(0, len(prompts), b)]
        for clip, batch in enumerate(batches):
            batch = batch + [batch[-1]] * (b - len(batch))
            names = [f"video_{clip * b + k:03d}.mp4" for k in range(b)]
            if len(prompts) == 1 and b == 1:
                names = ["video.mp4"]
            if post is not None:  # video.mp4: the upscaled stream; *_source.mp4: the run's frames
                post_writers = [Mp4Writer(run_dir / n, cfg.fps) for n in names] if is_main else []
                names = [n.replace(".mp4", "_source.mp4") for n in names]
                post.start()
            writers = [Mp4Writer(run_dir / n, cfg.fps) for n in names] if is_main else []
            sink = _StepSink(rollout, stats, logger or _Null(), writers, clip)
            bar = tqdm(total=rollout.total_blocks, desc=f"AR steps ({cfg.run_name})", unit="step",
                       disable=not is_main, file=sys.stderr)  # fmt: skip

            def on_step(out: StepOutput, sink=sink, bar=bar, clip=clip,
                        post_writers=post_writers) -> None:  # fmt: skip
                if quality is not None:
                    quality.compare(out, clip)
                cache_steps.extend({"clip": clip, "ar_step": out.step, **r}
                                   for r in step_cache.records())  # fmt: skip
                sink(out)
                if post is not None:
                    _write(post_writers, post.push(out.frames))
                    if out.step + 1 == rollout.total_blocks:
                        _write(post_writers, post.finish())
                bar.update(1)

            images = None if image is None else [image] * b
            w = run_rollout(rollout, batch, on_step, profile=cfg.profile, images=images)
            warmup_s = warmup_s if warmup_s is not None else w
            sink.drain(force=True)
            bar.close()
            for writer in writers + post_writers:
                writer.close()
            if post is not None:
                post_rows.extend({"clip": clip, **row} for row in post.take_rows())
            if cfg.save_embeddings and clip == 0 and is_main:
                _save_embeddings(cfg, rollout, batch)
        failed, status = False, "completed"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        if bar is not None:
            bar.close()  # before any message: the progress line ends first
        for writer in writers + post_writers:
            writer.close()
        if is_main:
            peak = peak_memory_bytes(rollout.device)
            extra = quality.summary() if quality is not None else {}
            if step_cache.enabled:
                extra["step_cache_hit_rate"] = hit_rate(cache_steps)
            routes = attention_routes(rollout.model)
            if routes is not None:  # calls per kernel / fallback route (flashdreams-bench prints)
                stats.sections["attention_routes"] = routes
            stats.finish(status, warmup_s, peak, time.perf_counter() - t0, extra)
            if stats.steps:
                try:
                    plot_latency(stats.as_dict(), run_dir / "latency.png")
                except Exception:  # an interrupt mid-import can break it: keep the first error
                    if not failed:
                        raise
                    log.warning("latency.png not written (the run was %s)", status)
            logger.log_summary(stats.summary)
            for writer in writers + post_writers:
                logger.log_video(Path(writer.path), cfg.fps)
            logger.finish(failed=failed)
        rollout.parallel.teardown()
    if is_main:
        _print_summary(stats, run_dir)
    return 0


def attention_routes(model) -> dict | None:
    """The ``route_report`` of the attention backend installed in ``model`` (rank 0's calls):
    how many ran its kernel and how many its fallback, by reason; None without a backend."""
    backend = getattr(getattr(model, "attention", None), "backend", None)
    return None if backend is None else route_report(backend)


def _raise_on_ctrl_c() -> None:
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)


_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def precision_label(effective: str, dtype: torch.dtype) -> str:
    """What the run's weights computed in: ``precision=bf16`` on a float32 run is fp32."""
    if effective == "bf16" and dtype in _DTYPE_NAMES:
        return _DTYPE_NAMES[dtype]
    return effective


def _save_embeddings(cfg: DictConfig, rollout: Rollout, prompts: list[str]) -> None:
    from flashdreams.text_encoder.precomputed import save_embeddings

    if rollout.guidance.needs_negative and cfg.negative_prompt not in prompts:
        prompts = [*prompts, cfg.negative_prompt]  # CFG looks the negative prompt up too
    emb = rollout.text_encoder.encode(prompts, torch.device("cpu"), torch.float32)
    save_embeddings(cfg.save_embeddings, prompts, emb)
    log.info("wrote prompt embeddings to %s", cfg.save_embeddings)


class _Null:
    def log_step(self, *args) -> None:
        pass
