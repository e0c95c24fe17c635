"""The Wan 2.x DiT, sized by config, with a bidirectional and a block-causal AR forward.

State-dict keys follow the Wan original checkpoints (``blocks.N.self_attn.q.weight``, ...).
Loading, compilation and parallelism live elsewhere; this file holds the network only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from flashdreams.attention.base import Attention
from flashdreams.attention.sdpa import SdpaAttention
from flashdreams.cache.base import KVCache, kv_amax
from flashdreams.model import fused_norms as fused
from flashdreams.model import fused_rope
from flashdreams.model.base import ConditionInput, DiT, add_flops, linear_flops
from flashdreams.model.camera import CameraEncoder, CameraInjector
from flashdreams.model.layers import (
    LinearGeluTanh,
    RMSNorm,
    Rope3D,
    apply_rope,
    gated_residual,
    layer_norm_fp32,
    modulate,
    sinusoidal_embedding,
)

CrossKV = tuple[torch.Tensor, ...]  # (k, v) or (k, v, k_img, v_img), each (B, Lc, H, D)


def _linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """Apply ``layer`` in its weight dtype."""
    return layer(x.to(layer.weight.dtype))


class SelfAttention(nn.Module):
    """Self-attention weights: RMS q/k norm across all heads, 3-D RoPE (applied by the block)."""

    def __init__(self, dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)
        self.qkv_weight: torch.Tensor | None = None  # (3 dim, dim) once fused
        self.qkv_bias: torch.Tensor | None = None
        self.qkv: nn.Module | None = None  # a fused q/k/v module (precision=fp8 installs one)

    @torch.no_grad()
    def fuse_qkv(self) -> None:
        """Concatenate q/k/v into one (3 dim, dim) projection; q/k/v become views of it."""
        if self.qkv_weight is not None or self.qkv is not None:
            return
        self.qkv_weight = torch.cat([self.q.weight, self.k.weight, self.v.weight])
        self.qkv_bias = torch.cat([self.q.bias, self.k.bias, self.v.bias])
        for layer, rows in self.qkv_rows():
            layer.weight = nn.Parameter(self.qkv_weight[rows], requires_grad=False)
            layer.bias = nn.Parameter(self.qkv_bias[rows], requires_grad=False)

    def qkv_rows(self) -> list[tuple[nn.Linear, slice]]:
        """q, k and v with their rows in the fused (3 dim, dim) projection."""
        dim = self.q.out_features
        layers = (self.q, self.k, self.v)
        return [(layer, slice(i * dim, (i + 1) * dim)) for i, layer in enumerate(layers)]

    @torch.no_grad()
    def repoint_qkv_views(self) -> None:
        """After the fused tensors moved (``.data`` swapped), make q/k/v views of them again.

        Keeps the Parameter objects (compiled regions hold them), only their storage changes.
        """
        for layer, rows in self.qkv_rows():
            layer.weight.data, layer.bias.data = self.qkv_weight[rows], self.qkv_bias[rows]

    def project(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v projections of (B, L, C) tokens: one GEMM once fused, else three."""
        if self.qkv is not None:
            return self.qkv(h).chunk(3, dim=-1)
        if self.qkv_weight is not None:
            return F.linear(h, self.qkv_weight, self.qkv_bias).chunk(3, dim=-1)
        return self.q(h), self.k(h), self.v(h)


class CrossAttention(nn.Module):
    """Cross-attention to text (and, for I2V, image) tokens whose K/V are cached per prompt."""

    def __init__(self, dim: int, num_heads: int, eps: float, with_image: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)
        self.with_image = with_image
        if with_image:
            self.k_img, self.v_img = nn.Linear(dim, dim), nn.Linear(dim, dim)
            self.norm_k_img = RMSNorm(dim, eps)

    def context_kv(self, text: torch.Tensor, image: torch.Tensor | None) -> CrossKV:
        """K/V of the context tokens: computed once per prompt, reused by every forward."""
        heads = (self.num_heads, -1)
        kv = (
            self.norm_k(_linear(self.k, text)).unflatten(-1, heads),
            _linear(self.v, text).unflatten(-1, heads),
        )
        if self.with_image:
            kv += (
                self.norm_k_img(_linear(self.k_img, image)).unflatten(-1, heads),
                _linear(self.v_img, image).unflatten(-1, heads),
            )
        return kv

    def attend(self, q: torch.Tensor, kv: CrossKV, attn: Attention) -> torch.Tensor:
        """(B, L, H, D) queries against the cached text (+ image) K/V."""
        out = attn.cross_attention(q, kv[0], kv[1])
        if self.with_image:
            out = out + attn.cross_attention(q, kv[2], kv[3])
        return out


class WanBlock(nn.Module):
    """One DiT block: modulated self-attn, cross-attn, modulated FFN; fp32 residual stream.

    The block is three attention-free regions around two attention calls. The regions have
    static shapes (the block's own tokens) and hold every norm, modulation, RoPE, projection
    and residual; a graph policy may compile them (``_compile_regions``) while the attention
    calls stay on the pinned kernel with the KV cache's growing length.
    """

    _compile_regions = ("self_attn_in", "self_attn_out", "cross_out_ffn")

    def __init__(self, dim, ffn_dim, num_heads, eps, cross_attn_norm, with_image,
                 camera: bool = False) -> None:  # fmt: skip
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps, elementwise_affine=False)
        self.self_attn = SelfAttention(dim, num_heads, eps)
        self.norm3 = nn.LayerNorm(dim, eps) if cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(dim, num_heads, eps, with_image)
        self.norm2 = nn.LayerNorm(dim, eps, elementwise_affine=False)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim)
        )
        self.modulation = nn.Parameter(torch.empty(1, 6, dim))
        self.camera_injector = CameraInjector(dim) if camera else None
        self.fused_norms = False  # fuse_norms(): norms, modulation, residuals as one pass each

    @torch.no_grad()
    def fuse_ffn_gelu(self) -> None:
        """The FFN's first linear and its GELU(tanh) as one GEMM with a GELU epilogue
        (``LinearGeluTanh``, same parameters); skipped when the linear was replaced (FP8)."""
        if type(self.ffn[0]) is nn.Linear and isinstance(self.ffn[1], nn.GELU):
            self.ffn[0], self.ffn[1] = LinearGeluTanh(self.ffn[0]), nn.Identity()

    def fuse_norms(self) -> None:
        """Run each norm + modulation (+ the gated residual before it) and the q/k RMS norm +
        RoPE as one pass over the tokens (``flashdreams.model.fused_norms``, ``fused_rope``;
        same math, same parameters; the unfused ops where there is no CUDA or Triton)."""
        self.fused_norms = True

    def _mod(self, e0: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """shift1, scale1, gate1, shift2, scale2, gate2: each (B, F, C) fp32."""
        return (self.modulation.float() + e0).unbind(2)

    def self_attn_in(self, x, e0, cos, sin, h=None):
        """Region 1: norm1 + modulation, q/k/v projections, q/k RMS norm, RoPE. ``h``: norm1's
        output when the previous block computed it with its FFN residual (fused norms)."""
        sa = self.self_attn
        if self.fused_norms:  # chunks 0, 1 of modulation + e0: shift, scale
            if h is None:
                h = fused.norm_modulate(x, None, None, e0, self.modulation, 0, 1, self.norm1.eps,
                                        sa.q.weight.dtype)  # fmt: skip
            q, k, v = sa.project(h)
            q, k = fused_rope.qk_norm_rope(q, k, sa.norm_q.weight, sa.norm_k.weight, cos, sin,
                                           sa.num_heads, sa.norm_q.eps)  # fmt: skip
            return q, k, v.unflatten(-1, (sa.num_heads, -1))
        shift, scale = self._mod(e0)[:2]
        h = modulate(layer_norm_fp32(x, self.norm1).unflatten(1, (e0.shape[1], -1)), shift, scale)
        h = h.flatten(1, 2).to(sa.q.weight.dtype)
        heads = (sa.num_heads, -1)
        q, k, v = sa.project(h)
        q = sa.norm_q(q).unflatten(-1, heads)  # (B, L, H, D)
        k = sa.norm_k(k).unflatten(-1, heads)
        v = v.unflatten(-1, heads)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def self_attn_out(self, x, y, e0, cam=None):
        """Region 2: output projection + gated residual, camera injection, norm3, cross queries."""
        ca = self.cross_attn
        injected = cam is not None and self.camera_injector is not None
        if self.fused_norms and not injected and isinstance(self.norm3, nn.LayerNorm):
            n3 = self.norm3
            x, h = fused.add_norm(x, self.self_attn.o(y.flatten(2)), e0, self.modulation, 2,
                                  n3.weight, n3.bias, -1, -1, n3.eps, ca.q.weight.dtype)  # fmt: skip
        else:
            x = gated_residual(x, self.self_attn.o(y.flatten(2)), self._mod(e0)[2])
            if injected:
                x = self.camera_injector(x, cam)  # (B, L, C) camera tokens of the same frames
            h = layer_norm_fp32(x, self.norm3) if isinstance(self.norm3, nn.LayerNorm) else x
        q = ca.norm_q(ca.q(h.to(ca.q.weight.dtype))).unflatten(-1, (ca.num_heads, -1))
        return x, q

    def cross_out_ffn(self, x, y, e0, next_table=None):
        """Region 3: cross-attention output + residual, norm2 + modulation, FFN, gated residual.
        ``next_table`` (fused norms): the next block's modulation; the gated residual and that
        block's norm1 run as one pass and the region returns ``(x, h)`` for it."""
        if self.fused_norms:  # chunks 3, 4, 5 of modulation + e0: shift, scale, gate
            x, h = fused.add_norm(x, self.cross_attn.o(y.flatten(2)), e0, self.modulation, -1,
                                  None, None, 3, 4, self.norm2.eps, self.ffn[0].weight.dtype)  # fmt: skip
            if next_table is not None:  # next block's chunks 0, 1: shift, scale of its norm1
                return fused.add_norm(x, self.ffn(h), e0, self.modulation, 5, None, None, 0, 1,
                                      self.norm1.eps, self.self_attn.q.weight.dtype, next_table)  # fmt: skip
            return fused.gated_add(x, self.ffn(h), e0, self.modulation, 5)
        _, _, _, shift, scale, gate = self._mod(e0)
        x = x + self.cross_attn.o(y.flatten(2)).float()
        h = modulate(layer_norm_fp32(x, self.norm2).unflatten(1, (e0.shape[1], -1)), shift, scale)
        return gated_residual(x, self.ffn(h.flatten(1, 2).to(self.ffn[0].weight.dtype)), gate)

    def forward(self, x, e0, cross_kv, cos, sin, attn, cache=None, layer=0, mask=None, cam=None,
                h=None, next_table=None):  # fmt: skip
        # x: (B, L, C) fp32 residual stream; e0: (B, F, 6, C) fp32 per-frame modulation
        # cam: (B, L, C) camera tokens of camera-controlled models, else None
        # h / next_table: norm1 handed over between fused blocks (see chain_norm1), in which
        # case the block returns (x, the next block's h)
        # 1. self-attention over (KV cache +) this block's tokens
        q, k, v, amax = self.self_kv(x, e0, cos, sin, cache, layer, h)
        x, q = self.self_attn_out(x, attn.self_attention(q, k, v, mask, amax), e0, cam)
        # 2. cross-attention to the cached context K/V, then 3. the feed-forward
        return self.cross_out_ffn(x, self.cross_attn.attend(q, cross_kv, attn), e0, next_table)

    def self_kv(self, x, e0, cos, sin, cache=None, layer=0, h=None):
        """The self-attention's inputs: this block's q and, after the cache update (AR mode),
        the K/V it attends to with their bounds: ``(q, k, v, amax)`` (amax None without a
        cache or bounds). ``forward`` and ``write_kv`` both start here."""
        q, k, v = self.self_attn_in(x, e0, cos, sin, h)
        if cache is None:
            return q, k, v, None
        kv = cache.update(layer, k, v)  # (B, Lk, H, D): sink + window + this block
        return q, kv[0], kv[1], kv_amax(kv)

    def write_kv(self, x, e0, cross_kv, cos, sin, attn, cache, layer=0, mask=None, cam=None,
                 h=None) -> None:  # fmt: skip
        """``forward``'s cache writes and nothing after them (the last block of a
        ``WanDiT.forward_kv``): ``self_kv``, and the self-attention only where the K/V land
        with it (``Attention.kv_written_at_update`` False). A block whose forward writes other
        caches overrides this."""
        q, k, v, amax = self.self_kv(x, e0, cos, sin, cache, layer, h)
        if not attn.kv_written_at_update:
            attn.self_attention(q, k, v, mask, amax)

    def kv_flops(self, q_tokens: int, kv_tokens: int, tokens_per_frame: int,
                 context_tokens: Sequence[int]) -> dict[str, float]:  # fmt: skip
        """FLOPs of ``write_kv`` (one GPU: no attention): the q/k/v projections."""
        sa = self.self_attn
        return {"linear": linear_flops(q_tokens, sa.q, sa.k, sa.v), "attention": 0.0}

    def flops(self, q_tokens: int, kv_tokens: int, tokens_per_frame: int,
              context_tokens: Sequence[int]) -> dict[str, float]:  # fmt: skip
        """FLOPs of this block for ``q_tokens`` queries over ``kv_tokens`` self-attention keys
        and cross-attention K/V of ``context_tokens`` keys each (text, and image for I2V):
        q/k/v/o, the cross queries and output, the FFN, the camera injector (camera models),
        and both attentions (see ``DiT.forward_flops``)."""
        sa, ca = self.self_attn, self.cross_attn
        layers = [sa.q, sa.k, sa.v, sa.o, ca.q, ca.o, self.ffn[0], self.ffn[2]]
        if self.camera_injector is not None:
            c = self.camera_injector
            layers += [c.mlp1, c.mlp2, c.scale, c.shift]
        width = sa.q.out_features
        keys = kv_tokens + sum(context_tokens)
        return {"linear": linear_flops(q_tokens, *layers),
                "attention": float(4 * q_tokens * keys * width)}  # fmt: skip

    def chain_norm1(self, following: nn.Module | None, x: torch.Tensor) -> torch.Tensor | None:
        """The following block's modulation table when this block can hand it norm1's output
        (both fused, same norm, its table on the tokens' device), else None."""
        if (
            following is None or not self.fused_norms
            or not getattr(following, "fused_norms", False)
            or following.norm1.eps != self.norm1.eps
            or following.modulation.device != x.device
        ):  # fmt: skip
            return None
        return following.modulation


class WanDiT(DiT):
    """Wan 2.x text/image-to-video DiT (1.3B: dim 1536, 12 heads, 30 layers, FFN 8960).

    Two modes share every weight:
        * bidirectional: ``forward(x, t, ctx)`` over the whole clip, optional attention mask;
        * block-causal AR: ``forward(x_block, t, ctx, frame_positions=..., cache=...)`` attends
          to the KV cache plus the block, with RoPE at absolute frame positions.

    Named conditioning inputs (``inputs()``): ``image_latents`` (Wan I2V: the ``in_dim - out_dim``
    mask + image-latent channels, concatenated to the latents) and ``camera`` (camera-controlled
    models: folded ray maps into the camera branch). Subclasses add inputs by extending
    ``inputs()`` and routing them in ``condition_time`` (added to the time embedding per frame)
    or ``condition_tokens`` (added to the patch tokens).

    Attributes:
        _keep_fp32: name substrings of parameters kept in fp32 when the model is cast.
    """

    _keep_fp32 = ("modulation", "norm", "time_embedding", "time_projection", "head.head")
    #: context tokens of an image (I2V): CLIP ViT-H/14's 257 (``ImageProjection``'s input)
    image_tokens = 257
    supports_step_cache = True
    kv_only_commit = True  # forward_kv stops at the last block's cache writes (no head)
    _kv_only = False  # set by forward_kv around its forward (through subclasses' wrappers)

    def __init__(
        self,
        dim: int = 1536,
        num_heads: int = 12,
        num_layers: int = 30,
        ffn_dim: int = 8960,
        in_dim: int = 16,
        out_dim: int = 16,
        text_dim: int = 4096,
        freq_dim: int = 256,
        patch_size: Sequence[int] = (1, 2, 2),
        eps: float = 1e-6,
        cross_attn_norm: bool = True,
        image_dim: int | None = None,
        text_len: int = 512,
        rope_max_pos: int = 1024,
        camera_channels: int | None = None,
    ) -> None:
        super().__init__()
        self.dim, self.num_heads, self.num_layers = dim, num_heads, num_layers
        self.head_dim = dim // num_heads
        self.in_dim, self.out_dim = in_dim, out_dim
        self.text_dim, self.text_len = text_dim, text_len
        self.freq_dim = freq_dim
        self.image_dim = image_dim
        self.patch_size = tuple(patch_size)
        self.patch_embedding = nn.Conv3d(in_dim, dim, self.patch_size, stride=self.patch_size)
        gelu = nn.GELU(approximate="tanh")
        self.text_embedding = nn.Sequential(nn.Linear(text_dim, dim), gelu, nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(
            nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim)
        )
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.camera_channels = camera_channels  # per latent pixel (LingBot-World: 384), or None
        self.blocks = nn.ModuleList(
            WanBlock(dim, ffn_dim, num_heads, eps, cross_attn_norm, image_dim is not None,
                     camera=camera_channels is not None)
            for _ in range(num_layers)
        )  # fmt: skip
        if camera_channels is not None:
            self.camera_encoder = CameraEncoder(camera_channels, dim, self.patch_size)
        self.head = WanHead(dim, out_dim, self.patch_size, eps)
        if image_dim is not None:
            self.img_emb = ImageProjection(image_dim, dim)
        self.rope = Rope3D(self.head_dim, rope_max_pos)
        self._attention = Attention(SdpaAttention())  # set_attention installs the run's

    # ---------------------------------------------------------------- contract
    def inputs(self) -> dict[str, ConditionInput]:
        out = {}
        if self.in_dim > self.out_dim:
            out["image_latents"] = ConditionInput.per_latent_pixel(
                "image_latents", self.in_dim - self.out_dim,
                doc=f"model.in_dim={self.in_dim} > model.out_dim={self.out_dim}: Wan I2V mask + "
                    "image latents, from conditioner=concat")  # fmt: skip
        if self.camera_channels is not None:
            out["camera"] = ConditionInput.per_latent_pixel(
                "camera", self.camera_channels,
                doc=f"model.camera_channels={self.camera_channels}: camera ray maps, from "
                    "control=camera")  # fmt: skip
        return out

    def context_tokens(self) -> tuple[int, ...]:
        """Keys of each cross-attention of a block: the text's, then (I2V) the image's."""
        image = () if self.image_dim is None else (self.image_tokens,)
        return (self.text_len, *image)

    def forward_flops(self, q_tokens: int, kv_tokens: int,
                      tokens_per_frame: int) -> dict[str, float]:  # fmt: skip
        frames = q_tokens // tokens_per_frame
        context = self.context_tokens()
        blocks = [b.flops(q_tokens, kv_tokens, tokens_per_frame, context) for b in self.blocks]
        return add_flops(*blocks, {"embed": self.embed_flops(q_tokens, frames)})

    def forward_kv_flops(self, q_tokens: int, kv_tokens: int,
                         tokens_per_frame: int) -> dict[str, float]:  # fmt: skip
        """``forward_kv``: every block but the last whole, the last one's ``kv_flops``, no
        head."""
        frames = q_tokens // tokens_per_frame
        context = self.context_tokens()
        *whole, last = self.blocks
        blocks = [b.flops(q_tokens, kv_tokens, tokens_per_frame, context) for b in whole]
        blocks.append(last.kv_flops(q_tokens, kv_tokens, tokens_per_frame, context))
        embed = self.embed_flops(q_tokens, frames) - linear_flops(q_tokens, self.head.head)
        return add_flops(*blocks, {"embed": embed})

    def embed_flops(self, q_tokens: int, frames: int) -> float:
        """GEMMs outside the blocks: the patch embedding and the head per token, the time
        embedding and projection per frame, the camera encoder per token (camera models)."""
        flops = 2.0 * q_tokens * self.patch_embedding.weight.numel()
        flops += linear_flops(q_tokens, self.head.head)
        flops += linear_flops(frames, self.time_embedding[0], self.time_embedding[2],
                              self.time_projection[1])  # fmt: skip
        if self.camera_channels is not None:
            c = self.camera_encoder
            flops += linear_flops(q_tokens, c.proj, c.mlp1, c.mlp2)
        return flops

    # ---------------------------------------------------------------- weights
    @torch.no_grad()
    def init_weights(self, generator: torch.Generator) -> None:
        """Seeded random weights with the reference's init scales (for benchmarks and demos).

        Draws happen on ``generator``'s device, in fp32, cast into each parameter's dtype.
        """
        on = generator.device
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim == 1:  # norm scales
                p.fill_(1.0)
            elif "modulation" in name:
                p.copy_(torch.randn(p.shape, generator=generator, device=on) / self.dim**0.5)
            else:
                fan_in = p[0].numel()
                std = (2.0 / (fan_in + p.shape[0])) ** 0.5  # xavier-normal scale
                p.copy_(torch.randn(p.shape, generator=generator, device=on) * std)

    # ---------------------------------------------------------------- conditioning
    def prepare_context(
        self, text: torch.Tensor, image: torch.Tensor | None = None
    ) -> list[CrossKV]:
        """Per-layer cross-attention K/V for a prompt (and image), computed once.

        Args:
            text: (B, text_len, text_dim) text embeddings.
            image: (B, 257, image_dim) CLIP features for I2V models, else None.
        """
        text = self.text_embedding(text.to(self.text_embedding[0].weight.dtype))
        img = self.img_emb(image) if image is not None else None
        return [blk.cross_attn.context_kv(text, img) for blk in self.blocks]

    def time_modulation(
        self, timestep: torch.Tensor, inputs: dict[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Time embedding e (B, G, C) and block modulation e0 (B, G, 6, C), fp32.

        G groups of tokens share one timestep: G = frames (per-frame) or G = tokens (per-token).
        ``condition_time`` may add named inputs to e before the projection.
        """
        b, f = timestep.shape
        emb = sinusoidal_embedding(timestep.flatten(), self.freq_dim)
        emb = emb.to(self.time_embedding[0].weight.dtype)
        e = self.condition_time(self.time_embedding(emb).float().view(b, f, -1), inputs or {})
        e0 = self.time_projection(e.to(self.time_projection[1].weight.dtype)).float()
        return e, e0.view(b, f, 6, -1)

    def condition_time(self, e: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Hook: the (B, G, C) fp32 time embedding with named inputs added (none here)."""
        return e

    def condition_tokens(self, tokens: torch.Tensor, inputs: dict[str, torch.Tensor],
                         grid: tuple[int, int, int]) -> torch.Tensor:  # fmt: skip
        """Hook: the (B, L, C) fp32 patch tokens with named inputs added (none here)."""
        return tokens

    # ---------------------------------------------------------------- forward
    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        context: list[CrossKV],
        frame_positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        mask: torch.Tensor | None = None,
        inputs: dict[str, torch.Tensor] | None = None,
        expert: int = 0,
    ) -> torch.Tensor:
        """Predict the flow for latents ``x``.

        Args:
            x: (B, C_in, F, H, W) latents (the whole clip, or one AR block).
            timestep: (B,), (B, F) or (B, L) timesteps in [0, 1000]: one per clip, per latent
                frame (AR mode), or per token (L = F * H * W / patch area; Wan2.2 TI2V's
                ``expand_timesteps``, e.g. t = 0 on the tokens of a given first frame). Per
                token costs a (B, L, 6, dim) fp32 modulation (2 GB at 704x1280x121): pass
                timesteps that are uniform within frames per frame (the rollout does).
            context: output of ``prepare_context``.
            frame_positions: (F,) long absolute frame index of each latent frame (RoPE);
                defaults to 0..F-1.
            cache: the KV cache in AR mode (``begin_block`` already called), else None.
            mask: optional (L, L) boolean attention mask for masked full-sequence forwards.
            inputs: named conditioning inputs (``inputs()``): ``image_latents``
                (B, in_dim - out_dim, F, H, W) concatenated to ``x`` (which may instead already
                hold ``in_dim`` channels), ``camera`` (B, camera_channels, F, H, W) folded ray
                maps (None: no camera injection).
            expert: the expert of the step (one expert: always 0).

        Returns:
            (B, C_out, F, H, W) flow prediction in fp32.
        """
        inputs = inputs or {}
        image = inputs.get("image_latents")
        if image is not None:
            x = torch.cat([x, image.to(x.dtype)], dim=1)
        if x.shape[1] != self.in_dim:
            raise ValueError(
                f"x has {x.shape[1]} channels (with image_latents), need {self.in_dim}"
            )
        b, _, num_frames, height, width = x.shape
        pt, ph, pw = self.patch_size
        gf, gh, gw = num_frames // pt, height // ph, width // pw
        if frame_positions is None:
            frame_positions = torch.arange(gf, device=x.device)
        if timestep.ndim == 1:
            timestep = timestep[:, None].expand(b, gf)
        if timestep.shape[1] not in (gf, gf * gh * gw):
            raise ValueError(f"timestep {tuple(timestep.shape)}: need (B,), (B, F) or (B, L)")

        # 1. patchify: (B, C, F, H, W) -> (B, L, dim) tokens in (f, h, w) order, fp32 stream
        weight = self.patch_embedding.weight
        tokens = self.patch_embedding(x.to(weight.dtype)).flatten(2).transpose(1, 2).float()
        tokens = self.condition_tokens(tokens, inputs, (gf, gh, gw))

        # 2. time modulation per frame and RoPE tables at absolute positions
        e, e0 = self.time_modulation(timestep, inputs)
        cos, sin = self.rope.cos_sin(frame_positions, gh, gw)

        # 3. transformer blocks (on this rank's tokens under context parallelism); camera
        #    tokens ride along the patch tokens' channels so they are sharded the same way
        num_tokens = tokens.shape[1]
        cam, rays = None, inputs.get("camera")
        if rays is not None and self.camera_channels is not None:
            cam = self.camera_encoder(rays).float()  # (B, L, dim)
            tokens = torch.cat([tokens, cam], dim=-1)
        sequence = self.attention.sequence
        tokens, cos, sin, cache = sequence.scatter(tokens, cos, sin, cache, gf)
        if e0.shape[1] != gf and tokens.shape[1] != num_tokens:
            raise ValueError("per-token timesteps need parallel=single; pass them per frame")
        if cam is not None:
            tokens, cam = (t.contiguous() for t in tokens.split(self.dim, dim=-1))

        def segment(tokens: torch.Tensor, start: int, stop: int) -> torch.Tensor:
            h = None  # norm1's output, when the previous block computed it (fused norms)
            for i in range(start, stop):
                block = self.blocks[i]
                following = self.blocks[i + 1] if i + 1 < stop else None
                chain = block.chain_norm1(following, tokens)
                out = block(tokens, e0, context[i], cos, sin, self.attention, cache, i, mask,
                            cam, h, chain)  # fmt: skip
                tokens, h = out if chain is not None else (out, None)
            return tokens

        if self._kv_only:  # a commit / history re-run: all blocks, the last up to its writes
            last = self.num_layers - 1
            self.blocks[last].write_kv(segment(tokens, 0, last), e0, context[last], cos, sin,
                                       self.attention, cache, last, mask, cam)  # fmt: skip
            return None
        tokens = self.run_blocks(tokens, segment)  # all blocks, or what the step cache runs

        # 4. head, gather the ranks' tokens, unpatchify
        out = sequence.gather(self.head(tokens, e), gf)  # (B, L, pt*ph*pw*C_out)
        out = out.view(b, gf, gh, gw, pt, ph, pw, self.out_dim)
        return out.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(
            b, self.out_dim, num_frames, height, width
        )

    def forward_kv(self, x, timestep, context, frame_positions=None, cache=None, mask=None,
                   inputs=None, expert: int = 0) -> None:  # fmt: skip
        """``forward``'s cache writes only (a commit, a history re-run): every block but the
        last runs whole, the last one only up to its writes (``WanBlock.write_kv``), no head:
        1 / num_layers of the GEMMs and attention saved. Runs through ``self.forward`` so a
        subclass's input handling applies as in a denoising forward."""
        if cache is None:
            raise ValueError(f"{type(self).__name__}.forward_kv writes K/V: it needs a cache")
        self._kv_only = True
        try:
            self.forward(x, timestep, context, frame_positions, cache, mask, inputs, expert)
        finally:
            self._kv_only = False


class WanHead(nn.Module):
    """Final modulated norm + linear projection to patch pixels (kept in fp32)."""

    def __init__(self, dim: int, out_dim: int, patch_size: tuple[int, ...], eps: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps, elementwise_affine=False)
        self.head = nn.Linear(dim, out_dim * patch_size[0] * patch_size[1] * patch_size[2])
        self.modulation = nn.Parameter(torch.empty(1, 2, dim))

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        # x: (B, L, C) fp32; e: (B, F, C) fp32
        shift, scale = (self.modulation.float()[:, None] + e[:, :, None]).unbind(2)
        h = modulate(layer_norm_fp32(x, self.norm).unflatten(1, (e.shape[1], -1)), shift, scale)
        return F.linear(h.flatten(1, 2), self.head.weight.float(), self.head.bias.float())


class ImageProjection(nn.Module):
    """I2V: CLIP image features (B, 257, image_dim) -> context tokens (B, 257, dim)."""

    def __init__(self, image_dim: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            nn.LayerNorm(image_dim), nn.Linear(image_dim, image_dim), nn.GELU(),
            nn.Linear(image_dim, dim), nn.LayerNorm(dim),
        )  # fmt: skip

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.proj(image.to(self.proj[1].weight.dtype))
