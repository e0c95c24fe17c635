"""Every DiT forward of a clip: model-input assembly, expert choice, guidance and the commit.

``Forwards`` is the only code that calls the model. The denoising steps, the commit of a
block's clean K/V, the commit of a conditioner's prefix frames, graph pre-capture and the
session's recache (a prompt switch replays commits into the cache) all go through ``run``, so
through the graph policy, the conditioner's ``replace``, the named inputs and the attention's
exact mode alike.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
from collections.abc import Callable, Hashable, Iterable
from itertools import islice

import torch

from flashdreams.conditioner.base import Conditioner
from flashdreams.control.base import ControlEncoder
from flashdreams.graph.base import GraphPolicy
from flashdreams.guidance.base import Guidance
from flashdreams.model.base import DiT

Noise = Callable[[tuple[int, ...]], torch.Tensor]


class Forwards:
    """Runs the model's forwards of one rollout.

    Args:
        model: the DiT (``flashdreams.model.base.DiT``).
        graph: the graph policy every forward runs under.
        guidance: how predictions combine per denoising step.
        conditioner: image conditioning (prefix, replaced frames, named inputs).
        control: live / scripted control (named inputs).
        batch_size: videos generated together.
        dtype: the model's activation dtype.
        device: the run's device.
    """

    def __init__(self, model: DiT, graph: GraphPolicy, guidance: Guidance,
                 conditioner: Conditioner, control: ControlEncoder, *, batch_size: int,
                 dtype: torch.dtype, device: torch.device) -> None:  # fmt: skip
        self.model, self.graph, self.guidance = model, graph, guidance
        self.conditioner, self.control = conditioner, control
        self.batch_size, self.dtype, self.device = batch_size, dtype, device
        self.cache = None  # the rollout's cache (set once the rollout built it)
        self.input_names = sorted({*conditioner.provides(), *control.provides()})

    @property
    def exact_commit(self) -> bool:
        """Whether commits attend differently from denoising forwards (the exact kernel)."""
        return self.model.attention.has_exact_mode

    @property
    def separate_commit(self) -> bool:
        """Whether commits compute differently from denoising forwards (own captured graphs)."""
        return self.exact_commit or self.model.kv_only_commit

    # ------------------------------------------------------------------ inputs
    def inputs(self, start: int, num: int) -> dict[str, torch.Tensor]:
        """Named inputs of latent frames [start, start + num): conditioner's, then control's."""
        return {**self.conditioner.inputs(start, num), **self.control.inputs(start, num)}

    def standin_inputs(self, num: int, latent_hw: tuple[int, int]) -> dict[str, torch.Tensor]:
        """Zeros shaped like ``inputs`` (graph pre-capture: no live trajectory is consumed)."""
        return self.model.standin_inputs(self.input_names, self.batch_size, num, latent_hw,
                                         self.device)  # fmt: skip

    # ------------------------------------------------------------------ one forward
    def _call(self, x, t, ctx, positions, inputs, expert, cache):
        return self.model(x.to(self.dtype), t, ctx, positions, cache, None, inputs, expert)

    def _call_kv(self, x, t, ctx, positions, inputs, expert, cache):
        self.model.forward_kv(x.to(self.dtype), t, ctx, positions, cache, None, inputs, expert)

    def run(self, x, t, ctx, positions, inputs: dict, expert: int = 0, *, commit: bool = False,
            cache=None, capture: bool = True) -> torch.Tensor:  # fmt: skip
        """One forward under the graph policy with the named expert's context.

        Args:
            commit: the forward writes the block's clean K/V for later blocks: it runs inside
                the attention's ``exact()`` (a reduced-precision backend's fallback kernel) as
                the model's ``forward_kv`` (nothing is returned).
            cache: a stand-in for the rollout's cache (a recache replay), else the cache.
            capture: False runs it uncaptured and uncompiled (shapes met once: a replay).
        """
        cache = self.cache if cache is None else cache
        ctx = self.model.expert_context(ctx, expert)
        exact = commit and self.exact_commit
        key: Hashable | None = self.model.graph_key(cache, expert, exact) if capture else None
        if key is not None and commit and self.model.kv_only_commit:
            key = (key, "kv")  # forward_kv: a graph of its own
        fn = self._call_kv if commit else self._call
        with contextlib.ExitStack() as stack:
            if exact:
                stack.enter_context(self.model.attention.exact())
            if not capture:
                stack.enter_context(_eager())
            return self.graph.run(fn, x, t, ctx, positions, inputs, expert, cache, shape_key=key)

    # ------------------------------------------------------------------ a block
    def denoise(self, x: torch.Tensor, timesteps: torch.Tensor, plan: list[int], guided,
                positions: torch.Tensor, start: int, scheduler, noise: Noise) -> torch.Tensor:  # fmt: skip
        """The block's denoising steps from noise ``x``; returns its clean latents."""
        inputs = self.inputs(start, x.shape[2])
        step_cache = self.model.step_cache  # per forward: its step and guidance branch
        step_cache.begin_block(len(plan))
        for j, expert in enumerate(plan):
            t = self.conditioner.timesteps(self.block_timestep(timesteps[j], x.shape[2]), start)
            branches = itertools.count()  # the guidance's forwards of the step, in call order

            def forward(x_in, t_in, ctx, expert=expert, j=j, branches=branches):
                with step_cache.step(j, next(branches), expert):
                    return self.run(x_in, t_in, ctx, positions, inputs, expert)

            x_in = self.conditioner.replace(x, start)
            flow = self.guidance.predict(forward, x_in, t, guided, j, expert=expert)
            x = scheduler.step(flow, x, j, noise)
        return self.conditioner.replace(x, start)

    def block_timestep(self, t: torch.Tensor | float, frames: int) -> torch.Tensor:
        """(B, frames) timesteps of a uniform ``t``."""
        t = torch.as_tensor(t, device=self.device, dtype=torch.float32)
        return t.reshape(1, 1).expand(self.batch_size, frames)

    def commit(self, x0: torch.Tensor, ctx, positions: torch.Tensor, start: int,
               timestep: float, noise: Noise | None = None, *, cache=None,
               capture: bool = True) -> None:  # fmt: skip
        """Write the clean K/V of frames [start, start + F) of ``x0`` (B, C, F, h, w).

        The one commit path: a block after its denoising (``timestep`` = the recipe's context
        noise, re-noised with ``noise`` when above 0), a conditioner's prefix frames (t = 0) and
        the session's recache replays (a stand-in ``cache``, uncaptured). Every expert of
        ``commit_order`` runs, so each expert's cache holds the frames' K/V. Models with
        ``commit_mode == "none"`` keep the K/V their last denoising forward wrote: nothing runs.
        """
        if self.model.commit_mode == "none":
            return
        x = x0
        if timestep > 0 and noise is not None:
            s = timestep / 1000.0
            x = (1 - s) * x0 + s * noise(tuple(x0.shape))
        t = self.block_timestep(timestep, x0.shape[2])
        x, inputs = self.conditioner.replace(x, start), self.inputs(start, x0.shape[2])
        for e in self.model.commit_order():
            self.run(x, t, ctx, positions, inputs, e, commit=True, cache=cache, capture=capture)

    def prefill(self, plan, latents: torch.Tensor | None, ctx, *, capture: bool = True) -> None:
        """A block's reconstituted context (``DiT.context_plan``): the cache is emptied and the
        clean ``latents`` (B, C, n, h, w) of the plan's history frames run once, through every
        expert of ``commit_order``, at the plan's timestep and RoPE positions; they attend only
        to each other and their K/V stay in the cache for the block."""
        n = len(plan.frames)
        self.cache.begin_context(n)
        if n == 0:
            return
        t = self.block_timestep(plan.timestep, n)
        positions = torch.tensor(plan.positions, device=self.device)
        for e in self.model.commit_order():
            self.run(latents, t, ctx, positions, plan.inputs, e, commit=True, capture=capture)

    def precapture(self, ctx, blocks: Iterable[tuple[int, int]], latent_hw: tuple[int, int],
                   begin_block: Callable[[int, int], None], prefix: int = 0) -> None:  # fmt: skip
        """Run the forwards of a run's blocks once, on stand-in inputs: the commit of ``prefix``
        frames at frame 0 (a conditioner's), then each ``(start frame, frames)`` of ``blocks``
        in order until one meets a cache state an earlier block of its size already met (the
        cache is full: every later block repeats it).

        The forwards write only into the slots of the block they pretend to be, which every
        real block overwrites before reading; the cache is reset afterwards. Named inputs are
        stand-ins of the model's declared shapes, so no live control is consumed.
        """
        commits = self.cache is not None and self.model.commit_mode != "none"
        standins: dict[int, tuple] = {}

        def standin(num: int) -> tuple:  # one stand-in per block size
            if num not in standins:
                standins[num] = (
                    torch.zeros(self.batch_size, self.model.out_dim, num, *latent_hw,
                                device=self.device),
                    torch.zeros(self.batch_size, num, device=self.device),
                    self.standin_inputs(num, latent_hw),
                )  # fmt: skip
            return standins[num]

        if self.cache is not None and self.model.context_frames > 0:
            for num in dict.fromkeys(num for _, num in islice(blocks, 2)):  # first, steady
                self._precapture_contexts(ctx, *standin(num), begin_block)
            return

        def forwards(start: int, num: int, *, prefix_commit: bool = False) -> None:
            x, t, inputs = standin(num)
            begin_block(start, num)
            positions = torch.arange(start, start + num, device=self.device)
            for e in self.model.commit_order():
                if not prefix_commit:
                    self.run(x, t, ctx, positions, inputs, e)
                if prefix_commit or (commits and self.separate_commit):
                    self.run(x, t, ctx, positions, inputs, e, commit=True)

        if prefix and commits:
            forwards(0, prefix, prefix_commit=True)
        seen = set()
        for start, num in blocks:
            begin_block(start, num)
            state = (num, *(self.model.graph_key(self.cache, e) for e in self.model.commit_order()))
            if state in seen:
                break
            seen.add(state)
            forwards(start, num)
        if self.cache is not None:
            self.cache.reset()

    def _precapture_contexts(self, ctx, x, t, inputs, begin_block) -> None:
        """Pre-capture of a model that re-runs history (``context_plan``): for every history length
        it may plan, the history forward and the block's forward after it."""
        b, c, fpb, h, w = x.shape
        for n in self.model.context_sizes(fpb):
            self.cache.begin_context(n)
            if n:
                xs, ts = x.new_zeros(b, c, n, h, w), t.new_zeros(b, n)
                pos = torch.arange(n, device=self.device)
                for e in self.model.commit_order():
                    self.run(xs, ts, ctx, pos, self.standin_inputs(n, (h, w)), e, commit=True)
            begin_block(0, fpb)
            positions = torch.arange(n, n + fpb, device=self.device)
            for e in self.model.commit_order():
                self.run(x, t, ctx, positions, inputs, e)
        self.cache.reset()


def _eager():
    """Run compiled modules eagerly (a replay's shapes would otherwise trigger recompiles).

    Nothing can be compiled before ``torch._dynamo`` is imported, and importing it takes
    about a second, so it is only touched when already loaded.
    """
    if "torch._dynamo" not in sys.modules or not hasattr(torch.compiler, "set_stance"):
        return contextlib.nullcontext()
    return torch.compiler.set_stance("force_eager")
