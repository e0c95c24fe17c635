"""HY-WorldPlay (HY-World 1.5), Wan2.2-TI2V-5B path: Wan 2.2 5B + actions + PRoPE + memory.

Tencent's action- and camera-controlled world model (``Tencent-Hunyuan/HY-WorldPlay``, folder
``wan/``; weights ``tencent/HY-WorldPlay``). Deltas against Wan2.2-TI2V-5B:

* an action label per latent frame (``trans * 9 + rotate`` in [0, 81)) through the same
  sinusoidal projection as the timestep and its own two-layer MLP (``action_embedding``, the
  release's ``condition_embedder.action_embedder``), added to the time embedding;
* a PRoPE attention branch per block (``flashdreams.model.hy_worldplay.prope``): the block's
  normed q/k/v before RoPE, transformed by the frames' camera projections, attend in the same
  attention call as the RoPE branch (stacked on the batch axis, so the K/V cache holds both
  branches side by side: the cache is built for twice the batch) and leave through their own
  output projection ``self_attn.o_prope`` (``attn1.to_out_prope.0``), added to the RoPE
  branch's output before the gated residual;
* a reconstituted memory (``context_plan``, ``flashdreams.model.hy_worldplay.memory``): before
  every block, chosen clean history frames are re-run at ``memory_timestep`` with RoPE
  positions 0..n-1, attending only to each other; the block follows at position n.

Named inputs: ``action`` (B, F) labels, ``viewmats`` (B, F, 4, 4) world-to-camera matrices,
``intrinsics`` (B, F, 3, 3) normalized intrinsics (control=pose).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from flashdreams import ConfigError
from flashdreams.cache.base import kv_amax
from flashdreams.io.keymap import diffusers_to_wan, looks_like_diffusers
from flashdreams.model.base import ConditionInput, ContextPlan, linear_flops
from flashdreams.model.hy_worldplay.memory import MemoryConfig, select_memory, sphere_points
from flashdreams.model.hy_worldplay.prope import PropeMatrices, apply_tiled, prope_matrices
from flashdreams.model.layers import (
    apply_rope,
    gated_residual,
    layer_norm_fp32,
    modulate,
    sinusoidal_embedding,
)
from flashdreams.model.wan import WanBlock, WanDiT

INPUTS = ("action", "viewmats", "intrinsics")


class PropeStep:
    """The PRoPE transforms of the current forward (set by ``HYWorldPlayDiT.forward``)."""

    mats: PropeMatrices | None = None


class HYWorldPlayBlock(WanBlock):
    """A Wan block whose self-attention runs a RoPE and a PRoPE branch in one call."""

    _compile_regions = ("qkv", "branches", "attn_out", "cross_out_ffn")

    def __init__(self, *args, step: PropeStep, **kw) -> None:
        super().__init__(*args, **kw)
        dim = self.self_attn.q.in_features
        self.self_attn.o_prope = nn.Linear(dim, dim)
        self._step = step  # shared with the model (a plain object, not a submodule)

    def flops(self, q_tokens, kv_tokens, tokens_per_frame, context_tokens):
        """The Wan block's FLOPs plus the PRoPE branch: its output projection, its own
        self-attention (the second half of the batch) and the per-frame 4 x 4 transforms of
        its q, k, v and output (8 FLOPs per element each)."""
        out = super().flops(q_tokens, kv_tokens, tokens_per_frame, context_tokens)
        sa = self.self_attn
        width = sa.q.out_features
        out["linear"] += linear_flops(q_tokens, sa.o_prope) + 4 * 8 * q_tokens * width
        out["attention"] += 4 * q_tokens * kv_tokens * width
        return out

    def kv_flops(self, q_tokens, kv_tokens, tokens_per_frame, context_tokens):
        """``write_kv``: q/k/v and the PRoPE transforms of q, k, v."""
        out = super().kv_flops(q_tokens, kv_tokens, tokens_per_frame, context_tokens)
        out["linear"] += 3 * 8 * q_tokens * self.self_attn.q.out_features
        return out

    def chain_norm1(self, following, x):
        return None  # norm1 is not handed between blocks (the self-attention region is own)

    def qkv(self, x, e0):
        """Region 1: norm1 + modulation, q/k/v projections, q/k RMS norm (before RoPE)."""
        sa = self.self_attn
        shift, scale = self._mod(e0)[:2]
        h = modulate(layer_norm_fp32(x, self.norm1).unflatten(1, (e0.shape[1], -1)), shift, scale)
        q, k, v = sa.project(h.flatten(1, 2).to(sa.q.weight.dtype))
        heads = (sa.num_heads, -1)
        q, k = sa.norm_q(q).unflatten(-1, heads), sa.norm_k(k).unflatten(-1, heads)
        return q, k, v.unflatten(-1, heads)

    def branches(self, q, k, v, cos, sin, m_q, m_kv):
        """Region 2: the RoPE branch's q/k and the PRoPE branch's q/k/v, stacked on the batch
        axis (B rows RoPE, then B rows PRoPE)."""
        q_all = torch.cat([apply_rope(q, cos, sin), apply_tiled(q, m_q)])
        k_all = torch.cat([apply_rope(k, cos, sin), apply_tiled(k, m_kv)])
        return q_all, k_all, torch.cat([v, apply_tiled(v, m_kv)])

    def attn_out(self, x, y, e0, m_o):
        """Region 3: both output projections, gated residual, norm3, cross-attention queries."""
        sa, ca = self.self_attn, self.cross_attn
        b = x.shape[0]
        y_prope = apply_tiled(y[b:], m_o).flatten(2).to(sa.o_prope.weight.dtype)
        out = sa.o(y[:b].flatten(2)).float() + sa.o_prope(y_prope).float()
        x = gated_residual(x, out, self._mod(e0)[2])
        hn = layer_norm_fp32(x, self.norm3) if isinstance(self.norm3, nn.LayerNorm) else x
        return x, ca.norm_q(ca.q(hn.to(ca.q.weight.dtype))).unflatten(-1, (ca.num_heads, -1))

    def forward(self, x, e0, cross_kv, cos, sin, attn, cache=None, layer=0, mask=None, cam=None,
                h=None, next_table=None):  # fmt: skip
        q_all, k_all, v_all, amax = self.self_kv(x, e0, cos, sin, cache, layer)
        y = attn.self_attention(q_all, k_all, v_all, mask, amax)
        x, qc = self.attn_out(x, y, e0, self._step.mats.o)
        return self.cross_out_ffn(x, self.cross_attn.attend(qc, cross_kv, attn), e0, None)

    def self_kv(self, x, e0, cos, sin, cache=None, layer=0, h=None):
        """Both branches stacked on the batch axis (``branches``); the cache holds (2B, Lk, H,
        D): RoPE rows, then PRoPE rows (``WanBlock.self_kv``, so ``write_kv`` is Wan's)."""
        mats = self._step.mats
        q_all, k_all, v_all = self.branches(*self.qkv(x, e0), cos, sin, mats.q, mats.kv)
        if cache is None:
            return q_all, k_all, v_all, None
        kv = cache.update(layer, k_all, v_all)
        return q_all, kv[0], kv[1], kv_amax(kv)


class HYWorldPlayDiT(WanDiT):
    """Wan2.2-TI2V-5B with HY-WorldPlay's action embedding, PRoPE branch and memory.

    Args (besides ``WanDiT``'s):
        context_frames: history frames a block attends to (memory_frames, 16).
        recent_frames: latest frames always in the memory (temporal_context_size, 12).
        block_frames: frames per AR block and per historical clip (4).
        memory_timestep: timestep of the re-run history frames (stabilization_level - 1).
        memory_points, memory_radius, memory_fov_deg, memory_seed: the Monte-Carlo overlap.
    """

    _keep_fp32 = (*WanDiT._keep_fp32, "action_embedding")
    commit_mode = "none"  # no commit: the memory is re-run before every block
    convert_checkpoint = None  # set below (a static function)
    supports_step_cache = False

    def __init__(self, dim: int = 3072, num_heads: int = 24, num_layers: int = 30,
                 ffn_dim: int = 14336, in_dim: int = 48, out_dim: int = 48,
                 text_dim: int = 4096, freq_dim: int = 256, patch_size: Sequence[int] = (1, 2, 2),
                 eps: float = 1e-6, cross_attn_norm: bool = True, text_len: int = 512,
                 rope_max_pos: int = 1024, context_frames: int = 16, recent_frames: int = 12,
                 block_frames: int = 4, memory_timestep: float = 14.0,
                 memory_points: int = 50_000, memory_radius: float = 8.0,
                 memory_fov_deg: Sequence[float] = (60.0, 35.0), memory_seed: int = 0) -> None:  # fmt: skip
        super().__init__(dim=dim, num_heads=num_heads, num_layers=num_layers, ffn_dim=ffn_dim,
                         in_dim=in_dim, out_dim=out_dim, text_dim=text_dim, freq_dim=freq_dim,
                         patch_size=patch_size, eps=eps, cross_attn_norm=cross_attn_norm,
                         text_len=text_len, rope_max_pos=rope_max_pos)  # fmt: skip
        if self.head_dim % 4:
            raise ConfigError(f"model.dim / model.num_heads = {self.head_dim}: PRoPE needs a "
                              "head dim divisible by 4")  # fmt: skip
        if not 0 <= recent_frames <= context_frames:
            raise ConfigError(f"model.recent_frames={recent_frames} must be in "
                              f"[0, model.context_frames={context_frames}]")  # fmt: skip
        if (context_frames - recent_frames) % block_frames:
            raise ConfigError(f"model.context_frames - model.recent_frames = "
                              f"{context_frames - recent_frames} must be whole clips of "
                              f"model.block_frames={block_frames}")  # fmt: skip
        self.context_frames = context_frames
        self.memory = MemoryConfig(context_frames, recent_frames, block_frames, memory_points,
                                   memory_radius, tuple(memory_fov_deg), memory_seed)  # fmt: skip
        self.memory_timestep = float(memory_timestep)
        self._points: torch.Tensor | None = None
        self.action_embedding = nn.Sequential(
            nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim)
        )
        self._step = PropeStep()
        self.blocks = nn.ModuleList(
            HYWorldPlayBlock(dim, ffn_dim, num_heads, eps, cross_attn_norm, False, step=self._step)
            for _ in range(num_layers)
        )

    # ---------------------------------------------------------------- contract
    def inputs(self) -> dict[str, ConditionInput]:
        out = super().inputs()
        out["action"] = ConditionInput.per_frame(
            "action", 0, doc="action label per latent frame (trans * 9 + rotate), control=pose"
        )
        out["viewmats"] = ConditionInput("viewmats", lambda b, f, hw: (b, f, 4, 4),
                                         doc="world-to-camera matrices, control=pose")  # fmt: skip
        out["intrinsics"] = ConditionInput("intrinsics", lambda b, f, hw: (b, f, 3, 3),
                                           doc="normalized intrinsics, control=pose")  # fmt: skip
        return out

    def build_cache(self, factory, **dims):
        """The RoPE and PRoPE branches' K/V side by side: one cache of twice the batch."""
        from flashdreams.cache.context import ContextKVCache

        cache = factory(num_layers=self.num_layers, num_heads=self.num_heads,
                        head_dim=self.head_dim, **{**dims, "batch_size": 2 * dims["batch_size"]})  # fmt: skip
        if cache is not None and not isinstance(cache, ContextKVCache):
            raise ConfigError(f"HY-WorldPlay re-runs its memory before every block: use "
                              f"cache=context (not {type(cache).__name__})")  # fmt: skip
        if cache is not None and cache.context_frames != self.context_frames:
            raise ConfigError(f"cache.context_frames={cache.context_frames} must equal "
                              f"model.context_frames={self.context_frames}")  # fmt: skip
        return cache

    def context_sizes(self, frames_per_block: int) -> list[int]:
        return sorted({min(k * frames_per_block, self.context_frames)
                       for k in range(self.context_frames // frames_per_block + 2)})  # fmt: skip

    def context_plan(self, start, num, inputs) -> ContextPlan:
        if start == 0:
            return ContextPlan((), (), self.memory_timestep, {}, 0)
        given = inputs(0, start + num)
        w2c = given["viewmats"][0].detach().float()  # batch element 0 (the release's), on device
        frames = tuple(select_memory(w2c, start, self.memory, self._memory_points(w2c.device)))
        index = torch.tensor(frames, device=given["viewmats"].device)
        picked = {n: given[n].index_select(1, index) for n in INPUTS}
        return ContextPlan(frames, tuple(range(len(frames))), self.memory_timestep, picked,
                           len(frames))  # fmt: skip

    def _memory_points(self, device: torch.device) -> torch.Tensor:
        """The Monte-Carlo points on ``device`` (drawn once; ``warm_up`` draws them early)."""
        if self._points is None or self._points.device != torch.device(device):
            m = self.memory
            self._points = sphere_points(m.points, m.radius, m.seed).to(device)
        return self._points

    def warm_up(self, device: torch.device, frames_per_block: int) -> None:
        """The memory's one-time costs, paid before the first step: the Monte-Carlo points
        (drawn on the CPU, copied to ``device``) and one selection past the memory over
        stand-in cameras (a straight walk), so the first real selection (block 5 of the
        release's 4-frame blocks) runs only kernels already loaded. On CUDA the selection's
        ``torch.linalg.inv`` is the process's first linear-algebra call, which loads PyTorch's
        lazily loaded CUDA linear-algebra library (cuSOLVER, MAGMA): about 200 ms that block 5
        paid on an H200 before."""
        m, device = self.memory, torch.device(device)
        points = self._memory_points(device)
        start = m.context + m.block  # past the memory: clips are scored
        frames = start + max(frames_per_block, 1)
        w2c = torch.eye(4, device=device).repeat(frames, 1, 1)
        w2c[:, 2, 3] = -0.25 * torch.arange(frames, device=device)  # walking down +z
        select_memory(w2c, start, m, points)

    def embed_flops(self, q_tokens: int, frames: int) -> float:
        """``WanDiT``'s plus the action label's embedding per frame."""
        a = self.action_embedding
        return super().embed_flops(q_tokens, frames) + linear_flops(frames, a[0], a[2])

    # ---------------------------------------------------------------- conditioning
    def condition_time(self, e: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The action label's embedding added per frame (per token: repeated over the frame)."""
        action = inputs.get("action")
        if action is None:
            return e
        b, f = action.shape
        emb = sinusoidal_embedding(action.float().flatten(), self.freq_dim)
        emb = self.action_embedding(emb.to(self.action_embedding[0].weight.dtype)).float()
        emb = emb.view(b, f, -1)
        if e.shape[1] != f:
            emb = emb.repeat_interleave(e.shape[1] // f, dim=1)
        return e + emb

    # ---------------------------------------------------------------- forward
    def forward(self, x, timestep, context, frame_positions=None, cache=None, mask=None,
                inputs=None, expert=0):  # fmt: skip
        inputs = inputs or {}
        missing = [n for n in INPUTS if n not in inputs]
        if missing:
            raise ConfigError(f"HY-WorldPlay needs the inputs {missing} (control=pose)")
        frames = x.shape[2] // self.patch_size[0]
        if inputs["viewmats"].shape[1] != frames:
            raise ValueError(f"viewmats {tuple(inputs['viewmats'].shape)} for {frames} frames")
        self._step.mats = prope_matrices(inputs["viewmats"], inputs["intrinsics"])
        try:
            return super().forward(x, timestep, context, frame_positions, cache, mask, inputs,
                                   expert)  # fmt: skip
        finally:
            self._step.mats = None


# ------------------------------------------------------------------ checkpoints
_EXTRA = (  # release names (diffusers scheme) -> ours
    ("condition_embedder.action_embedder.linear_1.", "action_embedding.0."),
    ("condition_embedder.action_embedder.linear_2.", "action_embedding.2."),
)


def convert_hy_worldplay(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The release's names (diffusers ``wan_transformer/`` or the distilled ``model.pt``, already
    unwrapped) -> ours. A base ``wan_transformer/`` without the action and PRoPE modules gets
    them as the release adds them before loading its fine-tune: zero output layers (and a zero
    first action layer: its output is multiplied by zeros either way)."""
    renamed = {}
    for key, value in state.items():
        for src, dst in _EXTRA:
            if key.startswith(src):
                key = dst + key[len(src) :]
        if ".attn1.to_out_prope.0." in key:
            key = key.replace(".attn1.to_out_prope.0.", ".self_attn.o_prope.")
        renamed[key] = value
    out = diffusers_to_wan(renamed) if looks_like_diffusers(renamed) else renamed
    dim, freq = out["patch_embedding.weight"].shape[0], out["time_embedding.0.weight"].shape[1]
    ref = out["patch_embedding.weight"]
    zeros = {"action_embedding.0.weight": (dim, freq), "action_embedding.0.bias": (dim,),
             "action_embedding.2.weight": (dim, dim), "action_embedding.2.bias": (dim,)}  # fmt: skip
    layers = {int(k.split(".")[1]) for k in out if k.startswith("blocks.")}
    for i in layers:
        zeros[f"blocks.{i}.self_attn.o_prope.weight"] = (dim, dim)
        zeros[f"blocks.{i}.self_attn.o_prope.bias"] = (dim,)
    for key, shape in zeros.items():
        if key not in out:
            out[key] = torch.zeros(shape, dtype=ref.dtype)
    return out


HYWorldPlayDiT.convert_checkpoint = staticmethod(convert_hy_worldplay)
