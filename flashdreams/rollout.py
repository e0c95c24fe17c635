"""The generic block-autoregressive rollout loop (DESIGN.md section 2).

It imports only the protocols in ``*/base.py``; concrete parts arrive by injection.

Randomness: all draws come from one seeded ``torch.Generator`` on the run's device in a fixed
order, block-major then step-minor: for AR step i, first the block's initial noise, then the
fresh noise of each re-noising step in order, then (if ``context_noise > 0``) the commit's
noise. A conditioner's prefix frames (I2V) draw none. ``noise_fn`` may be injected instead
(parity against reference implementations).

Overlapped decode (``overlap_decode``, CUDA only): the block's decode runs on a side stream,
after the diffuse, while the commit forward runs on the current stream. The commit writes only
the KV cache, never the latents the decode reads; the current stream waits for the decode
before the frames leave ``step``. Step latency stays encode + diffuse + decode (the decode timed
on its stream); the block period becomes the time from the step's start to both being done.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from flashdreams import ConfigError
from flashdreams.cache.base import KVCache
from flashdreams.conditioner.base import Conditioner
from flashdreams.graph.base import GraphPolicy
from flashdreams.guidance.base import Guidance
from flashdreams.image_encoder.base import ImageEncoder
from flashdreams.scheduler.base import Scheduler
from flashdreams.stats import StepTimer
from flashdreams.text_encoder.base import TextEncoder
from flashdreams.vae.base import StreamingDecoder

NoiseFn = Callable[[tuple[int, ...]], torch.Tensor]
log = logging.getLogger(__name__)
_logged_cpu_overlap = False  # the CPU fallback of ``overlap_decode`` is logged once per process


@dataclass
class StepOutput:
    """What one AR step produced."""

    step: int
    latents: torch.Tensor  # (B, C, F, h, w) clean latents of the block (+ prefix at step 0)
    frames: torch.Tensor | None  # (B, T, 3, H, W) float in [0, 1], or None without a decoder
    timer: StepTimer
    start_frame: int = 0  # latent frame index of latents[:, :, 0] (step 0 includes any prefix)


class Rollout:
    """Runs a DiT block by block: diffuse, decode, commit.

    Args:
        model: the DiT (``prepare_context``, ``forward`` with cache/frame positions).
        scheduler: denoising schedule of one block.
        vae: streaming decoder.
        text_encoder: prompt encoder.
        cache_factory: partial KV cache, finished here with the model's dimensions; it may
            return None (bidirectional recipes: no cache, one step over the whole clip).
        graph: graph-capture policy that executes the forwards.
        height: video height in pixels.
        width: video width in pixels.
        frames_per_block: latent frames per AR step.
        total_blocks: AR steps of a finite run (``None``: endless, for streaming sessions).
        context_noise: timestep of the commit forward (0 = clean K/V).
        batch_size: videos generated together.
        device: torch device.
        dtype: activation / weight dtype of the model.
        seed: seed of the run's generator.
        noise_fn: optional injected noise source replacing the generator.
        guidance: how predictions combine per step (None: one conditional forward).
        image_encoder: image tokens for the DiT's image cross-attention (None: no tokens).
        conditioner: latent image conditioning, prefix frames and/or extra input channels.
        negative_prompt: prompt of the unconditional prediction when ``guidance`` needs one.
    """

    def __init__(
        self, *, model, scheduler: Scheduler, vae: StreamingDecoder, text_encoder: TextEncoder,
        cache_factory: Callable[..., KVCache | None], graph: GraphPolicy, height: int, width: int,
        frames_per_block: int, total_blocks: int | None, context_noise: float = 0.0,
        batch_size: int = 1, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
        seed: int = 0, noise_fn: NoiseFn | None = None, guidance: Guidance | None = None,
        image_encoder: ImageEncoder | None = None, conditioner: Conditioner | None = None,
        negative_prompt: str = "", overlap_decode: bool = False,
    ) -> None:  # fmt: skip
        self.model, self.scheduler = model, scheduler
        self.vae, self.text_encoder = vae, text_encoder
        self.graph = graph
        self.device, self.dtype = torch.device(device), dtype
        self.batch_size, self.frames_per_block = batch_size, frames_per_block
        self.total_blocks, self.context_noise = total_blocks, float(context_noise)
        self.seed, self._injected_noise = seed, noise_fn
        self.guidance = guidance if guidance is not None else Guidance()
        self.image_encoder = image_encoder if image_encoder is not None else ImageEncoder()
        self.conditioner = conditioner if conditioner is not None else Conditioner()
        self.negative_prompt, self.height, self.width = negative_prompt, height, width
        self.frame_offset = self.conditioner.num_prefix_frames  # latent frames before block 0
        self.images: list | None = None
        self._image_tokens: torch.Tensor | None = None
        self.latent_hw = self._latent_size(height, width)
        if frames_per_block < 1:
            raise ConfigError(f"rollout.frames_per_block={frames_per_block} must be >= 1")
        if total_blocks is not None and total_blocks < 1:
            raise ConfigError(f"rollout.total_blocks={total_blocks} must be >= 1 (or null)")
        self.overlap_decode = self._check_overlap(overlap_decode)
        self._side_stream = None  # the decode's stream under overlap_decode (made on first use)
        total_frames = self.frame_offset + frames_per_block * (total_blocks or 1)
        build_cache = getattr(model, "build_cache", None)  # two-expert models: one per expert
        if build_cache is not None:
            cache_factory = functools.partial(build_cache, cache_factory)
        self.cache = cache_factory(
            num_layers=model.num_layers, num_heads=model.num_heads, head_dim=model.head_dim,
            tokens_per_frame=self.cache_tokens_per_frame(), frames_per_block=frames_per_block,
            total_frames=total_frames, batch_size=batch_size, device=self.device, dtype=dtype,
        )  # fmt: skip
        if self.cache is not None and self.guidance.needs_negative:
            raise ConfigError("guidance=cfg needs a bidirectional recipe (cache=none): the KV "
                              "cache holds the K/V of one prompt")  # fmt: skip
        if self.cache is None and self.frame_offset:
            raise ConfigError("conditioner=first_frame needs a KV cache (an AR recipe)")
        self._contexts: dict[tuple[str, ...], tuple] = {}
        self.prompts: list[str] = []
        self.step_index = 0

    def _check_overlap(self, overlap_decode) -> bool:
        """Whether the decode really overlaps the commit: asked for, and on CUDA."""
        global _logged_cpu_overlap
        if not isinstance(overlap_decode, bool):
            raise ConfigError(f"rollout.overlap_decode={overlap_decode!r} must be true or false")
        if overlap_decode and self.device.type != "cuda":
            if not _logged_cpu_overlap:
                _logged_cpu_overlap = True
                log.info("rollout.overlap_decode=true: decode and commit run one after the "
                         "other on %s (overlap needs CUDA streams)", self.device.type)  # fmt: skip
            return False
        return overlap_decode

    def _latent_size(self, height: int, width: int) -> tuple[int, int]:
        factor = self.vae.spatial_factor * self.model.patch_size[1]
        for key, value in (("height", height), ("width", width)):
            if value <= 0 or value % factor:
                raise ConfigError(
                    f"rollout.{key}={value} must be a positive multiple of {factor} "
                    f"(VAE factor {self.vae.spatial_factor} x patch {self.model.patch_size[1]})"
                )
        return height // self.vae.spatial_factor, width // self.vae.spatial_factor

    def cache_tokens_per_frame(self) -> int:
        """DiT tokens per latent frame (after the VAE's and the patch's spatial factors)."""
        (h, w), (_, ph, pw) = self.latent_hw, self.model.patch_size
        return (h // ph) * (w // pw)

    # ------------------------------------------------------------------ session state
    def start(
        self, prompts: list[str], seed: int | None = None, images: list | None = None
    ) -> None:
        """Begin a new clip: reset cache, decoder and generator; encode prompts lazily.

        Args:
            prompts: one prompt per video of the batch.
            seed: reseed the generator (None: the run's seed).
            images: one PIL image per video for I2V recipes (encoded here, once per clip).
        """
        if len(prompts) != self.batch_size:
            raise ConfigError(
                f"got {len(prompts)} prompts for rollout.batch_size={self.batch_size}"
            )
        self.prompts = list(prompts)
        self.seed = self.seed if seed is None else seed
        self.generator = torch.Generator(device=self.device).manual_seed(self.seed)
        if self.cache is not None:
            self.cache.reset()
        self.vae.reset()
        self.graph.reset()
        self.step_index = 0
        self._prepare_images(images)

    def _prepare_images(self, images: list | None) -> None:
        """Image tokens (cross-attention) and latent conditioning of the clip's images."""
        if images is not None and len(images) != self.batch_size:
            raise ConfigError(f"got {len(images)} images for rollout.batch_size={self.batch_size}")
        if images is not None or self._image_tokens is not None:
            self._contexts.clear()  # the image tokens are part of the cached context
        self.images = None if images is None else list(images)
        self._image_tokens = None
        if self.images is not None:
            self._image_tokens = self.image_encoder.encode(self.images, self.device, self.dtype)
        num_frames = self.frame_offset + self.frames_per_block * (self.total_blocks or 1)
        self.conditioner.prepare(self.images, height=self.height, width=self.width,
                                 num_frames=num_frames, device=self.device)  # fmt: skip

    def noise(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Next draw of the run's documented noise order."""
        if self._injected_noise is not None:
            return self._injected_noise(shape).to(self.device, torch.float32)
        return torch.randn(shape, generator=self.generator, device=self.device)

    def _encode(self) -> tuple:
        """(conditional K/V, guidance state) of the current prompts, once per prompt tuple."""
        key = tuple(self.prompts)
        if key not in self._contexts:
            b, needs_neg = self.batch_size, self.guidance.needs_negative
            texts = self.prompts + [self.negative_prompt] * b if needs_neg else self.prompts
            emb = self.text_encoder.encode(texts, self.device, self.dtype)  # (B or 2B, L, C)
            cond = self.model.prepare_context(emb[:b], self._image_tokens)
            uncond = self.model.prepare_context(emb[b:], self._image_tokens) if needs_neg else None
            self._contexts[key] = (cond, self.guidance.prepare(cond, uncond))
        return self._contexts[key]

    def context(self) -> list:
        """Cross-attention K/V of the current prompts (encoded once per prompt tuple)."""
        return self._encode()[0]

    def set_prompts(self, prompts: list[str]) -> None:
        """Switch prompts mid-clip (the next forward uses them); other prompts' K/V are freed."""
        if len(prompts) != self.batch_size:
            raise ConfigError(
                f"got {len(prompts)} prompts for rollout.batch_size={self.batch_size}"
            )
        self.prompts = list(prompts)
        self._contexts = {k: v for k, v in self._contexts.items() if k == tuple(self.prompts)}

    # ------------------------------------------------------------------ one AR step
    @torch.no_grad()
    def step(self, sync: bool = False) -> StepOutput:
        """Generate, decode and commit the next block.

        Args:
            sync: synchronise the device at the end of the step (profiling runs only).
        """
        i, fpb = self.step_index, self.frames_per_block
        timer = StepTimer(i, self.device)
        start_frame = self._start_frame(i)
        h, w = self.latent_hw
        shape = (self.batch_size, self.model.out_dim, fpb, h, w)
        positions = torch.arange(start_frame, start_frame + fpb, device=self.device)

        timer.start("encode")
        ctx, guided = self._encode()
        prefix = self._commit_prefix(ctx) if i == 0 and self.frame_offset else None
        timer.stop()

        timer.start("diffuse")
        x0 = self._denoise(self.noise(shape), guided, positions)
        timer.stop()

        if prefix is not None:  # step 0 also emits the conditioner's clean prefix frames
            x0, start_frame = torch.cat([prefix.to(x0.dtype), x0], dim=2), 0
        is_last = self.total_blocks is not None and i + 1 >= self.total_blocks
        commit = self.cache is not None and not is_last
        decode_commit = self._overlapped if self.overlap_decode else self._sequential
        frames = decode_commit(x0, ctx, positions, timer, commit)
        timer.num_frames = 0 if frames is None else frames.shape[1]
        if sync and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.step_index += 1
        return StepOutput(i, x0, frames, timer, start_frame)

    def _sequential(self, x0, ctx, positions, timer: StepTimer, commit: bool):
        """Decode the block, then commit its last ``frames_per_block`` frames; returns frames."""
        timer.start("decode")
        frames = self.vae.decode_step(x0.to(self.dtype))
        timer.stop()
        if commit:
            timer.start("commit")
            self._commit(x0[:, :, -self.frames_per_block :], ctx, positions)
            timer.stop()
        return frames

    def _overlapped(self, x0, ctx, positions, timer: StepTimer, commit: bool):
        """Decode on the side stream while the commit runs on the current one (CUDA).

        Both start after the diffuse. The commit writes only the KV cache (its input is a read
        of ``x0``, as is the decode's); the current stream waits for the decode before the
        frames are returned, so every later use of them is ordered after it.
        """
        main = torch.cuda.current_stream(self.device)
        if self._side_stream is None:  # high priority: the decode is on the visible path
            self._side_stream = torch.cuda.Stream(self.device, priority=-1)
        side = self._side_stream
        latents = x0.to(self.dtype)  # (B, C, F, h, w), made on the current stream
        side.wait_stream(main)  # the decode starts after the diffuse
        with torch.cuda.stream(side):
            latents.record_stream(side)  # its memory is not reused before the decode read it
            timer.start("decode")  # events on the side stream: the decode's own time
            frames = self.vae.decode_step(latents)
            timer.stop()
            decoded = torch.cuda.Event()
            decoded.record(side)
        if commit:
            timer.start("commit")
            self._commit(x0[:, :, -self.frames_per_block :], ctx, positions)
            timer.stop()
        main.wait_event(decoded)  # frames are complete for whatever the caller runs next
        if frames is not None:
            frames.record_stream(main)  # made on the side stream, freed after main's uses
        timer.close_period()
        return frames

    def _forward(self, x, t, ctx, positions, control=None, expert=None):
        extra = {} if control is None else {"control": control}  # camera-controlled models
        if expert is not None:
            extra["expert"] = expert  # two-expert models only
        return self.model(x.to(self.dtype), t, ctx, positions, self.cache, **extra)

    def _run(self, x, t, ctx, positions, control=None, expert=None, commit=False):
        """One forward under the graph policy; two-expert models get the named expert's K/V.

        ``commit``: the forward that writes the block's clean K/V for later blocks; it runs
        inside the attention's ``exact()`` (a reduced-precision backend's fallback kernel).
        """
        if expert is not None:
            ctx = self.model.expert_context(ctx, expert)
        exact = commit and self._exact_commit
        with self.model.attention.exact() if exact else contextlib.nullcontext():
            return self.graph.run(self._forward, x, t, ctx, positions, control, expert,
                                  shape_key=self._shape_key(expert, exact))  # fmt: skip

    @property
    def _exact_commit(self) -> bool:
        """Whether commits compute differently from denoising forwards (own captured graphs)."""
        return bool(getattr(getattr(self.model, "attention", None), "has_exact_mode", False))

    def set_control(self, control: dict | None) -> None:
        """Live control of the next step (keys, ...), handed to the conditioner."""
        self.conditioner.set_control(control)

    def control_state(self) -> dict | None:
        """What the conditioner applied last (e.g. the camera pose), for the server."""
        return self.conditioner.state()

    def _block_timestep(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(1, 1).expand(self.batch_size, self.frames_per_block)

    def _shape_key(self, expert: int | None = None, exact: bool = False):
        """What changes a forward's work besides its argument shapes: the valid KV length
        (and, for two-expert models, the expert; for an exact commit, that)."""
        key = 0 if self.cache is None else self.cache.valid_tokens
        key = key if expert is None else (key, expert)
        return (key, "exact") if exact else key

    def _expert_plan(self, timesteps: torch.Tensor) -> list:
        """Expert of each denoising step (None for single-expert models)."""
        plan = getattr(self.model, "expert_plan", None)
        if plan is None:
            return [None] * len(timesteps)
        host = getattr(self.scheduler, "timesteps", None)  # a few-step list: no device sync
        return plan(host if isinstance(host, list) and len(host) == len(timesteps) else timesteps)

    def _all_experts(self) -> list:
        """Experts a clean commit runs through, so that each expert's cache holds clean K/V."""
        order = getattr(self.model, "commit_order", None)
        return [None] if order is None else order()

    def _start_frame(self, block: int) -> int:
        """Absolute latent frame where AR block ``block`` starts (after any prefix frames)."""
        return self.frame_offset + block * self.frames_per_block

    def _begin_block(self, block: int) -> None:
        if self.cache is not None:
            self.cache.begin_block(self._start_frame(block), self.frames_per_block)

    def _model_input(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Latents (B, C, F, h, w) plus the conditioner's extra channels of those frames."""
        x = self.conditioner.replace(x, start)  # frames given by the condition (TI2V)
        extra = self.conditioner.channels(start, x.shape[2])
        return x if extra is None else torch.cat([x, extra.to(x.dtype)], dim=1)

    def _denoise(self, x, guided, positions) -> torch.Tensor:
        timesteps = self.scheduler.begin_block(self.device)  # (num_steps,)
        self._begin_block(self.step_index)
        start = self._start_frame(self.step_index)
        control = self.conditioner.control(start, x.shape[2])  # e.g. camera rays, or None

        def forward(x_in, t, ctx, expert=None):
            return self._run(x_in, t, ctx, positions, control, expert)

        for j, expert in enumerate(self._expert_plan(timesteps)):
            t = self.conditioner.timesteps(self._block_timestep(timesteps[j]), start)
            fwd = forward if expert is None else functools.partial(forward, expert=expert)
            x_in = self._model_input(x, start)
            flow = self.guidance.predict(fwd, x_in, t, guided, j, expert=expert or 0)
            x = self.scheduler.step(flow, x, j, self.noise)
        return self.conditioner.replace(x, start)

    def _commit_prefix(self, ctx) -> torch.Tensor:
        """Commit the conditioner's clean prefix frames at t = 0 before block 0; return them."""
        prefix = self.conditioner.prefix()  # (B, C, P, h, w)
        p = prefix.shape[2]
        self.cache.begin_block(0, p)
        positions = torch.arange(p, device=self.device)
        t = torch.zeros(self.batch_size, p, device=self.device)
        x = self._model_input(prefix.float(), 0)
        control = self.conditioner.control(0, p)
        for e in self._all_experts():
            self._run(x, t, ctx, positions, control, e, commit=True)
        return prefix

    def precapture(self) -> None:
        """Run every forward shape of the rollout once (graph capture during warm-up).

        One shape per KV length while the cache fills, plus the steady one. The forwards
        write only into the slots of the block they pretend to be, which every real block
        overwrites before reading, and the cache is reset afterwards.
        """
        if not self.graph.wants_precapture or self.device.type != "cuda":
            return
        blocks = self.total_blocks or 10**9
        if self.cache is not None:
            blocks = min(blocks, self.cache.capacity_frames // self.frames_per_block + 1)
        h, w = self.latent_hw
        x = torch.zeros(self.batch_size, self.model.in_dim, self.frames_per_block, h, w,
                        device=self.device)  # fmt: skip
        t = torch.zeros(self.batch_size, self.frames_per_block, device=self.device)
        num_ctl = self.conditioner.control_channels  # a stand-in: no live trajectory is consumed
        control = torch.zeros(self.batch_size, num_ctl, self.frames_per_block, h, w,
                              device=self.device) if num_ctl else None  # fmt: skip
        with torch.no_grad():
            ctx = self.context()
            for block in range(min(blocks, 1 if self.cache is None else blocks)):
                self._begin_block(block)
                start = block * self.frames_per_block
                positions = torch.arange(start, start + self.frames_per_block, device=self.device)
                for e in self._all_experts():
                    self._run(x, t, ctx, positions, control, e)
                    if self._exact_commit and self.cache is not None:
                        self._run(x, t, ctx, positions, control, e, commit=True)
        if self.cache is not None:
            self.cache.reset()

    def _commit(self, x0, ctx, positions) -> None:
        x = x0
        if self.context_noise > 0:
            s = self.context_noise / 1000.0
            x = (1 - s) * x0 + s * self.noise(tuple(x0.shape))
        t = torch.full((1,), self.context_noise, device=self.device)
        self._begin_block(self.step_index)
        t = self._block_timestep(t)
        start = self._start_frame(self.step_index)
        x, control = self._model_input(x, start), self.conditioner.control(start, x.shape[2])
        for e in self._all_experts():  # every expert's cache gets this block's clean K/V
            self._run(x, t, ctx, positions, control, e, commit=True)


def run_rollout(rollout: Rollout, prompts: list[str], on_step: Callable[[StepOutput], None],
                profile: bool = False, images: list | None = None) -> float:  # fmt: skip
    """Run all blocks of a finite rollout, handing each step to ``on_step``.

    Returns:
        Seconds spent in steps 0 and 1 (warm-up).
    """
    warm_start, warmup_s = time.perf_counter(), 0.0
    rollout.start(prompts, images=images)
    rollout.precapture()
    for i in range(rollout.total_blocks):
        on_step(rollout.step(sync=profile))
        if i == min(1, rollout.total_blocks - 1):
            if rollout.device.type == "cuda":
                torch.cuda.synchronize(rollout.device)
            warmup_s = time.perf_counter() - warm_start
    return warmup_s
