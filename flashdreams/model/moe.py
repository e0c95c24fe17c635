"""Wan 2.2 A14B: two Wan DiT experts, the high-noise one above a timestep boundary.

Wan 2.2's A14B models (T2V and I2V) are two complete 14B DiTs of the Wan 2.1 architecture. The
high-noise expert denoises while ``t >= boundary * 1000`` (the layout of the clip), the
low-noise expert below (the details); exactly one runs per forward. This wrapper is the model
the rollout sees: it holds both experts, keeps one cross-attention context and one KV cache per
expert, and runs the expert the loop names (``expert=``) or, without one, the expert of the
forward's timestep. Loading and compilation stay outside; the idle-expert offload lives here
because only this wrapper sees which expert the next forward needs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from flashdreams import ConfigError
from flashdreams.attention.base import Attention
from flashdreams.cache.experts import ExpertKVCaches
from flashdreams.model.base import ConditionInput, DiT
from flashdreams.model.wan import WanDiT

HIGH_NOISE, LOW_NOISE = 0, 1  # expert indices
_DIMS = ("dim", "num_heads", "num_layers", "head_dim", "in_dim", "out_dim", "text_dim",
         "text_len", "freq_dim", "patch_size")  # fmt: skip


class WanMoE(DiT):
    """Two ``WanDiT`` experts switched per timestep (Wan2.2-T2V/I2V-A14B: 2 x 14B).

    The cross-attention context of a prompt is one list of per-layer K/V per expert,
    concatenated (``[*high, *low]``, 2 x num_layers entries), so guidance rules and graph
    policies handle it like a single model's context.

    Args:
        boundary: the high-noise expert runs where ``t >= boundary * num_train_timesteps``
            (Wan 2.2 reference: 0.875 for T2V, 0.900 for I2V).
        offload_idle_expert: keep only the expert in use on the device, the other in CPU
            memory; they swap when a forward needs the other one (not with CUDA graphs, which
            replay fixed weight addresses: ``build_rollout`` refuses the combination).
        shared_cross_attn: both experts attend to the high-noise expert's text K/V (FastVideo's
            causal inference fills one cross-attention cache and passes it to both experts);
            False gives each expert its own K/V, as the architecture and the bidirectional
            reference do.
        num_train_timesteps: timestep scale of the boundary (1000 for Wan).
        **wan: the ``WanDiT`` arguments of each expert (both experts share the architecture).
    """

    num_experts = 2
    _keep_fp32 = WanDiT._keep_fp32

    def __init__(self, boundary: float = 0.875, offload_idle_expert: bool = False,
                 shared_cross_attn: bool = False, num_train_timesteps: int = 1000,
                 **wan) -> None:  # fmt: skip
        super().__init__()
        if not 0.0 < float(boundary) < 1.0:
            raise ConfigError(f"model.boundary={boundary} must be in (0, 1): the fraction of "
                              "the timestep range above which the high-noise expert runs")  # fmt: skip
        self.boundary = float(boundary)
        self.boundary_timestep = self.boundary * num_train_timesteps
        self.offload_idle_expert = bool(offload_idle_expert)
        self.shared_cross_attn = bool(shared_cross_attn)
        self.experts = nn.ModuleList([WanDiT(**wan), WanDiT(**wan)])
        for name in _DIMS:
            setattr(self, name, getattr(self.experts[HIGH_NOISE], name))
        self.device: torch.device | None = None  # where the active expert runs (offload)
        self.resident = HIGH_NOISE  # the expert on the device under offload

    # ------------------------------------------------------------------ loop hooks
    def expert_index(self, timestep: float) -> int:
        """Expert of a forward at ``timestep`` (in [0, num_train_timesteps])."""
        return HIGH_NOISE if timestep >= self.boundary_timestep else LOW_NOISE

    def expert_plan(self, timesteps) -> list[int]:
        """Expert of every step of a block's schedule: a host list, or a (num_steps,) tensor
        (read to the host: a device sync when it lives on the GPU)."""
        values = timesteps.tolist() if isinstance(timesteps, torch.Tensor) else timesteps
        return [self.expert_index(float(t)) for t in values]

    def commit_order(self) -> list[int]:
        """Experts the clean commit runs through: all, the one on the device first."""
        return [self.resident, 1 - self.resident]

    def build_cache(self, factory: Callable[..., object], **dims) -> ExpertKVCaches | None:
        """One cache per expert from the recipe's cache factory (None: bidirectional)."""
        caches = [expert.build_cache(factory, **dims) for expert in self.experts]
        return None if caches[0] is None else ExpertKVCaches(caches)

    def inputs(self) -> dict[str, ConditionInput]:
        return self.experts[HIGH_NOISE].inputs()

    def forward_flops(self, q_tokens: int, kv_tokens: int,
                      tokens_per_frame: int) -> dict[str, float]:  # fmt: skip
        """One expert's (a forward runs one; both have the same shape)."""
        return self.experts[HIGH_NOISE].forward_flops(q_tokens, kv_tokens, tokens_per_frame)

    def forward_kv_flops(self, q_tokens: int, kv_tokens: int,
                         tokens_per_frame: int) -> dict[str, float]:  # fmt: skip
        return self.experts[HIGH_NOISE].forward_kv_flops(q_tokens, kv_tokens, tokens_per_frame)

    supports_step_cache = True  # each expert's forward runs its blocks through run_blocks

    def set_step_cache(self, step_cache) -> None:
        """Both experts use the recipe's step cache (its state is kept per expert)."""
        super().set_step_cache(step_cache)
        for expert in self.experts:
            expert.set_step_cache(step_cache)

    def set_attention(self, attention: Attention) -> None:
        """Both experts call the same attention (one runs at a time)."""
        for expert in self.experts:
            expert.set_attention(attention)

    @property
    def blocks(self) -> list[nn.Module]:
        """Every expert's blocks (graph policies compile them in place)."""
        return [block for expert in self.experts for block in expert.blocks]

    @property
    def attention(self) -> Attention:
        return self.experts[HIGH_NOISE].attention

    @attention.setter
    def attention(self, backend) -> None:
        for expert in self.experts:
            expert.attention = backend

    # ------------------------------------------------------------------ placement
    def place(self, device: torch.device) -> None:
        """Record the run's device; under offload, keep only the high-noise expert there."""
        self.device = torch.device(device)
        if self.offload_idle_expert:
            self._host: dict[int, list[torch.Tensor]] = {}
            self._layout: dict[int, list] = {}
            self._move(LOW_NOISE, torch.device("cpu"))
            self._move(HIGH_NOISE, self.device)
            self.resident = HIGH_NOISE

    def _tensors(self, expert: int) -> tuple[list[torch.Tensor], list[nn.Module]]:
        """The tensors an expert owns, and its attentions with a fused QKV.

        A fused QKV (``graph=compile`` fuses after loading) owns one (3 dim, dim) tensor and its
        q/k/v weights are views of it: the fused tensor moves, and the views are re-pointed.
        """
        model = self.experts[expert]
        fused = [m for m in model.modules() if getattr(m, "qkv_weight", None) is not None]
        views = {id(t) for m in fused for layer, _ in m.qkv_rows()
                 for t in (layer.weight, layer.bias)}  # fmt: skip
        tensors = [t for t in (*model.parameters(), *model.buffers()) if id(t) not in views]
        return tensors + [t for m in fused for t in (m.qkv_weight, m.qkv_bias)], fused

    def _move(self, expert: int, device: torch.device) -> None:
        """Point an expert's tensors at ``device``.

        The weights never change during inference, so each expert keeps one host copy (pinned
        when CUDA is present, for fast asynchronous uploads): leaving the device costs nothing,
        arriving is one host-to-device copy per tensor on the current stream. The host copy is
        taken again when the expert's tensors changed since (a fused QKV, FP8 layers).
        """
        tensors, fused = self._tensors(expert)
        layout = [(t.shape, t.dtype) for t in tensors]
        if expert not in self._host or self._layout.get(expert) != layout:
            pin = torch.cuda.is_available()
            self._host[expert] = [t.detach().to("cpu").pin_memory() if pin else
                                  t.detach().to("cpu") for t in tensors]  # fmt: skip
            self._layout[expert] = layout
        for t, host in zip(tensors, self._host[expert], strict=True):
            t.data = host if device.type == "cpu" else host.to(device, non_blocking=True)
        for attn in fused:
            attn.repoint_qkv_views()

    def _activate(self, expert: int) -> WanDiT:
        """The expert, moved onto the device first under offload (the other one leaves)."""
        if self.offload_idle_expert and expert != self.resident and self.device is not None:
            self._move(self.resident, torch.device("cpu"))
            self._move(expert, self.device)
            self.resident = expert
        return self.experts[expert]

    # ------------------------------------------------------------------ forward
    def expert_context(self, context: list, expert: int) -> list:
        """The named expert's per-layer K/V of a ``[*high, *low]`` context (one already
        sliced passes through), so a captured forward holds only its expert's K/V."""
        layers = self.num_layers
        if len(context) == layers:
            return context
        return context[expert * layers : (expert + 1) * layers]

    def prepare_context(self, text: torch.Tensor, image: torch.Tensor | None = None) -> list:
        """Per-layer cross-attention K/V of both experts, ``[*high, *low]``."""
        low = None
        if not self.shared_cross_attn:
            low = self._activate(LOW_NOISE).prepare_context(text, image)
        high = self._activate(HIGH_NOISE).prepare_context(text, image)  # leaves it resident
        return [*high, *(high if low is None else low)]

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, context: list,
                frame_positions: torch.Tensor | None = None, cache=None,
                mask: torch.Tensor | None = None, inputs: dict | None = None,
                expert: int | None = None) -> torch.Tensor:  # fmt: skip
        """One expert's ``WanDiT.forward`` (see there) with its context and KV cache.

        Args:
            expert: 0 = high noise, 1 = low noise; None picks it from the largest timestep
                of ``timestep`` (a host read: the loop names the expert instead).
            cache: ``ExpertKVCaches`` (the named expert's cache is used), one expert's own
                cache (a recache replay names the expert), or None.
            inputs: named conditioning inputs, passed to the expert.
        """
        model, ctx, cache = self._route(timestep, context, cache, expert)
        return model(x, timestep, ctx, frame_positions, cache, mask, inputs)

    kv_only_commit = True  # each expert's forward_kv stops at its last block's cache writes

    def forward_kv(self, x, timestep, context, frame_positions=None, cache=None, mask=None,
                   inputs=None, expert: int | None = None) -> None:  # fmt: skip
        """The named expert's ``WanDiT.forward_kv`` (its context and cache, as ``forward``)."""
        model, ctx, cache = self._route(timestep, context, cache, expert)
        model.forward_kv(x, timestep, ctx, frame_positions, cache, mask, inputs)

    def _route(self, timestep, context: list, cache, expert: int | None):
        """The expert a forward runs (named, or picked from the largest timestep: a host read),
        made resident, with its context and its own cache."""
        if expert is None:
            expert = self.expert_index(float(timestep.max()))
        if isinstance(cache, ExpertKVCaches):
            cache = cache.experts[expert]
        return self._activate(expert), self.expert_context(context, expert), cache
