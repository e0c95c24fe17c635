"""The DiT contract: everything the rollout loop, the session and the server rely on.

A model is a ``DiT`` subclass. The loop never probes it (no ``getattr``/``hasattr``): it reads
what the contract declares and calls what the contract defines, with single-expert defaults
here. What a model must say about itself:

* **Shape** (constructor attributes): ``patch_size``, ``in_dim``/``out_dim`` (latent channels
  in and out), ``text_dim``, and the self-attention layout (``cache_layout()``): layers, K/V
  heads, head dim, plus any extra K/V branches with caches of their own (an action module's
  keys, a memory branch), each built from the recipe's cache policy.
* **Named conditioning inputs** (``inputs()``): every tensor a forward may receive besides the
  latents, by name (``camera``, ``action``, ``image_latents``, ...), with its shape in terms of
  the forward's batch, frames and latent size, so the loop can make a stand-in for graph
  pre-capture. Conditioners and control encoders give named tensors; a recipe that gives a name
  the model does not accept, or omits one it requires, fails at build time in one line
  (``check_inputs``).
* **Experts** (``num_experts``, ``expert_plan``, ``commit_order``, ``expert_context``,
  ``build_cache``): which expert runs each denoising step and which ones the clean commit
  passes through (all of them: each expert keeps its own K/V). One expert by default.
* **Commit** (``commit_mode``): ``"forward"`` runs a separate forward of the clean block at the
  commit timestep (Self-Forcing and friends); ``"none"`` keeps the K/V the last denoising
  forward wrote (one-step models that commit as they denoise). Commits (and reconstituted
  context) call ``forward_kv``: only the K/V the forward writes are read, so a model may skip
  what none of them depends on (``kv_only_commit``: the last block after its K/V, the head).
* **Step cache** (``run_blocks``): a model whose forward runs its blocks through
  ``run_blocks(tokens, segment)`` lets the recipe's step cache (``step_cache`` group, set once
  by ``set_step_cache``) skip the middle blocks of a denoising step and reuse their residual
  (``supports_step_cache``). The default runs every block.
* **Reconstituted context** (``context_frames``, ``context_plan``): a model that does not keep
  committed K/V but, before every block, re-runs chosen clean history frames into an emptied
  cache (HY-WorldPlay's memory) says which frames, at which RoPE positions and timestep, and
  where the block goes after them (``ContextPlan``). None by default: the cache holds commits.
* **FLOP count** (``forward_flops``): the FLOPs of one forward of ``q_tokens`` query tokens
  whose self-attention reads ``kv_tokens`` keys, from the model's own modules and shapes (every
  block's GEMMs, every softmax attention, action or camera branches included), split into
  ``linear`` / ``attention`` / ``embed``. ``flashdreams.bench`` divides it by the measured GEMM
  and attention rates: the floor of every model's step (``forward_kv_flops`` for a history
  re-run, which skips what ``forward_kv`` skips).
* **Graph shape key** (``graph_key``): what changes a forward's work besides its tensor shapes
  (the valid KV length; an expert; an exact commit). A captured graph is replayed only for an
  equal key.

The attention the blocks call is set once, in one place (``build.build_rollout`` through
``set_attention``): the backend composed with the parallel policy (``attention.base.Attention``).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from flashdreams import ConfigError
from flashdreams.attention.base import Attention
from flashdreams.step_cache.base import Segment, StepCache

#: (batch, frames, (latent height, latent width)) -> the tensor's shape
ShapeFn = Callable[[int, int, tuple[int, int]], tuple[int, ...]]

#: the parts of ``DiT.forward_flops``: the blocks' GEMMs on the tokens (and per-frame GEMMs
#: inside the blocks), every softmax attention (q.k and p.v), and the GEMMs outside the blocks
#: (patch embedding, head, time and condition embeddings)
FLOP_PARTS = ("linear", "attention", "embed")


def linear_flops(rows: int, *layers: nn.Module) -> float:
    """FLOPs of ``layers`` (each with ``in_features`` / ``out_features``: ``nn.Linear`` and its
    FP8 and fused replacements) applied to ``rows`` rows: 2 x rows x in x out each."""
    return float(2 * rows * sum(layer.in_features * layer.out_features for layer in layers))


def add_flops(*parts: dict[str, float]) -> dict[str, float]:
    """The sum of ``forward_flops``-style dicts (missing parts count 0)."""
    return {k: float(sum(p.get(k, 0.0) for p in parts)) for k in FLOP_PARTS}


@dataclass(frozen=True)
class ConditionInput:
    """A named conditioning input of a forward (see ``DiT.inputs``).

    Args:
        name: the key in the forward's ``inputs`` dict.
        shape: (batch, frames, latent_hw) -> the shape of the tensor of one forward.
        dtype: dtype of the stand-in (the real tensor is cast by the model).
        required: a forward without it is an error (a camera-controlled model without camera).
        doc: one line for error messages and the docs.
    """

    name: str
    shape: ShapeFn
    dtype: torch.dtype = torch.float32
    required: bool = True
    doc: str = ""

    @staticmethod
    def per_latent_pixel(name: str, channels: int, **kw) -> ConditionInput:
        """(B, channels, F, h, w): a feature map at latent resolution (camera rays, image
        latents concatenated to the input)."""
        return ConditionInput(name, lambda b, f, hw: (b, channels, f, *hw), **kw)

    @staticmethod
    def per_frame(name: str, channels: int, **kw) -> ConditionInput:
        """(B, F, channels): one vector (or label, with an integer dtype) per latent frame."""
        if channels == 0:
            return ConditionInput(name, lambda b, f, hw: (b, f), **kw)
        return ConditionInput(name, lambda b, f, hw: (b, f, channels), **kw)

    def standin(self, batch: int, frames: int, latent_hw: tuple[int, int],
                device: torch.device | str) -> torch.Tensor:  # fmt: skip
        """Zeros of the input's shape: what graph pre-capture feeds (no live control used)."""
        return torch.zeros(self.shape(batch, frames, tuple(latent_hw)), dtype=self.dtype,
                           device=device)  # fmt: skip


@dataclass(frozen=True)
class BranchLayout:
    """An extra K/V branch with a cache of its own (e.g. an action module's keys).

    Args:
        num_layers: layers that carry the branch (indexed 0..num_layers-1 by the model).
        num_heads: K/V heads.
        head_dim: dims per head.
        tokens_per_frame: keys one latent frame adds (None: the latent tokens of a frame).
    """

    num_layers: int
    num_heads: int
    head_dim: int
    tokens_per_frame: int | None = None


@dataclass(frozen=True)
class CacheLayout:
    """The K/V a model keeps per latent frame: its self-attention and any extra branches."""

    num_layers: int
    num_heads: int
    head_dim: int
    branches: dict[str, BranchLayout] = field(default_factory=dict)


@dataclass(frozen=True)
class ContextPlan:
    """The reconstituted context of one AR block (``DiT.context_plan``).

    Before the block the loop empties the cache and runs one forward of the clean latents of
    the history ``frames`` (in this order) at ``timestep`` and RoPE ``positions``; they attend
    only to each other and their K/V fill the cache. The block then runs at RoPE positions
    ``block_position ...`` and attends to them and to itself.

    Args:
        frames: absolute latent frames of the history (may be empty: the block attends to
            itself only).
        positions: their RoPE frame positions.
        timestep: the timestep they carry.
        inputs: the named inputs of those frames (gathered by the model, which knows their
            layout), in the order of ``frames``.
        block_position: RoPE frame position of the block's first frame.
    """

    frames: tuple[int, ...]
    positions: tuple[int, ...]
    timestep: float
    inputs: dict[str, torch.Tensor]
    block_position: int


class DiT(nn.Module):
    """Base class of every diffusion transformer the rollout runs.

    Subclasses set, in ``__init__``: ``patch_size`` (pt, ph, pw), ``in_dim``, ``out_dim``,
    ``text_dim``, ``num_layers``, ``num_heads``, ``head_dim``; and implement
    ``prepare_context`` and ``forward``. Everything else has single-expert defaults.

    The forward signature the loop calls::

        forward(x, timestep, context, frame_positions=None, cache=None, mask=None,
                inputs=None, expert=0) -> flow (B, out_dim, F, H, W), fp32

    ``x`` holds ``out_dim`` latent channels (conditioning channels arrive by name in ``inputs``),
    ``timestep`` is (B,), (B, F) or (B, L); ``cache`` is the loop's cache (or a stand-in with
    the same ``update``/``branch``) and ``expert`` the expert named by ``expert_plan``.
    """

    num_experts: int = 1
    commit_mode: str = "forward"  # "forward" | "none" (see the module doc)
    #: whether ``forward_kv`` skips work of ``forward`` (commits then have graphs of their own)
    kv_only_commit: bool = False
    #: renames a checkpoint's state dict to this model's names (a static function), or None for
    #: the Wan key maps of ``flashdreams.io.keymap`` (Wan original, diffusers, Self-Forcing)
    convert_checkpoint: Callable[[dict], dict] | None = None
    #: per-prompt methods of each block (dotted, from the block) that read its weights outside
    #: the block's forward; ``offload=blocks`` keeps the block resident while they run
    block_context_methods: tuple[str, ...] = ("cross_attn.context_kv",)
    #: whether ``forward`` runs its blocks through ``run_blocks`` (a step cache can apply)
    supports_step_cache: bool = False
    #: latent frames of history a block may re-run into the cache before it (``context_plan``);
    #: 0: none, the cache holds the committed K/V of earlier blocks (every model but memory ones)
    context_frames: int = 0
    #: the recipe's step cache (``set_step_cache``); the default runs every block
    step_cache: StepCache = StepCache()
    patch_size: tuple[int, int, int]
    in_dim: int
    out_dim: int
    text_dim: int
    num_layers: int
    num_heads: int
    head_dim: int

    # ------------------------------------------------------------------ shape
    def cache_layout(self) -> CacheLayout:
        """Self-attention K/V per layer (and extra branches); the cache is built from it."""
        return CacheLayout(self.num_layers, self.num_heads, self.head_dim)

    def tokens_per_frame(self, latent_hw: tuple[int, int]) -> int:
        """Tokens of one latent frame of ``latent_hw`` (after the patch)."""
        (h, w), (_, ph, pw) = latent_hw, self.patch_size
        return (h // ph) * (w // pw)

    def spatial_multiple(self) -> int:
        """Latent height and width must be multiples of this (the spatial patch)."""
        return int(self.patch_size[1])

    def forward_flops(self, q_tokens: int, kv_tokens: int,
                      tokens_per_frame: int) -> dict[str, float]:  # fmt: skip
        """FLOPs of one forward of ``q_tokens`` query tokens (whole latent frames of
        ``tokens_per_frame`` tokens) whose self-attention reads ``kv_tokens`` keys (the cache's
        valid keys plus the block's; ``q_tokens`` for a bidirectional forward), with every
        named input given. Keys ``FLOP_PARTS``: ``linear`` (the blocks' GEMMs), ``attention``
        (every softmax attention, 4 x queries x keys x width), ``embed`` (GEMMs outside the
        blocks). Per-prompt work (``prepare_context``) is not counted; elementwise work (norms,
        RoPE, modulation) is not counted."""
        raise NotImplementedError(f"{type(self).__name__} does not count its FLOPs "
                                  "(DiT.forward_flops)")  # fmt: skip

    def forward_kv_flops(self, q_tokens: int, kv_tokens: int,
                         tokens_per_frame: int) -> dict[str, float]:  # fmt: skip
        """``forward_flops`` of a ``forward_kv`` (a history re-run's floor): the whole forward
        unless the model skips work there (``kv_only_commit``) and counts what it skips."""
        return self.forward_flops(q_tokens, kv_tokens, tokens_per_frame)

    # ------------------------------------------------------------------ inputs
    def inputs(self) -> dict[str, ConditionInput]:
        """Named conditioning inputs a forward accepts (none by default)."""
        return {}

    def check_inputs(self, given: dict[str, str]) -> None:
        """One-line ``ConfigError`` unless ``given`` (input name -> the config option that
        gives it) matches ``inputs()``: nothing unknown, nothing required missing."""
        accepted = self.inputs()
        model = type(self).__name__
        for name, source in given.items():
            if name not in accepted:
                names = ", ".join(sorted(accepted)) or "none"
                raise ConfigError(f"{source} gives the conditioning input {name!r}, which the "
                                  f"model ({model}) does not accept (it accepts: {names})")  # fmt: skip
        for name, spec in accepted.items():
            if spec.required and name not in given:
                what = f" ({spec.doc})" if spec.doc else ""
                raise ConfigError(f"the model ({model}) needs the conditioning input {name!r}"
                                  f"{what}, which no conditioner or control of the recipe "
                                  "gives")  # fmt: skip

    def standin_inputs(self, names, batch: int, frames: int, latent_hw: tuple[int, int],
                       device) -> dict[str, torch.Tensor]:  # fmt: skip
        """Stand-ins of the named inputs (graph pre-capture)."""
        accepted = self.inputs()
        return {n: accepted[n].standin(batch, frames, latent_hw, device) for n in names}

    # ------------------------------------------------------------------ experts
    def expert_plan(self, timesteps: Sequence[float] | torch.Tensor) -> list[int]:
        """Expert of every denoising step of a block (host floats or a (steps,) tensor)."""
        return [0] * len(timesteps)

    def commit_order(self) -> list[int]:
        """Experts the clean commit runs through, in order."""
        return list(range(self.num_experts))

    def expert_context(self, context, expert: int):
        """The part of a prompt's context the named expert reads (the whole of it here)."""
        return context

    def build_cache(self, factory: Callable[..., object], **dims):
        """The loop's cache from the recipe's cache factory and ``cache_layout()``.

        ``dims`` are the run's (``tokens_per_frame``, ``frames_per_block``, ``total_frames``,
        ``batch_size``, ``device``, ``dtype``); the layout adds layers, heads and head dim. Extra
        branches get caches of their own (``BranchedKVCache``). None: no cache (bidirectional).
        """
        from flashdreams.cache.branches import BranchedKVCache

        layout = self.cache_layout()
        main = factory(num_layers=layout.num_layers, num_heads=layout.num_heads,
                       head_dim=layout.head_dim, **dims)  # fmt: skip
        if main is None or not layout.branches:
            return main
        branches = {}
        for name, b in layout.branches.items():
            tokens = dims["tokens_per_frame"] if b.tokens_per_frame is None else b.tokens_per_frame
            branches[name] = factory(**{**dims, "num_layers": b.num_layers,
                                        "num_heads": b.num_heads, "head_dim": b.head_dim,
                                        "tokens_per_frame": tokens})  # fmt: skip
        return BranchedKVCache(main, branches)

    # ------------------------------------------------------------------ context
    def context_plan(self, start: int, num: int,
                     inputs: Callable[[int, int], dict[str, torch.Tensor]]) -> ContextPlan | None:  # fmt: skip
        """The reconstituted context of the block of frames [start, start + num), or None (the
        default: the block attends to the cache's committed K/V). Called only when
        ``context_frames > 0``; ``inputs(s, n)`` gives the named inputs of frames [s, s + n)
        (history and the block itself: a memory may select by the block's camera)."""
        return None

    def context_sizes(self, frames_per_block: int) -> list[int]:
        """Every history length a ``ContextPlan`` may have (graph pre-capture runs each)."""
        return [0]

    def warm_up(self, device: torch.device, frames_per_block: int) -> None:
        """One-time work outside the forwards that would otherwise land in the first step that
        needs it (lazily drawn constants, a library loaded on its first call), done by
        ``Rollout.precapture`` under every graph policy before any step. Nothing by default."""

    # ------------------------------------------------------------------ graphs
    def graph_key(self, cache, expert: int = 0, exact: bool = False) -> Hashable:
        """What besides tensor shapes changes a forward's work: the valid KV length, the
        expert (several experts only) and an exact commit."""
        key: Hashable = 0 if cache is None else cache.valid_tokens
        if self.num_experts > 1:
            key = (key, expert)
        return (key, "exact") if exact else key

    # ------------------------------------------------------------------ attention
    def set_attention(self, attention: Attention) -> None:
        """Install the attention the blocks call (backend + parallel policy, composed)."""
        self._attention = attention

    @property
    def attention(self) -> Attention:
        """The attention the blocks call (a model sets a one-process default at construction)."""
        return self._attention

    @attention.setter
    def attention(self, backend) -> None:
        """A bare backend runs on one process (tests, micro-benchmarks)."""
        self._attention = backend if isinstance(backend, Attention) else Attention(backend)

    # ------------------------------------------------------------------ step cache
    def set_step_cache(self, step_cache: StepCache) -> None:
        """Install the recipe's step cache; one-line ``ConfigError`` when the model's forward
        does not run its blocks through ``run_blocks``."""
        if step_cache.enabled and not self.supports_step_cache:
            raise ConfigError(f"step_cache={step_cache.name} is not supported by the model "
                              f"({type(self).__name__}); use step_cache=none")  # fmt: skip
        self.step_cache = step_cache

    def run_blocks(self, tokens: torch.Tensor, segment: Segment) -> torch.Tensor:
        """The residual stream after all ``num_layers`` blocks: ``segment(tokens, start, stop)``
        runs blocks [start, stop); the step cache chooses which segments run (deciding on the
        whole sequence under context parallelism: ``SequenceParallel.total``)."""
        total = self.attention.sequence.total
        return self.step_cache.run(tokens, segment, self.num_layers, total)

    def forward_kv(self, x, timestep, context, frame_positions=None, cache=None, mask=None,
                   inputs=None, expert: int = 0) -> None:  # fmt: skip
        """A forward whose only effect is the K/V it writes into ``cache`` (a commit, a
        reconstituted context): the same K/V as ``forward``'s, no output. The default runs
        ``forward``; a model that skips work sets ``kv_only_commit``."""
        self.forward(x, timestep, context, frame_positions, cache, mask, inputs, expert)

    # ------------------------------------------------------------------ conditioning / forward
    def prepare_context(self, text: torch.Tensor, image: torch.Tensor | None = None):
        """Per-prompt cross-attention state (computed once per prompt)."""
        raise NotImplementedError
