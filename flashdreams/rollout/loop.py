"""The generic block-autoregressive rollout loop (docs/DESIGN.md, "The rollout").

It knows the parts only through their protocols (``*/base.py``, the model through
``flashdreams.model.base.DiT``); concrete parts arrive by injection, complete.

Randomness: all draws come from one seeded ``torch.Generator`` on the run's device in a fixed
order, block-major then step-minor: for AR step i, first the block's initial noise, then the
fresh noise of each re-noising step in order, then (if ``context_noise > 0``) the commit's
noise. A conditioner's prefix frames (I2V) draw none. ``noise_fn`` may be injected instead
(parity against reference implementations).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import count

import torch

from flashdreams import ConfigError
from flashdreams.cache.base import KVCache
from flashdreams.conditioner.base import Conditioner
from flashdreams.control.base import ControlEncoder
from flashdreams.graph.base import GraphPolicy
from flashdreams.guidance.base import Guidance
from flashdreams.image_encoder.base import ImageEncoder
from flashdreams.model.base import DiT
from flashdreams.parallel.base import ParallelPolicy
from flashdreams.precision.base import Precision
from flashdreams.rollout.context import PromptContext
from flashdreams.rollout.decode import BlockDecoder
from flashdreams.rollout.forward import Forwards
from flashdreams.rollout.history import LatentHistory
from flashdreams.rollout.schedule import BlockSchedule
from flashdreams.scheduler.base import Scheduler
from flashdreams.stats import StepTimer
from flashdreams.text_encoder.base import TextEncoder
from flashdreams.vae.base import StreamingDecoder

NoiseFn = Callable[[tuple[int, ...]], torch.Tensor]
_UNBUILT = object()  # the frames of a cache not built yet


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
        model: the DiT (``flashdreams.model.base.DiT``), attention installed.
        scheduler: denoising schedule of one block.
        vae: streaming decoder.
        text_encoder: prompt encoder.
        cache_factory: partial KV cache, finished by the model (``DiT.build_cache``) with its
            layout; it may return None (bidirectional recipes: one step over the whole clip).
        graph: graph-capture policy that executes the forwards.
        height: video height in pixels.
        width: video width in pixels.
        frames_per_block: latent frames per AR step (every step after the first).
        first_block_frames: latent frames of AR step 0 (None: ``frames_per_block``), see
            ``rollout/schedule.py``.
        total_blocks: AR steps of a finite run (``None``: endless, for streaming sessions).
        context_noise: timestep of the commit forward (0 = clean K/V).
        batch_size: videos generated together.
        device: torch device.
        dtype: activation / weight dtype of the model.
        seed: seed of the run's generator.
        noise_fn: optional injected noise source replacing the generator.
        guidance: how predictions combine per step (None: one conditional forward).
        image_encoder: image tokens for the DiT's image cross-attention (None: no tokens).
        conditioner: latent image conditioning: prefix frames, named inputs, replaced frames.
        control: live / scripted control giving named inputs (None: no control).
        negative_prompt: prompt of the unconditional prediction when ``guidance`` needs one.
        overlap_decode: decode on a side stream while the commit runs (CUDA).
        pipeline_decode: decode block n on a side stream while block n + 1 is diffused
            (CUDA); step n returns block n - 1's frames (``rollout/decode.py``).
        prefetch_control: once block n's denoising is queued, have the control read block
            n + 1's input and encode it ahead (``ControlEncoder.read_ahead``, ``encode_ahead``;
            a side stream on CUDA), its GPU work beside the denoising or beside the commit
            (``ControlEncoder.ahead_beside``).
        parallel: the run's parallel layout (rank bookkeeping for the job).
        precision: the precision policy applied to the model (reported by the job).
        offloader: the block offloader holding the weights (``offload=blocks``), or None.
    """

    def __init__(
        self, *, model: DiT, scheduler: Scheduler, vae: StreamingDecoder, text_encoder: TextEncoder,
        cache_factory: Callable[..., KVCache | None], graph: GraphPolicy, height: int, width: int,
        frames_per_block: int, total_blocks: int | None, context_noise: float = 0.0,
        batch_size: int = 1, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
        seed: int = 0, noise_fn: NoiseFn | None = None, guidance: Guidance | None = None,
        image_encoder: ImageEncoder | None = None, conditioner: Conditioner | None = None,
        control: ControlEncoder | None = None, negative_prompt: str = "",
        overlap_decode: bool = False, parallel: ParallelPolicy | None = None,
        precision: Precision | None = None, offloader=None, first_block_frames: int | None = None,
        pipeline_decode: bool = False, prefetch_control: bool = False,
    ) -> None:  # fmt: skip
        self.model, self.scheduler = model, scheduler
        self.vae, self.text_encoder = vae, text_encoder
        self.device, self.dtype = torch.device(device), dtype
        self.schedule = BlockSchedule(frames_per_block, first_block_frames)  # frames per block
        self.batch_size, self.frames_per_block = batch_size, frames_per_block
        self.first_block_frames = self.schedule.first
        self.total_blocks, self.context_noise = total_blocks, float(context_noise)
        self.seed, self._injected_noise = seed, noise_fn
        self.guidance = guidance if guidance is not None else Guidance()
        self.image_encoder = image_encoder if image_encoder is not None else ImageEncoder()
        self.conditioner = conditioner if conditioner is not None else Conditioner()
        self.control = control if control is not None else ControlEncoder()
        self.parallel = parallel if parallel is not None else ParallelPolicy()
        self.precision = precision if precision is not None else Precision()
        self.offloader = offloader
        self.negative_prompt, self.height, self.width = negative_prompt, height, width
        self.frame_offset = self.conditioner.num_prefix_frames  # latent frames before block 0
        self.prompt_context = PromptContext(
            model, text_encoder, self.image_encoder, self.guidance, batch_size=batch_size,
            negative_prompt=negative_prompt, device=self.device, dtype=dtype,
        )  # fmt: skip
        self.latent_hw = self._latent_size(height, width)
        if total_blocks is not None and total_blocks < 1:
            raise ConfigError(f"rollout.total_blocks={total_blocks} must be >= 1 (or null)")
        if not isinstance(prefetch_control, bool):
            raise ConfigError(f"rollout.prefetch_control={prefetch_control!r} must be true or "
                              "false")  # fmt: skip
        self.prefetch_control = prefetch_control
        self.decoder = BlockDecoder(vae, dtype, self.device, overlap_decode, pipeline_decode)
        self.forwards = Forwards(model, graph, self.guidance, self.conditioner, self.control,
                                 batch_size=batch_size, dtype=dtype, device=self.device)  # fmt: skip
        self.cache: KVCache | None = None
        self._cache_factory, self._cache_frames = cache_factory, _UNBUILT
        self._build_cache()
        if self.cache is not None and self.guidance.needs_negative:
            raise ConfigError("guidance=cfg needs a bidirectional recipe (cache=none): the KV "
                              "cache holds the K/V of one prompt")  # fmt: skip
        if self.cache is None and self.frame_offset:
            raise ConfigError("conditioner=first_frame needs a KV cache (an AR recipe)")
        self.step_index = 0
        self._warm = False  # DiT.warm_up ran (Rollout.precapture)
        # clean latents of the clip, for models that re-run history before each block
        self.history = LatentHistory() if model.context_frames > 0 else None

    def _build_cache(self) -> None:
        """The KV cache of the run's frames (None: endless), from the model's layout; a rolling
        cache is rebuilt when a new clip needs other frames (a session going endless)."""
        frames = None if self.total_blocks is None else self._clip_frames()
        if frames == self._cache_frames:
            return
        self.cache = None  # free the old buffers first
        self.cache = self.model.build_cache(
            self._cache_factory, tokens_per_frame=self.cache_tokens_per_frame(),
            frames_per_block=self.schedule.max_frames, total_frames=frames,
            batch_size=self.batch_size, device=self.device, dtype=self.dtype,
        )  # fmt: skip
        self._cache_frames = frames
        self.forwards.cache = self.cache
        self.graph.invalidate()  # captures read the old buffers

    @property
    def graph(self) -> GraphPolicy:
        """The graph policy every forward runs under (held by ``forwards``)."""
        return self.forwards.graph

    @graph.setter
    def graph(self, policy: GraphPolicy) -> None:
        self.forwards.graph = policy

    @property
    def overlap_decode(self) -> bool:
        """Whether the decode really overlaps the commit (asked for, and on CUDA)."""
        return self.decoder.overlap

    @property
    def pipeline_decode(self) -> bool:
        """Whether step n hands out block n - 1's frames (block n decoded beside step n + 1)."""
        return self.decoder.pipeline

    def flush(self) -> torch.Tensor | None:
        """Frames decoded but not handed out yet (``pipeline_decode``: the last block of an
        endless stream that stops), (B, T, 3, H, W), or None."""
        return self.decoder.flush()

    def _latent_size(self, height: int, width: int) -> tuple[int, int]:
        multiple = self.model.spatial_multiple()
        factor = self.vae.spatial_factor * multiple
        for key, value in (("height", height), ("width", width)):
            if value <= 0 or value % factor:
                raise ConfigError(
                    f"rollout.{key}={value} must be a positive multiple of {factor} "
                    f"(VAE factor {self.vae.spatial_factor} x patch {multiple})"
                )
        return height // self.vae.spatial_factor, width // self.vae.spatial_factor

    def cache_tokens_per_frame(self) -> int:
        """DiT tokens per latent frame (after the VAE's and the patch's spatial factors)."""
        return self.model.tokens_per_frame(self.latent_hw)

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
        self.prompt_context.set_prompts(prompts)
        self.seed = self.seed if seed is None else seed
        self.generator = torch.Generator(device=self.device).manual_seed(self.seed)
        if self.cache is not None and self.cache.rolls:
            self._build_cache()  # sized to this clip's frames
        if self.cache is not None:
            self.cache.reset()
        self.vae.reset()
        self.decoder.reset()
        self.graph.reset()
        self.step_index = 0
        if self.history is not None:
            self.history.reset()
        self._prepare_images(images)
        frames = None if self.total_blocks is None else self._clip_frames()
        self.control.prepare(self.batch_size, height=self.height, width=self.width,
                             num_frames=frames, device=self.device)  # fmt: skip

    def _clip_frames(self) -> int:
        """Latent frames of the clip: the prefix and every block (one when endless)."""
        return self.run_frames(self.total_blocks or 1)

    def run_frames(self, total_blocks: int | None) -> int | None:
        """Latent frames of a run of ``total_blocks`` AR steps, prefix included (None: endless)."""
        if total_blocks is None:
            return None
        return self.frame_offset + self.schedule.total(total_blocks)

    def _prepare_images(self, images: list | None) -> None:
        """Image tokens (cross-attention) and latent conditioning of the clip's images."""
        self.prompt_context.set_images(images)
        self.conditioner.prepare(self.images, height=self.height, width=self.width,
                                 num_frames=self._clip_frames(), device=self.device)  # fmt: skip

    def noise(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Next draw of the run's documented noise order."""
        if self._injected_noise is not None:
            return self._injected_noise(shape).to(self.device, torch.float32)
        return torch.randn(shape, generator=self.generator, device=self.device)

    def _encode(self) -> tuple:
        """(conditional context, guidance state) of the current prompts, once per prompt tuple."""
        return self.prompt_context.encode()

    def context(self) -> list:
        """Cross-attention context of the current prompts (encoded once per prompt tuple)."""
        return self.prompt_context.encode()[0]

    def set_prompts(self, prompts: list[str]) -> None:
        """Switch prompts mid-clip (the next forward uses them); other prompts' K/V are freed."""
        self.prompt_context.set_prompts(prompts)

    @property
    def prompts(self) -> list[str]:
        return self.prompt_context.prompts

    @property
    def images(self) -> list | None:
        return self.prompt_context.images

    def set_control(self, control: dict | None) -> None:
        """Live control of the next step (keys, ...), handed to the control encoder."""
        self.control.set_control(control)

    def control_state(self) -> dict | None:
        """What the control applied last (e.g. the camera pose), for the server."""
        return self.control.state()

    # ------------------------------------------------------------------ one AR step
    def _start_frame(self, block: int) -> int:
        """Absolute latent frame where AR block ``block`` starts (after any prefix frames)."""
        return self.frame_offset + self.schedule.start(block)

    def _positions(self, start: int, num: int) -> torch.Tensor:
        return torch.arange(start, start + num, device=self.device)

    def _begin_block(self, start: int, num: int) -> None:
        if self.cache is not None:
            self.cache.begin_block(start, num)

    @torch.no_grad()
    def step(self, sync: bool = False) -> StepOutput:
        """Generate, decode and commit the next block.

        Args:
            sync: synchronise the device at the end of the step (profiling runs only).
        """
        i, fw = self.step_index, self.forwards
        fpb = self.schedule.frames(i)
        timer = StepTimer(i, self.device)
        timer.latent_frames = fpb
        start = self._start_frame(i)
        positions = self._positions(start, fpb)

        timer.start("encode")
        ctx, guided = self._encode()
        prefix = self._commit_prefix(ctx) if i == 0 and self.frame_offset else None
        timer.stop()

        timer.start("control")  # the control's encode of the block (OmniDreams: the HDMap)
        self.control.encode_block(start, fpb)
        timer.stop()

        timer.start("diffuse")
        x = self.noise((self.batch_size, self.model.out_dim, fpb, *self.latent_hw))
        timesteps = self.scheduler.begin_block(self.device)  # (num_steps,)
        positions = self._context(start, fpb, ctx, positions)
        self._begin_block(start, fpb)
        x0 = fw.denoise(x, timesteps, self._expert_plan(timesteps), guided, positions, start,
                        self.scheduler, self.noise)  # fmt: skip
        timer.stop()

        is_last = self.total_blocks is not None and i + 1 >= self.total_blocks
        ahead = None
        if self.prefetch_control and not is_last:  # the next block's control input, ahead
            ahead = (self._start_frame(i + 1), self.schedule.frames(i + 1))
            self.control.read_ahead(*ahead)  # host work while the GPU denoises
            beside_commit = self.control.ahead_beside == "commit" and self.cache is not None
            if not beside_commit:
                self.control.encode_ahead(*ahead)
                ahead = None
        commit = None
        if self.cache is not None and not is_last:

            def commit():
                if ahead is not None:  # its GPU work beside the commit
                    self.control.encode_ahead(*ahead)
                self._begin_block(start, fpb)
                fw.commit(x0, ctx, positions, start, self.context_noise, self.noise)

        out, out_start = x0, start
        if prefix is not None:  # step 0 also emits the conditioner's clean prefix frames
            out, out_start = torch.cat([prefix.to(x0.dtype), x0], dim=2), 0
        if self.history is not None:
            self.history.record(out_start, out)
        frames = self.decoder(out, timer, commit, last=is_last)
        timer.add_parts(self.control.take_parts(), self.control.parts_inside())
        timer.num_frames = 0 if frames is None else frames.shape[1]
        if sync and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.step_index += 1
        return StepOutput(i, out, frames, timer, out_start)

    def _context(self, start: int, num: int, ctx, positions: torch.Tensor) -> torch.Tensor:
        """Reconstituted context (models with ``context_frames``): the history frames the model
        plans are re-run into the emptied cache; returns the block's RoPE positions."""
        if self.history is None or self.cache is None:
            return positions
        plan = self.model.context_plan(start, num, self.forwards.inputs)
        if plan is None:
            return positions
        self.forwards.prefill(plan, self.history.gather(plan.frames), ctx)
        return self._positions(plan.block_position, num)

    def _expert_plan(self, timesteps: torch.Tensor) -> list[int]:
        """Expert of each denoising step, from the scheduler's host list when it has one."""
        host = self.scheduler.host_timesteps()  # a few-step list: no device sync
        return self.model.expert_plan(host if host is not None and len(host) == len(timesteps)
                                      else timesteps)  # fmt: skip

    def _commit_prefix(self, ctx) -> torch.Tensor:
        """Commit the conditioner's clean prefix frames at t = 0 before block 0; return them."""
        prefix = self.conditioner.prefix()  # (B, C, P, h, w)
        p = prefix.shape[2]
        self._begin_block(0, p)
        self.forwards.commit(prefix.float(), ctx, self._positions(0, p), 0, 0.0)
        return prefix

    def precapture(self) -> None:
        """Warm-up before the first step: the model's one-time work outside its forwards
        (``DiT.warm_up``, once per rollout, under every graph policy), then, for graph
        policies that capture, every forward shape of the rollout once: a prefix's commit,
        then the blocks of the schedule in order until their shapes repeat (one per KV length
        while the cache fills, then the steady one: ``Forwards.precapture``)."""
        if not self._warm:
            with torch.no_grad():
                self.model.warm_up(self.device, self.schedule.max_frames)
            self._warm = True
        if not self.graph.wants_precapture(self.device):
            return
        blocks = range(self.total_blocks) if self.total_blocks is not None else count()
        if self.cache is None:
            blocks = range(1)  # bidirectional: one block over the clip
        plan = ((self._start_frame(i), self.schedule.frames(i)) for i in blocks)
        with torch.no_grad():
            self.forwards.precapture(self.context(), plan, self.latent_hw, self._begin_block,
                                     prefix=self.frame_offset if self.cache is not None else 0)  # fmt: skip
        # the decoder's steady calls (its own policy: ``vae.graph=follow``): three blocks reach
        # the steady shape (frame 0 alone and the first block's rest run eager)
        first = min(3, self.total_blocks) if self.total_blocks is not None else 3
        frames = [self.schedule.frames(i) for i in range(first if self.cache is not None else 0)]
        self.vae.warm_up(frames, self.batch_size, self.latent_hw, self.device, self.decoder.dtype)
