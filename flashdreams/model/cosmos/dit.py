"""The Cosmos-Predict2.5 DiT (2B: 2048 channels, 28 blocks, 16 heads), sized by config.

Differences from Wan's DiT: a linear patch embedding over the latents plus a condition-mask
channel and a padding-mask channel; per block three non-affine LayerNorms, each modulated by an
AdaLN-LoRA MLP (SiLU -> dim -> 256 -> 3 dim) plus the shared time embedding; q/k/v/o without
bias and an RMS norm per head on q and k; a bias-free GELU MLP (x4); Cosmos' 3-D RoPE
(``rope.py``); text from Cosmos-Reason1 (all layers, 100352 wide) through ``crossattn_proj``
(Linear to 1024 + GELU); a time embedding of ``t * timestep_scale`` whose sinusoid also
passes through its own RMS norm (the input of every AdaLN-LoRA MLP).

Parameter names follow the native release (``net.`` stripped) except three top-level modules:
``patch_embed`` (native ``x_embedder.proj.1``), ``t_embedder`` (``t_embedder.1``) and
``t_norm`` (``t_embedding_norm``); ``flashdreams.io.cosmos_keymap`` converts both the native
and diffusers' ``CosmosTransformer3DModel`` names.

Numerics follow the Wan port of this package: the residual stream, norms and modulation run in
fp32, matmuls in the weights' dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from flashdreams import ConfigError
from flashdreams.attention.base import Attention
from flashdreams.attention.sdpa import SdpaAttention
from flashdreams.cache.base import kv_amax
from flashdreams.io.cosmos_keymap import cosmos_to_flashdreams
from flashdreams.model.base import ConditionInput, DiT, add_flops, linear_flops
from flashdreams.model.cosmos.rope import CosmosRope3D, apply_rope_half
from flashdreams.model.layers import gated_residual, modulate, sinusoidal_embedding

CrossKV = tuple[torch.Tensor, torch.Tensor]  # (k, v), each (B, Lc, H, D)


def _linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """Apply ``layer`` in its weight dtype."""
    return layer(x.to(layer.weight.dtype))


class HeadRMSNorm(nn.Module):
    """RMS norm over the last dim (one head) with a learned scale, computed in fp32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps)
        return out.to(x.dtype)


class CosmosAttention(nn.Module):
    """q/k/v/o projections without bias, per-head RMS norm on q and k (self or cross).

    A self-attention (``self_attention``) has a ``qkv`` slot: ``precision=fp8`` installs one
    fused e4m3 q/k/v GEMM there (``qkv_names`` names the projections it fuses).
    """

    qkv_names = ("q_proj", "k_proj", "v_proj")

    def __init__(self, dim: int, context_dim: int, num_heads: int, eps: float,
                 self_attention: bool = False) -> None:  # fmt: skip
        super().__init__()
        if self_attention:
            self.qkv: nn.Module | None = None  # a fused q/k/v module (precision=fp8)
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(context_dim, dim, bias=False)
        self.v_proj = nn.Linear(context_dim, dim, bias=False)
        self.output_proj = nn.Linear(dim, dim, bias=False)
        self.q_norm = HeadRMSNorm(head_dim, eps)
        self.k_norm = HeadRMSNorm(head_dim, eps)
        self.qkv_weight: torch.Tensor | None = None  # (3 dim, dim) once fused (self-attention)

    @torch.no_grad()
    def fuse_qkv(self) -> None:
        """Self-attention: q/k/v as one (3 dim, dim) GEMM; q/k/v_proj become views of it.
        Skipped when a projection was replaced (precision=fp8) or once fused."""
        layers = (self.q_proj, self.k_proj, self.v_proj)
        if self.qkv_weight is not None or any(type(x) is not nn.Linear for x in layers):
            return
        self.qkv_weight = torch.cat([x.weight for x in layers])
        dim = self.q_proj.out_features
        for i, layer in enumerate(layers):
            layer.weight = nn.Parameter(self.qkv_weight[i * dim : (i + 1) * dim],
                                        requires_grad=False)  # fmt: skip

    def project(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Self-attention q, k, v (B, L, H, D) of (B, L, C) tokens, q and k normalized."""
        heads = (self.num_heads, -1)
        if getattr(self, "qkv", None) is not None:
            q, k, v = self.qkv(h.to(self.qkv.weight.dtype)).chunk(3, dim=-1)
        elif self.qkv_weight is not None:
            q, k, v = F.linear(h.to(self.qkv_weight.dtype), self.qkv_weight).chunk(3, dim=-1)
        else:
            q, k, v = (_linear(x, h) for x in (self.q_proj, self.k_proj, self.v_proj))
        q, k, v = (t.unflatten(-1, heads) for t in (q, k, v))
        return self.q_norm(q), self.k_norm(k), v

    def query(self, h: torch.Tensor) -> torch.Tensor:
        """(B, L, H, D) normalized queries of (B, L, C) tokens."""
        return self.q_norm(_linear(self.q_proj, h).unflatten(-1, (self.num_heads, -1)))

    def context_kv(self, h: torch.Tensor) -> CrossKV:
        """(B, L, H, D) normalized keys and values of (B, L, C) context tokens (per prompt)."""
        heads = (self.num_heads, -1)
        k = self.k_norm(_linear(self.k_proj, h).unflatten(-1, heads))
        return k, _linear(self.v_proj, h).unflatten(-1, heads)


class _ModLinear(nn.Linear):
    """A linear of the AdaLN-LoRA modulation: one row per frame, kept in its dtype
    (``precision=fp8`` swaps only plain ``nn.Linear`` layers)."""


def adaln_lora(dim: int, lora_dim: int, chunks: int) -> nn.Sequential:
    """SiLU -> Linear(dim, lora_dim) -> Linear(lora_dim, chunks * dim), bias-free."""
    return nn.Sequential(
        nn.SiLU(),
        _ModLinear(dim, lora_dim, bias=False),
        _ModLinear(lora_dim, chunks * dim, bias=False),
    )


def _lora(seq: nn.Sequential, emb: torch.Tensor) -> torch.Tensor:
    """The AdaLN-LoRA MLP on (B, G, C) ``emb``, fp32 out."""
    return _linear(seq[2], _linear(seq[1], seq[0](emb))).float()


class CosmosBlock(nn.Module):
    """Self-attention, cross-attention and MLP, each behind a modulated non-affine LayerNorm
    and a gated residual; fp32 residual stream.

    As ``WanBlock``, three attention-free regions of static shapes (every norm, modulation,
    RoPE, projection and residual) around the two attention calls; a graph policy may compile
    them (``_compile_regions``) while attention stays on its kernel and the KV cache's length.
    """

    _compile_regions = ("self_attn_in", "self_attn_out", "cross_out_mlp")

    def __init__(self, dim: int, context_dim: int, num_heads: int, ffn_dim: int,
                 lora_dim: int, eps: float, qk_eps: float) -> None:  # fmt: skip
        super().__init__()
        self.layer_norm_self_attn = nn.LayerNorm(dim, eps, elementwise_affine=False)
        self.layer_norm_cross_attn = nn.LayerNorm(dim, eps, elementwise_affine=False)
        self.layer_norm_mlp = nn.LayerNorm(dim, eps, elementwise_affine=False)
        self.self_attn = CosmosAttention(dim, dim, num_heads, qk_eps, self_attention=True)
        self.cross_attn = CosmosAttention(dim, context_dim, num_heads, qk_eps)
        self.mlp = nn.Module()
        self.mlp.layer1 = nn.Linear(dim, ffn_dim, bias=False)
        self.mlp.act = nn.GELU()  # no parameters; FP8 may fold it into layer2 (act_chain)
        self.mlp.layer2 = nn.Linear(ffn_dim, dim, bias=False)
        self.mlp.act_chain = ("layer1", "act", "layer2")
        self.adaln_modulation_self_attn = adaln_lora(dim, lora_dim, 3)
        self.adaln_modulation_cross_attn = adaln_lora(dim, lora_dim, 3)
        self.adaln_modulation_mlp = adaln_lora(dim, lora_dim, 3)

    def modulation(self, emb: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """(B, G, 9, C) fp32: shift, scale, gate of self-attention, cross-attention and MLP,
        each its LoRA of ``emb`` plus the time embedding ``temb`` (B, G, 3C)."""
        loras = (self.adaln_modulation_self_attn, self.adaln_modulation_cross_attn,
                 self.adaln_modulation_mlp)  # fmt: skip
        mods = [(_lora(m, emb) + temb).unflatten(-1, (3, -1)) for m in loras]
        return torch.cat(mods, dim=2)

    @staticmethod
    def _norm(x: torch.Tensor, norm: nn.LayerNorm, shift, scale) -> torch.Tensor:
        h = F.layer_norm(x.float(), norm.normalized_shape, eps=norm.eps)
        return modulate(h.unflatten(1, (shift.shape[1], -1)), shift, scale).flatten(1, 2)

    def self_attn_in(self, x, mod, cos, sin):
        """Region 1: norm + modulation, q/k/v projections, q/k RMS norm, RoPE."""
        sa = self.self_attn
        h = self._norm(x, self.layer_norm_self_attn, mod[:, :, 0], mod[:, :, 1])
        q, k, v = sa.project(h.to(sa.output_proj.weight.dtype))
        return apply_rope_half(q, cos, sin), apply_rope_half(k, cos, sin), v

    def self_attn_out(self, x, y, mod):
        """Region 2: output projection + gated residual, norm + modulation, cross queries."""
        ca = self.cross_attn
        x = gated_residual(x, _linear(self.self_attn.output_proj, y.flatten(2)), mod[:, :, 2])
        h = self._norm(x, self.layer_norm_cross_attn, mod[:, :, 3], mod[:, :, 4])
        return x, ca.query(h)

    def cross_out_mlp(self, x, y, mod):
        """Region 3: cross output + gated residual, norm + modulation, GELU MLP, residual."""
        x = gated_residual(x, _linear(self.cross_attn.output_proj, y.flatten(2)), mod[:, :, 5])
        h = self._norm(x, self.layer_norm_mlp, mod[:, :, 6], mod[:, :, 7])
        y = _linear(self.mlp.layer2, self.mlp.act(_linear(self.mlp.layer1, h)))
        return gated_residual(x, y, mod[:, :, 8])

    def flops(self, q_tokens: int, kv_tokens: int, tokens_per_frame: int,
              context_tokens: int) -> dict[str, float]:  # fmt: skip
        """FLOPs of this block (``DiT.forward_flops``): q/k/v/o, the cross queries and output
        and the MLP per token, the three AdaLN-LoRA MLPs per frame, self-attention over
        ``kv_tokens`` keys and cross-attention to ``context_tokens`` keys."""
        sa, ca = self.self_attn, self.cross_attn
        frames = q_tokens // tokens_per_frame
        linear = linear_flops(q_tokens, sa.q_proj, sa.k_proj, sa.v_proj, sa.output_proj,
                              ca.q_proj, ca.output_proj, self.mlp.layer1, self.mlp.layer2)  # fmt: skip
        loras = (self.adaln_modulation_self_attn, self.adaln_modulation_cross_attn,
                 self.adaln_modulation_mlp)  # fmt: skip
        linear += linear_flops(frames, *(m[i] for m in loras for i in (1, 2)))
        width = sa.q_proj.out_features
        return {"linear": linear,
                "attention": float(4 * q_tokens * (kv_tokens + context_tokens) * width)}  # fmt: skip

    def forward(self, x, emb, temb, cross_kv: CrossKV, cos, sin, attn: Attention, cache=None,
                layer: int = 0, mask=None) -> torch.Tensor:  # fmt: skip
        # x: (B, L, C) fp32 residual stream; emb (B, G, C), temb (B, G, 3C): time embedding
        # per frame (G frames); the modulation is one row per frame, cheap
        mod = self.modulation(emb, temb)
        q, k, v = self.self_attn_in(x, mod, cos, sin)
        amax = None
        if cache is not None:
            kv = cache.update(layer, k, v)  # (B, Lk, H, D): sink + window + this block
            k, v, amax = kv[0], kv[1], kv_amax(kv)
        x, q = self.self_attn_out(x, attn.self_attention(q, k, v, mask, amax), mod)
        return self.cross_out_mlp(x, attn.cross_attention(q, *cross_kv), mod)

    def write_kv(self, x, emb, temb, cos, sin, attn: Attention, cache, layer: int,
                 mask=None) -> None:  # fmt: skip
        """The block's K/V into ``cache`` and nothing after them (the last block of a
        ``forward_kv``); the self-attention still runs where the K/V need it to land."""
        mod = self.modulation(emb, temb)
        q, k, v = self.self_attn_in(x, mod, cos, sin)
        kv = cache.update(layer, k, v)
        if not attn.kv_written_at_update:
            attn.self_attention(q, kv[0], kv[1], mask, kv_amax(kv))


class CosmosFinalLayer(nn.Module):
    """Modulated non-affine LayerNorm + bias-free projection to patch pixels."""

    def __init__(self, dim: int, out_channels: int, lora_dim: int, eps: float) -> None:
        super().__init__()
        self.layer_norm = nn.LayerNorm(dim, eps, elementwise_affine=False)
        self.adaln_modulation = adaln_lora(dim, lora_dim, 2)
        self.linear = nn.Linear(dim, out_channels, bias=False)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        out = _lora(self.adaln_modulation, emb)
        shift, scale = (out + temb[..., : out.shape[-1]]).chunk(2, dim=-1)
        h = CosmosBlock._norm(x, self.layer_norm, shift, scale)
        return F.linear(h, self.linear.weight.float())


class CosmosDiT(DiT):
    """Cosmos-Predict2.5 text/video-to-world DiT with a bidirectional and a block-causal AR
    forward sharing every weight (as ``WanDiT``).

    Named conditioning inputs (``inputs()``): ``condition_mask`` (B, 1, F, h, w), 1 on the
    latent frames given as conditioning (Video2World), zeros when absent (Text2World). The
    padding-mask channel is all zeros (the clip fills the frame, as the official pipelines).

    Args:
        dim: hidden width (2B: 2048).
        num_heads: attention heads (2B: 16 x 128).
        num_layers: transformer blocks (2B: 28).
        ffn_dim: MLP hidden width (2B: 8192, 4 x dim); None: 4 x dim.
        in_dim: latent channels in (16; ``x`` holds these).
        out_dim: latent channels out (16).
        text_dim: width of the text embeddings fed in (Reason1 all layers: 100352). With
            ``use_crossattn_projection`` they pass ``crossattn_proj`` to ``context_dim``.
        context_dim: width of the cross-attention context (1024).
        use_crossattn_projection: Predict2.5's Linear(text_dim, context_dim) + GELU.
        adaln_lora_dim: rank of the AdaLN-LoRA MLPs (256).
        patch_size: (pt, ph, pw).
        condition_mask_channel: whether the patch embedding takes the condition-mask channel.
        concat_padding_mask: whether it takes the padding-mask channel.
        rope_scale: RoPE extrapolation ratios (frame, height, width).
        rope_fps_modulation: scale frame positions by ``base_fps / fps``.
        fps: the clip's frame rate for the modulation; ``base_fps``: the trained one.
        timestep_scale: the network sees ``t * timestep_scale`` (0.001: t in [0, 1000]).
        eps: LayerNorm / time RMS norm epsilon; ``qk_eps``: q/k RMS norm epsilon.
        text_len: text tokens of a prompt (for stand-ins and the text encoders).

    Attributes:
        _keep_fp32: name substrings of parameters kept in fp32 when the model is cast.
    """

    _keep_fp32 = ("norm", "adaln_modulation", "t_embedder")
    supports_step_cache = True
    kv_only_commit = True  # forward_kv stops at the last block's K/V
    #: ``write_kv`` reads a block's weights outside its forward (``offload=blocks``)
    block_context_methods = ("cross_attn.context_kv", "write_kv")
    #: the loader's renaming of checkpoint tensors (native ``net.*`` or diffusers names)
    convert_checkpoint = staticmethod(cosmos_to_flashdreams)

    def __init__(
        self,
        dim: int = 2048,
        num_heads: int = 16,
        num_layers: int = 28,
        ffn_dim: int | None = None,
        in_dim: int = 16,
        out_dim: int = 16,
        text_dim: int = 100352,
        context_dim: int = 1024,
        use_crossattn_projection: bool = True,
        adaln_lora_dim: int = 256,
        patch_size: Sequence[int] = (1, 2, 2),
        condition_mask_channel: bool = True,
        concat_padding_mask: bool = True,
        rope_scale: Sequence[float] = (1.0, 3.0, 3.0),
        rope_fps_modulation: bool = False,
        fps: float = 24.0,
        base_fps: float = 24.0,
        timestep_scale: float = 0.001,
        eps: float = 1e-6,
        qk_eps: float = 1e-6,
        text_len: int = 512,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"model.dim={dim} is not a multiple of model.num_heads={num_heads}")
        self.dim, self.num_heads, self.num_layers = dim, num_heads, num_layers
        self.head_dim = dim // num_heads
        self.ffn_dim = 4 * dim if ffn_dim is None else ffn_dim
        self.in_dim, self.out_dim = in_dim, out_dim
        self.text_dim, self.context_dim, self.text_len = text_dim, context_dim, text_len
        self.patch_size = tuple(int(p) for p in patch_size)
        self.condition_mask_channel = condition_mask_channel
        self.concat_padding_mask = concat_padding_mask
        self.timestep_scale = timestep_scale
        patch_in = in_dim + int(condition_mask_channel) + int(concat_padding_mask)
        pt, ph, pw = self.patch_size
        self.patch_embed = nn.Linear(patch_in * pt * ph * pw, dim, bias=False)
        self.t_embedder = nn.Module()
        self.t_embedder.linear_1 = nn.Linear(dim, dim, bias=False)
        self.t_embedder.linear_2 = nn.Linear(dim, 3 * dim, bias=False)
        self.t_norm = HeadRMSNorm(dim, eps)
        if use_crossattn_projection:
            self.crossattn_proj = nn.Sequential(nn.Linear(text_dim, context_dim), nn.GELU())
        elif text_dim != context_dim:
            raise ConfigError(f"model.text_dim={text_dim} differs from model.context_dim="
                              f"{context_dim}: set model.use_crossattn_projection=true")  # fmt: skip
        self.blocks = nn.ModuleList(
            CosmosBlock(dim, context_dim, num_heads, self.ffn_dim, adaln_lora_dim, eps, qk_eps)
            for _ in range(num_layers)
        )
        self.final_layer = CosmosFinalLayer(dim, pt * ph * pw * out_dim, adaln_lora_dim, eps)
        self.rope = CosmosRope3D(self.head_dim, rope_scale, rope_fps_modulation, base_fps, fps)
        self._attention = Attention(SdpaAttention())  # set_attention installs the run's

    # ---------------------------------------------------------------- contract
    def inputs(self) -> dict[str, ConditionInput]:
        if not self.condition_mask_channel:
            return {}
        return {"condition_mask": ConditionInput.per_latent_pixel(
            "condition_mask", 1, required=False,
            doc="1 on the given latent frames (Video2World): conditioner=cosmos_video")}  # fmt: skip

    def forward_flops(self, q_tokens: int, kv_tokens: int,
                      tokens_per_frame: int) -> dict[str, float]:  # fmt: skip
        frames = q_tokens // tokens_per_frame
        blocks = [b.flops(q_tokens, kv_tokens, tokens_per_frame, self.text_len)
                  for b in self.blocks]  # fmt: skip
        return add_flops(*blocks, {"embed": self.embed_flops(q_tokens, frames)})

    def embed_flops(self, q_tokens: int, frames: int) -> float:
        """GEMMs outside the blocks: the patch embedding and the final projection per token,
        the time MLP and the final layer's AdaLN-LoRA per frame."""
        te, final = self.t_embedder, self.final_layer
        flops = linear_flops(q_tokens, self.patch_embed, final.linear)
        return flops + linear_flops(frames, te.linear_1, te.linear_2,
                                    final.adaln_modulation[1], final.adaln_modulation[2])  # fmt: skip

    # ---------------------------------------------------------------- weights
    @torch.no_grad()
    def init_weights(self, generator: torch.Generator) -> None:
        """Seeded random weights (benchmarks, tests): norm scales 1, biases 0, matrices with
        a xavier-normal scale; drawn on ``generator``'s device in fp32."""
        on = generator.device
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim == 1:
                p.fill_(1.0)
            else:
                std = (2.0 / (p.shape[1] + p.shape[0])) ** 0.5
                p.copy_(torch.randn(p.shape, generator=generator, device=on) * std)

    # ---------------------------------------------------------------- conditioning
    def prepare_context(self, text: torch.Tensor, image: torch.Tensor | None = None) -> list:
        """Per-layer cross-attention K/V of a prompt, computed once.

        Args:
            text: (B, Lt, text_dim) text embeddings (Reason1 hidden states, all layers).
            image: unused (Predict2.5 has no image cross-attention); must be None.
        """
        if image is not None:
            raise ConfigError("CosmosDiT has no image cross-attention: use image_encoder=none "
                              "(Image2World is conditioner=cosmos_video)")  # fmt: skip
        if hasattr(self, "crossattn_proj"):
            text = self.crossattn_proj(text.to(self.crossattn_proj[0].weight.dtype))
        return [blk.cross_attn.context_kv(text) for blk in self.blocks]

    def time_embedding(self, timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(emb, temb): the RMS-normed sinusoid (B, G, C) and the time MLP's (B, G, 3C), fp32."""
        b, g = timestep.shape
        sin = sinusoidal_embedding(timestep.flatten().float() * self.timestep_scale, self.dim)
        te = self.t_embedder
        temb = _linear(te.linear_2, F.silu(_linear(te.linear_1, sin))).float()
        emb = self.t_norm(sin).float()
        return emb.view(b, g, -1), temb.view(b, g, -1)

    def patchify(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """(B, C, F, H, W) latents (+ condition / padding mask channels) -> (B, L, dim)."""
        b, _, f, h, w = x.shape
        parts = [x.float()]
        if self.condition_mask_channel:
            parts.append(x.new_zeros(b, 1, f, h, w, dtype=torch.float32) if mask is None
                         else mask.float().expand(b, 1, f, h, w))  # fmt: skip
        if self.concat_padding_mask:
            parts.append(x.new_zeros(b, 1, f, h, w, dtype=torch.float32))
        return _linear(self.patch_embed, self.patches(torch.cat(parts, dim=1))).float()

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, F, H, W) -> (B, L, C * pt * ph * pw): each token's features ordered
        (C, pt, ph, pw), tokens (F, H, W) row-major (the native ``PatchEmbed`` rearrange)."""
        b, c, f, h, w = x.shape
        pt, ph, pw = self.patch_size
        x = x.reshape(b, c, f // pt, pt, h // ph, ph, w // pw, pw)
        return x.permute(0, 2, 4, 6, 1, 3, 5, 7).flatten(4, 7).flatten(1, 3)

    def embed(self, x: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, L, dim) fp32 input tokens of a forward: the patch embedding of the latents and
        mask channels (subclasses add conditioning tokens, e.g. OmniDreams' HDMap)."""
        return self.patchify(x, inputs.get("condition_mask"))

    # ---------------------------------------------------------------- forward
    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        context: list,
        frame_positions: torch.Tensor | None = None,
        cache=None,
        mask: torch.Tensor | None = None,
        inputs: dict[str, torch.Tensor] | None = None,
        expert: int = 0,
    ) -> torch.Tensor:
        """Predict the flow (velocity ``noise - x0``) for latents ``x``.

        Args:
            x: (B, in_dim, F, H, W) latents (the whole clip, or one AR block).
            timestep: (B,) or (B, F) timesteps in [0, 1000] (one per clip or per latent frame;
                Video2World gives its conditioning frames a near-zero one).
            context: output of ``prepare_context``.
            frame_positions: (F,) long absolute frame index of each latent frame (RoPE);
                defaults to 0..F-1.
            cache: the KV cache in AR mode (``begin_block`` already called), else None.
            mask: optional (L, L) boolean attention mask for masked full-sequence forwards.
            inputs: named conditioning inputs: ``condition_mask`` (B, 1, F, H, W).
            expert: always 0 (one expert).

        Returns:
            (B, out_dim, F, H, W) flow prediction in fp32.
        """
        return self._forward(x, timestep, context, frame_positions, cache, mask, inputs)

    def forward_kv(self, x, timestep, context, frame_positions=None, cache=None, mask=None,
                   inputs=None, expert: int = 0) -> None:  # fmt: skip
        """``forward``'s K/V writes only (a commit): every block but the last runs whole, the
        last one stops at its K/V (no attention output, cross-attention, MLP or final layer:
        no K/V depends on them), 1 / num_layers of the attention and GEMMs saved."""
        if cache is None:
            raise ValueError("CosmosDiT.forward_kv writes K/V: it needs a cache")
        self._forward(x, timestep, context, frame_positions, cache, mask, inputs, kv_only=True)

    def _forward(self, x, timestep, context, frame_positions, cache, mask, inputs,
                 kv_only: bool = False) -> torch.Tensor | None:  # fmt: skip
        inputs = inputs or {}
        if x.shape[1] != self.in_dim:
            raise ValueError(f"x has {x.shape[1]} channels, need in_dim={self.in_dim}")
        b, _, num_frames, height, width = x.shape
        pt, ph, pw = self.patch_size
        gf, gh, gw = num_frames // pt, height // ph, width // pw
        if frame_positions is None:
            frame_positions = torch.arange(gf, device=x.device)
        if timestep.ndim == 1:
            timestep = timestep[:, None].expand(b, gf)
        if timestep.shape != (b, gf):
            raise ValueError(f"timestep {tuple(timestep.shape)}: need (B,) or (B, F)")

        # 1. patchify, time embedding per frame, RoPE tables at absolute positions
        tokens = self.embed(x, inputs)
        emb, temb = self.time_embedding(timestep)
        cos, sin = self.rope.cos_sin(frame_positions, gh, gw)

        # 2. transformer blocks on this rank's tokens
        sequence = self.attention.sequence
        tokens, cos, sin, cache = sequence.scatter(tokens, cos, sin, cache, gf)

        def segment(tokens: torch.Tensor, start: int, stop: int) -> torch.Tensor:
            for i in range(start, stop):
                tokens = self.blocks[i](tokens, emb, temb, context[i], cos, sin, self.attention,
                                        cache, i, mask)  # fmt: skip
            return tokens

        if kv_only:  # a commit: all blocks (no step cache), the last one up to its K/V
            last = self.num_layers - 1
            self.blocks[last].write_kv(segment(tokens, 0, last), emb, temb, cos, sin,
                                       self.attention, cache, last, mask)  # fmt: skip
            return None
        tokens = self.run_blocks(tokens, segment)  # all blocks, or what the step cache runs

        # 3. final layer, gather, unpatchify: each token's features are ordered (ph, pw, pt, C)
        out = sequence.gather(self.final_layer(tokens, emb, temb), gf)
        out = out.view(b, gf, gh, gw, ph, pw, pt, self.out_dim)
        return out.permute(0, 7, 1, 6, 2, 4, 3, 5).reshape(
            b, self.out_dim, num_frames, height, width
        )
