"""Matrix-Game 2.0: a Wan 2.1 1.3B causal DiT with keyboard / mouse action modules.

Skywork's interactive world model (``SkyworkAI/Matrix-Game``, folder ``Matrix-Game-2``; weights
``Skywork/Matrix-Game-2.0``): Wan 2.1 I2V-1.3B shape (36 input channels: 16 noisy + 4 mask +
16 image latents), conditioned on the first image only (its CLIP tokens through ``img_emb`` are
the whole cross-attention context: no text, no text embedding) and on per-frame actions, which
``ActionModule``s inject in the first ``action_blocks`` blocks after the cross-attention.

Named inputs (``inputs()``): ``image_latents`` (conditioner=concat), ``keyboard`` and, for
variants with a mouse, ``mouse``: (B, F, 12, dims) windows of video-frame actions per latent
frame (control=keyboard_mouse). The action modules keep K/V of their own: cache branches
``keyboard`` (one key per latent frame) and ``mouse`` (one key per latent token), built from the
recipe's cache policy (the release: window = ``local_attn_size`` frames for all three, no sink).

The release's names are kept, so its safetensors load as they are (the loader strips the
``model.`` prefix of its ``WanDiffusionWrapper``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from flashdreams import ConfigError
from flashdreams.model import fused_norms as fused
from flashdreams.model.base import BranchLayout, CacheLayout, ConditionInput, add_flops
from flashdreams.model.layers import gated_residual, layer_norm_fp32, modulate
from flashdreams.model.matrix_game.action import ActionModule
from flashdreams.model.wan import ImageProjection, WanBlock, WanDiT


@dataclass
class ActionStep:
    """What the action modules read during one forward (set by ``MatrixGameDiT.forward``)."""

    keyboard: torch.Tensor | None = None
    mouse: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    rope: tuple[torch.Tensor, torch.Tensor] | None = None  # action RoPE of the positions
    cache: object = None
    frame_mask: torch.Tensor | None = None


class MatrixGameBlock(WanBlock):
    """A Wan block whose cross-attention residual is followed by an ``ActionModule``
    (``x = x + cross(x); x = action(x); x = x + ffn(x)``, as the release's
    ``CausalWanAttentionBlock``). After the cross-attention the block runs two compile
    regions: ``action_in`` (the cross-attention output and residual, the action module's
    projections: what its caches store) and ``action_out`` (both action attentions, their
    residuals and the FFN); between them only the action caches' writes, as the
    self-attention's cache write sits between ``self_attn_in`` and the attention."""

    _compile_regions = ("self_attn_in", "self_attn_out", "action_in", "action_out")

    def __init__(self, *args, action: ActionModule, layer: int, step: ActionStep, **kw) -> None:
        super().__init__(*args, **kw)
        self.action_model = action
        self.action_layer = layer  # index of this block in the cache branches
        self._step = step  # shared with the model (a plain object, not a submodule)

    def fuse_norms(self) -> None:
        """The Wan block's fused norms, and the action module's kernels (``ActionModule.fuse``)."""
        super().fuse_norms()
        self.action_model.fuse()

    def flops(self, q_tokens, kv_tokens, tokens_per_frame, context_tokens):
        """The Wan block's FLOPs plus its action module's."""
        return add_flops(super().flops(q_tokens, kv_tokens, tokens_per_frame, context_tokens),
                         self.action_model.flops(q_tokens, kv_tokens, tokens_per_frame))  # fmt: skip

    def write_kv(self, x, e0, cross_kv, cos, sin, attn, cache, layer=0, mask=None, cam=None,
                 h=None) -> None:  # fmt: skip
        """The whole forward: the action caches store projections of the residual stream after
        the self- and cross-attention, so nothing before them can be skipped."""
        self.forward(x, e0, cross_kv, cos, sin, attn, cache, layer, mask, cam, h)

    def kv_flops(self, q_tokens, kv_tokens, tokens_per_frame, context_tokens):
        return self.flops(q_tokens, kv_tokens, tokens_per_frame, context_tokens)

    def action_in(self, x, y, keyboard, mouse, cos, sin):
        """Region 3: cross-attention output + residual, the action projections
        (``ActionModule.project``): ``(x, mouse q, mouse (k, v), keyboard (k, v))``."""
        x = self.cross_out(x, y)
        return x, *self.action_model.project(x, keyboard, mouse, cos, sin)

    def action_out(self, x, mouse_q, mouse_kv, keyboard_kv, cos, sin, e0, frame_mask=None,
                   next_table=None):  # fmt: skip
        """Region 4: the action attentions and residuals (``ActionModule.attend``), then the
        FFN (``ffn_out``; with ``next_table`` also the next block's norm1)."""
        x = self.action_model.attend(x, mouse_q, mouse_kv, keyboard_kv, cos, sin, frame_mask)
        return self.ffn_out(x, e0, next_table)

    def cross_out(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Cross-attention output projection + residual (fp32)."""
        return x + self.cross_attn.o(y.flatten(2)).float()

    def ffn_out(self, x: torch.Tensor, e0: torch.Tensor, next_table=None):
        """norm2 + modulation, FFN, gated residual (``WanBlock.cross_out_ffn`` after its
        cross-attention residual); with ``next_table`` also the next block's norm1."""
        if self.fused_norms:  # chunks 3, 4: shift, scale of norm2; 5: the FFN gate
            h = fused.norm_modulate(x, None, None, e0, self.modulation, 3, 4, self.norm2.eps,
                                    self.ffn[0].weight.dtype)  # fmt: skip
            if next_table is not None:
                return fused.add_norm(x, self.ffn(h), e0, self.modulation, 5, None, None, 0, 1,
                                      self.norm1.eps, self.self_attn.q.weight.dtype, next_table)  # fmt: skip
            return fused.gated_add(x, self.ffn(h), e0, self.modulation, 5)
        _, _, _, shift, scale, gate = self._mod(e0)
        h = modulate(layer_norm_fp32(x, self.norm2).unflatten(1, (e0.shape[1], -1)), shift, scale)
        return gated_residual(x, self.ffn(h.flatten(1, 2).to(self.ffn[0].weight.dtype)), gate)

    def cross_out_ffn(self, x, y, e0, next_table=None):
        """``action_in``, the action caches' writes (AR mode), ``action_out``."""
        step = self._step
        cos, sin = step.rope
        x, mouse_q, mouse_kv, keyboard_kv = self.action_in(x, y, step.keyboard, step.mouse,
                                                           cos, sin)  # fmt: skip
        mouse_kv, keyboard_kv = self.action_model.cached(step.cache, self.action_layer,
                                                         mouse_kv, keyboard_kv)  # fmt: skip
        return self.action_out(x, mouse_q, mouse_kv, keyboard_kv, cos, sin, e0, step.frame_mask,
                               next_table)  # fmt: skip


class MatrixGameDiT(WanDiT):
    """Matrix-Game 2.0 causal DiT (Wan 2.1 1.3B + action modules; released sizes by default).

    Args:
        dim, num_heads, num_layers, ffn_dim, in_dim, out_dim, freq_dim, patch_size, eps,
            cross_attn_norm, rope_max_pos: the Wan DiT's (see ``WanDiT``).
        text_dim, text_len: unused by the network (no text); the contract's text encoder
            still feeds a stand-in prompt (text_encoder=random), which ``prepare_context``
            ignores.
        image_dim: CLIP token width (1280, ViT-H/14 penultimate layer, 257 tokens).
        action_blocks: how many leading blocks carry an action module (15 in the distilled
            releases), or their indices.
        keyboard_dim: keyboard dims per video frame (4 universal, 2 GTA drive, 7 Temple Run).
        mouse_dim: mouse dims per video frame (2), 0 for keyboard-only variants (Temple Run).
        action_heads, action_embed_dim, keyboard_hidden_dim, mouse_hidden_dim, action_window,
            temporal_factor, action_rope_dims, action_rope_theta: the action modules'
            (``heads_num`` 16, ``hidden_size`` 128, 1024, 1024, ``windows_size`` 3,
            ``vae_time_compression_ratio`` 4, ``mouse_qk_dim_list`` [8, 28, 28], 256).
    """

    def __init__(
        self,
        dim: int = 1536,
        num_heads: int = 12,
        num_layers: int = 30,
        ffn_dim: int = 8960,
        in_dim: int = 36,
        out_dim: int = 16,
        text_dim: int = 16,
        freq_dim: int = 256,
        patch_size: Sequence[int] = (1, 2, 2),
        eps: float = 1e-6,
        cross_attn_norm: bool = True,
        image_dim: int = 1280,
        text_len: int = 1,
        rope_max_pos: int = 1024,
        action_blocks: int | Sequence[int] = 15,
        keyboard_dim: int = 4,
        mouse_dim: int = 2,
        action_heads: int = 16,
        action_embed_dim: int = 128,
        keyboard_hidden_dim: int = 1024,
        mouse_hidden_dim: int = 1024,
        action_window: int = 3,
        temporal_factor: int = 4,
        action_rope_dims: Sequence[int] = (8, 28, 28),
        action_rope_theta: float = 256.0,
    ) -> None:
        super().__init__(dim=dim, num_heads=num_heads, num_layers=num_layers, ffn_dim=ffn_dim,
                         in_dim=in_dim, out_dim=out_dim, text_dim=text_dim, freq_dim=freq_dim,
                         patch_size=patch_size, eps=eps, cross_attn_norm=cross_attn_norm,
                         image_dim=None, text_len=text_len, rope_max_pos=rope_max_pos)  # fmt: skip
        del self.text_embedding  # the context is the image tokens alone
        self.image_dim = image_dim
        self.img_emb = ImageProjection(image_dim, dim)
        if isinstance(action_blocks, int):
            action_blocks = range(action_blocks)
        self.action_blocks = sorted({int(i) for i in action_blocks})
        if self.action_blocks and not 0 <= self.action_blocks[-1] < num_layers:
            raise ConfigError(f"model.action_blocks={self.action_blocks} must index the "
                              f"{num_layers} blocks")  # fmt: skip
        if keyboard_dim < 1 or mouse_dim < 0:
            raise ConfigError(f"model.keyboard_dim={keyboard_dim} must be >= 1 and "
                              f"model.mouse_dim={mouse_dim} >= 0")  # fmt: skip
        self.keyboard_dim, self.mouse_dim = keyboard_dim, mouse_dim
        self.action_window_frames = action_window * temporal_factor
        self._step = ActionStep()
        action = dict(dim=dim, keyboard_dim=keyboard_dim, mouse_dim=mouse_dim,
                      hidden_size=action_embed_dim, keyboard_hidden_dim=keyboard_hidden_dim,
                      mouse_hidden_dim=mouse_hidden_dim, num_heads=action_heads,
                      window=action_window, temporal_factor=temporal_factor,
                      rope_dims=tuple(action_rope_dims), rope_theta=action_rope_theta)  # fmt: skip
        block = (dim, ffn_dim, num_heads, eps, cross_attn_norm, False)
        for j, i in enumerate(self.action_blocks):
            self.blocks[i] = MatrixGameBlock(*block, action=ActionModule(**action), layer=j,
                                             step=self._step)  # fmt: skip
        self.action_heads = action_heads
        self.action_head_dim = keyboard_hidden_dim // action_heads

    # ---------------------------------------------------------------- contract
    def inputs(self) -> dict[str, ConditionInput]:
        out = super().inputs()  # image_latents (in_dim 36)
        w = self.action_window_frames
        out["keyboard"] = ConditionInput(
            "keyboard", lambda b, f, hw: (b, f, w, self.keyboard_dim),
            doc=f"{w}-video-frame keyboard windows per latent frame: control=keyboard_mouse")  # fmt: skip
        if self.mouse_dim:
            out["mouse"] = ConditionInput(
                "mouse", lambda b, f, hw: (b, f, w, self.mouse_dim),
                doc=f"{w}-video-frame mouse windows per latent frame: control=keyboard_mouse")  # fmt: skip
        return out

    def context_tokens(self) -> tuple[int, ...]:
        return (self.image_tokens,)  # the image's CLIP tokens are the whole context

    def cache_layout(self) -> CacheLayout:
        n, heads, d = len(self.action_blocks), self.action_heads, self.action_head_dim
        branches = {"keyboard": BranchLayout(n, heads, d, tokens_per_frame=1)}
        if self.mouse_dim:
            branches["mouse"] = BranchLayout(n, heads, d)  # one key per latent token
        return CacheLayout(self.num_layers, self.num_heads, self.head_dim, branches)

    def set_attention(self, attention) -> None:
        from flashdreams.parallel.base import SequenceParallel

        if type(attention.sequence) is not SequenceParallel:
            raise ConfigError("parallel: Matrix-Game's mouse branch attends along time at every "
                              "latent position, which sharded tokens split; use parallel=single")  # fmt: skip
        super().set_attention(attention)

    # ---------------------------------------------------------------- conditioning
    def prepare_context(self, text: torch.Tensor | None = None,
                        image: torch.Tensor | None = None) -> list:  # fmt: skip
        """Per-layer cross-attention K/V of the first image's CLIP tokens (text is ignored).

        Args:
            text: the loop's prompt embeddings (unused: the model has no text input).
            image: (B, 257, image_dim) CLIP tokens (image_encoder=clip).
        """
        if image is None:
            raise ConfigError("Matrix-Game conditions on an image's CLIP tokens: use "
                              "image_encoder=clip and pass image=path/to/first_frame.png")  # fmt: skip
        img = self.img_emb(image)
        return [blk.cross_attn.context_kv(img, None) for blk in self.blocks]

    # ---------------------------------------------------------------- forward
    def _window(self, name: str, t: torch.Tensor | None, b: int, f: int, dims: int):
        if t is None:
            return None
        want = (b, f, self.action_window_frames, dims)
        if tuple(t.shape) != want:
            raise ConfigError(f"input {name!r} has shape {tuple(t.shape)}, the model needs "
                              f"{want} (model.{name}_dim={dims}: the control's variant must "
                              "match the model's)")  # fmt: skip
        return t

    def forward(self, x, timestep, context, frame_positions=None, cache=None, mask=None,
                inputs=None, expert=0):  # fmt: skip
        """``WanDiT.forward`` with the named inputs ``keyboard`` / ``mouse`` routed to the
        action modules (absent: that branch is skipped). In AR mode ``cache`` must carry the
        branches of ``cache_layout()``; a masked full-sequence forward's ``mask`` must be
        frame-structured (block-causal masks are), the action attentions use its frame level.
        """
        inputs = dict(inputs or {})
        b, f = x.shape[0], x.shape[2] // self.patch_size[0]
        step = self._step
        step.keyboard = self._window("keyboard", inputs.pop("keyboard", None), b, f,
                                     self.keyboard_dim)  # fmt: skip
        step.mouse = self._window("mouse", inputs.pop("mouse", None), b, f, self.mouse_dim)
        step.positions = (torch.arange(f, device=x.device) if frame_positions is None
                          else frame_positions)  # fmt: skip
        if self.action_blocks:  # one RoPE table for every action module of the forward
            step.rope = self.blocks[self.action_blocks[0]].action_model.rope.cos_sin(step.positions)
        step.cache, step.frame_mask = cache, None
        if mask is not None:
            step.frame_mask = frame_level(mask, f)
        try:
            return super().forward(x, timestep, context, frame_positions, cache, mask, inputs,
                                   expert)  # fmt: skip
        finally:
            step.keyboard = step.mouse = step.positions = step.cache = step.frame_mask = None
            step.rope = None


def frame_level(mask: torch.Tensor, frames: int) -> torch.Tensor:
    """The (F, F) frame mask of an (L, L) token mask made of whole-frame blocks.

    Raises:
        ValueError: the mask differs within a frame pair (the action attentions see frames).
    """
    tpf = mask.shape[0] // frames
    out = mask[::tpf, ::tpf]
    if not torch.equal(out.repeat_interleave(tpf, 0).repeat_interleave(tpf, 1), mask.bool()):
        raise ValueError("Matrix-Game's masked forward needs a frame-structured mask")
    return out.bool()
