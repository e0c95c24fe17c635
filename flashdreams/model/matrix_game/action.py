"""Matrix-Game 2.0 action module: keyboard and mouse conditioning injected into DiT blocks.

One module sits in each of the first blocks, between the cross-attention residual and the FFN
(Matrix-Game-2 ``wan/modules/action_module.py``). Parameter names follow the release, so its
checkpoints load without renaming (``blocks.N.action_model.t_qkv.weight``, ...).

Actions arrive per latent frame as a window of video-frame actions: latent frame ``f`` reads the
``window * temporal_factor`` video frames ``[tf * (f - window), tf * f)`` (3 * 4 = 12 with the
released configs; frames before video frame 0 repeat frame 0). The control encoder cuts these
windows (``flashdreams.control.keyboard_mouse``); the module sees ``(B, F, 12, dims)``.

* **Mouse branch** (models with a mouse): every latent token gets its own temporal
  self-attention. Its query, key and value come from an MLP of ``[token | the frame's mouse
  window]``; a token attends to the same spatial position in the frames the cache holds (K/V
  branch ``mouse``: one key per latent token, so one per (frame, position)).
* **Keyboard branch**: the frame's keyboard window is embedded (per video frame) into one key
  and value per latent frame (K/V branch ``keyboard``: one key per frame); every token queries
  the keys of the frames it may see.

Both branches use a 1-D RoPE over the absolute latent frame on the first dims of each head
(``rope_dims[0]`` = 8 of 64 dims, theta 256; the release's height/width dims sit at position 0,
so they are not rotated) and a q/k RMS norm **without** its scale: the release's
``WanRMSNorm`` of this module never multiplies by its weight, which is kept only so checkpoints
load. The output projections are added to the residual stream (zero at the release's init).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flashdreams.model.base import linear_flops
from flashdreams.model.layers import apply_rope
from flashdreams.model.matrix_game import fused


class HeadRMSNorm(nn.Module):
    """RMS norm over each head's dims **without** a learned scale (the release's action-module
    ``WanRMSNorm`` ignores its ``weight``; the parameter exists so its checkpoints load)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))  # loaded, never used (as in the release)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class FrameRope:
    """Rotary angles of the action attentions: absolute latent frame on the first
    ``rope_dims[0]`` dims of a head (interleaved pairs), identity on the rest."""

    def __init__(self, head_dim: int, rope_dims=(8, 28, 28), theta: float = 256.0) -> None:
        if sum(rope_dims) != head_dim:
            raise ValueError(f"action rope dims {tuple(rope_dims)} must sum to the head dim "
                             f"{head_dim}")  # fmt: skip
        self.head_dim, self.time_dims, self.theta = head_dim, int(rope_dims[0]), theta

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(F,) absolute latent frames -> cos, sin (F, head_dim // 2) fp32."""
        d = self.time_dims
        # made on the positions' device: a host-to-device copy cannot be captured in a graph
        steps = torch.arange(0, d, 2, dtype=torch.float64, device=positions.device)
        inv = 1.0 / self.theta ** (steps / d)
        ang = positions.to(torch.float64)[:, None] * inv[None]
        rest = self.head_dim // 2 - ang.shape[1]
        ang = torch.cat([ang, ang.new_zeros(ang.shape[0], rest)], dim=1)
        return torch.cos(ang).float(), torch.sin(ang).float()


class ActionModule(nn.Module):
    """Keyboard (and mouse) injection of one block (names as the release's ``ActionModule``).

    Args:
        dim: the DiT width (``img_hidden_size``, 1536).
        keyboard_dim: keyboard action dims per video frame (4 universal, 2 GTA, 7 Temple Run).
        mouse_dim: mouse dims per video frame (2), or 0 for keyboard-only variants.
        hidden_size: keyboard embedding width per video frame (128).
        keyboard_hidden_dim: keyboard attention width (1024).
        mouse_hidden_dim: mouse MLP / attention width (1024).
        num_heads: heads of both action attentions (16, head dim 64).
        window: latent frames of actions per window (``windows_size``, 3).
        temporal_factor: video frames per latent frame (``vae_time_compression_ratio``, 4).
        rope_dims: the head dims of the frame / height / width RoPE axes (8, 28, 28).
        rope_theta: RoPE base (256).
        qkv_bias: biases of the q/k/v and output projections (False in the release).
    """

    def __init__(self, dim: int = 1536, keyboard_dim: int = 4, mouse_dim: int = 2,
                 hidden_size: int = 128, keyboard_hidden_dim: int = 1024,
                 mouse_hidden_dim: int = 1024, num_heads: int = 16, window: int = 3,
                 temporal_factor: int = 4, rope_dims=(8, 28, 28), rope_theta: float = 256.0,
                 qkv_bias: bool = False) -> None:  # fmt: skip
        super().__init__()
        self.num_heads, self.keyboard_dim, self.mouse_dim = num_heads, keyboard_dim, mouse_dim
        self.window_frames = window * temporal_factor  # video frames per latent frame's window
        if mouse_hidden_dim % num_heads or keyboard_hidden_dim % num_heads:
            raise ValueError("action hidden dims must be multiples of the action heads")
        if mouse_dim and mouse_hidden_dim // num_heads != keyboard_hidden_dim // num_heads:
            raise ValueError("the mouse and keyboard attentions share one RoPE: equal head dims")
        self.head_dim = keyboard_hidden_dim // num_heads
        self.rope = FrameRope(self.head_dim, rope_dims, rope_theta)
        self.keyboard_embed = nn.Sequential(
            nn.Linear(keyboard_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )
        if mouse_dim:
            c = mouse_hidden_dim
            self.mouse_mlp = nn.Sequential(
                nn.Linear(mouse_dim * self.window_frames + dim, c), nn.GELU(approximate="tanh"),
                nn.Linear(c, c), nn.LayerNorm(c),
            )  # fmt: skip
            self.t_qkv = nn.Linear(c, 3 * c, bias=qkv_bias)
            self.img_attn_q_norm = HeadRMSNorm(c // num_heads)
            self.img_attn_k_norm = HeadRMSNorm(c // num_heads)
            self.proj_mouse = nn.Linear(c, dim, bias=qkv_bias)
        self.key_attn_q_norm = HeadRMSNorm(self.head_dim)
        self.key_attn_k_norm = HeadRMSNorm(self.head_dim)
        self.mouse_attn_q = nn.Linear(dim, keyboard_hidden_dim, bias=qkv_bias)
        self.keyboard_attn_kv = nn.Linear(hidden_size * self.window_frames,
                                          2 * keyboard_hidden_dim, bias=qkv_bias)  # fmt: skip
        self.proj_keyboard = nn.Linear(keyboard_hidden_dim, dim, bias=qkv_bias)
        self.fused = False  # fuse(): the per-head norm + RoPE and the frame attentions as kernels

    def fuse(self) -> None:
        """Run the per-head q/k norm + RoPE and each attention along frames as one Triton
        pass (``flashdreams.model.matrix_game.fused``; same math, same parameters; the torch
        math where there is no CUDA or Triton). A compile policy's ``fuse_norms`` sets it."""
        self.fused = True

    def _norm_rope(self, q, k, norm, cos, sin):
        """Per-head RMS norm (``norm``'s eps, no weight) + frame RoPE of q and k (or q alone)."""
        if self.fused:
            return fused.head_norm_rope(q, k, cos, sin, norm.eps)
        return [fused.head_norm_rope_reference(t, cos, sin, norm.eps)
                for t in ((q,) if k is None else (q, k))]  # fmt: skip

    def _frames(self, q, k, v, mask):
        """Attention along frames in q's dtype (``fused.frame_attention`` shapes)."""
        attend = fused.frame_attention if self.fused else fused.frame_attention_unfused
        return attend(q, k, v, mask)

    def forward(self, x: torch.Tensor, *, keyboard: torch.Tensor | None,
                mouse: torch.Tensor | None, positions: torch.Tensor, cache=None, layer: int = 0,
                frame_mask: torch.Tensor | None = None, rope=None) -> torch.Tensor:  # fmt: skip
        """Add the action branches to the residual stream: ``project``, the cache writes
        (``cached``), ``attend``. A block runs the same three steps with its neighbours' work
        around the first and the last, as two compile regions with the cache writes between.

        Args:
            x: (B, L, dim) fp32 tokens of F latent frames in (frame, h, w) order.
            keyboard: (B, F, window_frames, keyboard_dim) windows, or None (branch skipped).
            mouse: (B, F, window_frames, mouse_dim) windows, or None (branch skipped).
            positions: (F,) absolute latent frame of each frame (RoPE).
            cache: the loop's cache in AR mode (``branch("keyboard")``, ``branch("mouse")``,
                ``begin_block`` already called), else None.
            layer: this module's layer in the branch caches.
            frame_mask: (F, F) boolean frame-level mask of a masked full-sequence forward
                (True = may attend), else None.
            rope: ``self.rope.cos_sin(positions)`` when the caller computed it once for all
                the action modules of a forward, else None.

        Returns:
            (B, L, dim) fp32 tokens.
        """
        cos, sin = self.rope.cos_sin(positions) if rope is None else rope
        mouse_q, mouse_kv, keyboard_kv = self.project(x, keyboard, mouse, cos, sin)
        mouse_kv, keyboard_kv = self.cached(cache, layer, mouse_kv, keyboard_kv)
        return self.attend(x, mouse_q, mouse_kv, keyboard_kv, cos, sin, frame_mask)

    def project(self, x, keyboard, mouse, cos, sin):
        """What the branches write to their caches, and the mouse queries: static shapes.

        Returns:
            mouse q (B, L, H, D), or None without the mouse branch; mouse (k, v) (B, L, H, D)
            in token order (the ``mouse`` branch cache's layout: one key per token), or None;
            keyboard (k, v) (B, F, H, D) (one key per frame), or None.
        """
        mouse_q = mouse_kv = keyboard_kv = None
        if self.mouse_dim and mouse is not None:
            mouse_q, k, v = self.mouse_qkv(x, mouse, cos, sin)
            mouse_kv = (k, v)
        if keyboard is not None:
            keyboard_kv = self.keyboard_kv(keyboard, cos, sin)
        return mouse_q, mouse_kv, keyboard_kv

    @staticmethod
    def cached(cache, layer: int, mouse_kv, keyboard_kv):
        """Write the block's K/V into the branch caches (AR mode) and return what the block's
        queries attend to (the window's K/V); without a cache the block's own."""
        if cache is not None and mouse_kv is not None:
            mouse_kv = cache.branch("mouse").update(layer, *mouse_kv)[:2]
        if cache is not None and keyboard_kv is not None:
            keyboard_kv = cache.branch("keyboard").update(layer, *keyboard_kv)[:2]
        return mouse_kv, keyboard_kv

    def attend(self, x, mouse_q, mouse_kv, keyboard_kv, cos, sin, frame_mask=None):
        """Both attentions along frames and their output residuals: ``x`` (B, L, dim) plus
        the mouse branch (queries ``mouse_q``, keys ``mouse_kv`` (B, G * S, H, D) of G frames),
        then the keyboard branch (its queries from the result, keys ``keyboard_kv``
        (B, G, H, D)); a branch whose K/V are None is skipped. ``frame_mask``: (F, G)."""
        f = cos.shape[0]
        s = x.shape[1] // f  # tokens per frame
        if mouse_kv is not None:
            q = mouse_q.unflatten(1, (f, s))
            k, v = (t.unflatten(1, (-1, s)) for t in mouse_kv)  # (B, G, S, H, D)
            attn = self._frames(q, k, v, frame_mask).flatten(1, 2).flatten(2)  # q's dtype
            x = x + self.proj_mouse(attn.to(self.proj_mouse.weight.dtype)).float()
        if keyboard_kv is not None:
            q = self.keyboard_q(x, cos, sin).unflatten(1, (f, s))
            k, v = (t.unsqueeze(2) for t in keyboard_kv)  # (B, G, 1, H, D): one per frame
            attn = self._frames(q, k, v, frame_mask).flatten(1, 2).flatten(2)
            x = x + self.proj_keyboard(attn.to(self.proj_keyboard.weight.dtype)).float()
        return x

    def flops(self, q_tokens: int, kv_tokens: int, tokens_per_frame: int) -> dict[str, float]:
        """FLOPs of this module with both branches given (``DiT.forward_flops``): the mouse
        MLP, q/k/v and output per token and its attention along time (each token to its
        position in the ``kv_tokens / tokens_per_frame`` frames the cache holds); the keyboard
        embedding per video frame, its K/V per latent frame, its queries and output per token
        and its attention (each token to one key per visible frame)."""
        frames, kv_frames = q_tokens // tokens_per_frame, kv_tokens // tokens_per_frame
        linear = linear_flops(frames * self.window_frames, self.keyboard_embed[0],
                              self.keyboard_embed[2])  # fmt: skip
        linear += linear_flops(frames, self.keyboard_attn_kv)
        linear += linear_flops(q_tokens, self.mouse_attn_q, self.proj_keyboard)
        attention = 4 * q_tokens * kv_frames * self.mouse_attn_q.out_features
        if self.mouse_dim:
            linear += linear_flops(q_tokens, self.mouse_mlp[0], self.mouse_mlp[2], self.t_qkv,
                                   self.proj_mouse)  # fmt: skip
            attention += 4 * q_tokens * kv_frames * self.t_qkv.in_features
        return {"linear": linear, "attention": float(attention)}

    def mouse_qkv(self, x, mouse, cos, sin):
        """Mouse q, k, v (B, L, H, D) in token order, from an MLP of [token | the frame's mouse
        window]; q and k RMS-normed and rotated to their frame's angle."""
        b, f, dt = x.shape[0], mouse.shape[1], self.t_qkv.weight.dtype
        s = x.shape[1] // f
        window = mouse.to(dt).reshape(b, f, 1, -1).expand(b, f, s, -1)  # (B, F, S, 12 * 2)
        h = self.mouse_mlp(torch.cat([x.view(b, f, s, -1).to(dt), window], dim=-1))
        heads = (self.num_heads, self.head_dim)
        q, k, v = self.t_qkv(h).view(b, x.shape[1], 3, *heads).unbind(2)
        q, k = self._norm_rope(q, k, self.img_attn_q_norm, cos, sin)  # (both norms' eps)
        return q, k, v

    def keyboard_kv(self, keyboard, cos, sin):
        """One key and value per latent frame (B, F, H, D) of embedded keyboard windows."""
        b, f = keyboard.shape[:2]
        emb = self.keyboard_embed(keyboard.to(self.keyboard_attn_kv.weight.dtype))
        kv = self.keyboard_attn_kv(emb.reshape(b, f, -1))  # (B, F, 2 * H * D)
        k, v = kv.reshape(b, f, 2, self.num_heads, self.head_dim).unbind(2)
        return apply_rope(self.key_attn_k_norm(k), cos, sin), v

    def keyboard_q(self, x, cos, sin):
        """Keyboard queries (B, L, H, D) of every token, rotated to its frame's angle."""
        q = self.mouse_attn_q(x.to(self.mouse_attn_q.weight.dtype))
        q = q.view(*x.shape[:2], self.num_heads, self.head_dim)
        return self._norm_rope(q, None, self.key_attn_q_norm, cos, sin)[0]
