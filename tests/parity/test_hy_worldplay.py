"""HY-WorldPlay (WAN-5B path) DiT vs diffusers' ``WanTransformer3DModel`` (tiny, CPU, fp32).

* shared path: with the action MLP's output layer and every ``o_prope`` zeroed, our forward is
  diffusers' Wan2.2 forward (per-token timesteps, image frame at t = 14): 2e-5 max abs;
* whole model: diffusers' model with the release's attention (a test-local processor written
  from ``CausalCameraPRopeWanAttnProcessor2_0``: PRoPE on the pre-RoPE q/k/v in (B, H, L, D)
  layout, the same call batched, ``to_out_prope``) and the action embedding added to ``temb``
  (``WanActionTimeTextImageEmbedding``): 2e-5;
* checkpoints: a tiny diffusers ``wan_transformer/`` folder (no action / PRoPE modules: they load
  as zeros) and a tiny ``model.pt`` with a ``generator`` / ``generator_ema`` envelope and
  ``model.`` / ``_fsdp_wrapped_module.`` prefixes, loaded with ``model.checkpoint_key``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel
from diffusers.models.embeddings import TimestepEmbedding, Timesteps

from flashdreams.io.checkpoint import materialize
from flashdreams.io.keymap import wan_to_diffusers
from flashdreams.model.hy_worldplay import HYWorldPlayDiT

Z, DIM, HEADS, LAYERS, TEXT = 48, 64, 4, 2, 32
TOL = 2e-5


def tiny(checkpoint=None, key=None, seed=3) -> HYWorldPlayDiT:
    with torch.device("meta"):
        model = HYWorldPlayDiT(dim=DIM, num_heads=HEADS, num_layers=LAYERS, ffn_dim=128,
                               text_dim=TEXT, text_len=16)  # fmt: skip
    return materialize(model, checkpoint, "cpu", torch.float32, seed=seed,
                       checkpoint_key=key).eval()  # fmt: skip


def release_state(model: HYWorldPlayDiT) -> dict[str, torch.Tensor]:
    """Our weights under the release's names (diffusers + its two extra modules)."""
    ours = model.state_dict()
    extra = {k: v for k, v in ours.items() if "o_prope" in k or k.startswith("action_embedding")}
    out = wan_to_diffusers({k: v for k, v in ours.items() if k not in extra})
    for k, v in extra.items():
        if k.startswith("action_embedding."):
            layer = {"0": "linear_1", "2": "linear_2"}[k.split(".")[1]]
            out[f"condition_embedder.action_embedder.{layer}.{k.split('.')[-1]}"] = v
        else:
            out[k.replace(".self_attn.o_prope.", ".attn1.to_out_prope.0.")] = v
    return out


def diffusers_dit(model: HYWorldPlayDiT) -> WanTransformer3DModel:
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=DIM // HEADS,
        in_channels=Z, out_channels=Z, text_dim=TEXT, freq_dim=256, ffn_dim=128,
        num_layers=LAYERS, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
    ).eval()  # fmt: skip


# ------------------------------------------------------------------ the release's attention
def _tiled(x, m):  # x (B, H, L, D), m (B, C, 4, 4): the release's einsum layout
    b, n, length, d = x.shape
    c = m.shape[1]
    return torch.einsum("bcij,bncpkj->bncpki", m, x.reshape(b, n, c, -1, d // 4, 4)).reshape(
        x.shape
    )


def _lift(k):
    out = torch.zeros(*k.shape[:-2], 4, 4)
    out[..., :3, :3], out[..., 3, 3] = k, 1.0
    return out


class ReleaseProcessor:
    """HY-WorldPlay's self-attention (no cache), on a diffusers ``WanAttention``."""

    def __init__(self, out_prope: torch.nn.Linear) -> None:
        self.out_prope, self.viewmats, self.ks = out_prope, None, None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 rotary_emb=None):  # fmt: skip
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        k = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        v = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        cos, sin = (t.transpose(1, 2) for t in rotary_emb)  # (1, 1, L, D)

        def rot(x):
            x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
            out = torch.empty_like(x)
            out[..., 0::2] = x1 * cos[..., 0::2] - x2 * sin[..., 1::2]
            out[..., 1::2] = x1 * sin[..., 1::2] + x2 * cos[..., 0::2]
            return out

        kn = torch.zeros_like(self.ks)
        kn[..., 0, 0], kn[..., 1, 1], kn[..., 2, 2] = self.ks[..., 0, 0], self.ks[..., 1, 1], 1.0
        kinv = torch.zeros_like(kn)
        kinv[..., 0, 0], kinv[..., 1, 1], kinv[..., 2, 2] = 1 / kn[..., 0, 0], 1 / kn[..., 1, 1], 1
        w = self.viewmats
        p = _lift(kn) @ w
        w_inv = torch.zeros_like(w)
        w_inv[..., :3, :3] = w[..., :3, :3].transpose(-1, -2)
        w_inv[..., :3, 3] = -torch.einsum("...ij,...j->...i", w_inv[..., :3, :3], w[..., :3, 3])
        w_inv[..., 3, 3] = 1.0
        p_inv = w_inv @ _lift(kinv)
        qa = torch.cat([rot(q), _tiled(q, p.transpose(-1, -2))])
        ka = torch.cat([rot(k), _tiled(k, p_inv)])
        va = torch.cat([v, _tiled(v, p_inv)])
        out = F.scaled_dot_product_attention(qa, ka, va)
        o_rope, o_prope = out.chunk(2)
        o_prope = _tiled(o_prope, p)
        o_rope = attn.to_out[0](o_rope.transpose(1, 2).flatten(2))
        return o_rope + self.out_prope(o_prope.transpose(1, 2).flatten(2))


def release_dit(model: HYWorldPlayDiT):
    """diffusers' DiT + the release's attention and action embedding, with our weights."""
    dit = diffusers_dit(model)
    state = release_state(model)
    action = TimestepEmbedding(256, DIM)
    action.load_state_dict({k.split("action_embedder.")[1]: v for k, v in state.items()
                            if "action_embedder" in k})  # fmt: skip
    procs = []
    for i, block in enumerate(dit.blocks):
        out = torch.nn.Linear(DIM, DIM)
        out.load_state_dict({"weight": state.pop(f"blocks.{i}.attn1.to_out_prope.0.weight"),
                             "bias": state.pop(f"blocks.{i}.attn1.to_out_prope.0.bias")})  # fmt: skip
        procs.append(ReleaseProcessor(out))
        block.attn1.set_processor(procs[-1])
    dit.load_state_dict({k: v for k, v in state.items() if "action_embedder" not in k})
    proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)
    box = {}

    def add_action(module, args, temb):  # temb = time_embedder(t) + action_embedder(a)
        return temb + action(proj(box["action"].flatten()).float()).view(temb.shape)

    dit.condition_embedder.time_embedder.register_forward_hook(add_action)

    def run(x, t, text, act, viewmats, ks, tokens_per_frame):
        box["action"] = act.repeat_interleave(tokens_per_frame, dim=1)  # per token, as t
        for p in procs:
            p.viewmats, p.ks = viewmats, ks
        return dit(x, t, text, return_dict=False)[0]

    return run


def _inputs(gen, frames=3):
    angles = torch.rand(1, frames, generator=gen) * 0.6
    w2c = torch.eye(4).repeat(1, frames, 1, 1)
    w2c[..., 0, 0], w2c[..., 0, 2] = angles.cos(), angles.sin()
    w2c[..., 2, 0], w2c[..., 2, 2] = -angles.sin(), angles.cos()
    w2c[..., :3, 3] = torch.randn(1, frames, 3, generator=gen)
    ks = torch.tensor([[0.5051, 0, 0.5], [0, 0.8979, 0.5], [0, 0, 1.0]]).repeat(1, frames, 1, 1)
    action = torch.tensor([[0.0, 10.0, 37.0, 80.0][:frames]])
    return {"action": action, "viewmats": w2c, "intrinsics": ks}


def test_shared_path_matches_diffusers_with_branches_zeroed():
    model = tiny()
    with torch.no_grad():
        model.action_embedding[2].weight.zero_()
        model.action_embedding[2].bias.zero_()
        for block in model.blocks:
            block.self_attn.o_prope.weight.zero_()
            block.self_attn.o_prope.bias.zero_()
    dit = diffusers_dit(model)
    state = {k: v for k, v in release_state(model).items()
             if "action_embedder" not in k and "to_out_prope" not in k}  # fmt: skip
    dit.load_state_dict(state, strict=True)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, Z, 3, 4, 6, generator=gen)
    text = torch.randn(1, 16, TEXT, generator=gen)
    t = torch.tensor([[14.0, 960.0, 960.0]])
    with torch.no_grad():
        ours = model(x, t, model.prepare_context(text), inputs=_inputs(gen))
        theirs = dit(x, t.repeat_interleave(6, 1), text, return_dict=False)[0]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=TOL)


def test_whole_model_matches_release_attention_and_action():
    model = tiny()
    run = release_dit(model)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, Z, 3, 4, 6, generator=gen)
    text = torch.randn(1, 16, TEXT, generator=gen)
    t = torch.tensor([[14.0, 888.8889, 888.8889]])
    inputs = _inputs(gen)
    with torch.no_grad():
        ours = model(x, t, model.prepare_context(text), inputs=inputs)
        theirs = run(x, t.repeat_interleave(6, 1), text, inputs["action"], inputs["viewmats"],
                     inputs["intrinsics"], 6)  # fmt: skip
        # the branches do something: zeroing o_prope changes the output
        for block in model.blocks:
            block.self_attn.o_prope.weight.zero_()
        plain = model(x, t, model.prepare_context(text), inputs=inputs)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=TOL)
    assert (ours - plain).abs().max() > 1e-3


def test_loads_both_release_formats(tmp_path):
    source = tiny(seed=5)
    state = release_state(source)
    # (1) diffusers wan_transformer/: the base without the action / PRoPE modules
    base = diffusers_dit(source)
    base.load_state_dict({k: v for k, v in state.items()
                          if "action_embedder" not in k and "to_out_prope" not in k})  # fmt: skip
    base.save_pretrained(tmp_path / "wan_transformer")
    loaded = tiny(str(tmp_path / "wan_transformer"))
    for name, p in loaded.state_dict().items():
        if "o_prope" in name or name.startswith("action_embedding"):
            assert p.abs().max() == 0, name
        else:
            torch.testing.assert_close(p, source.state_dict()[name], rtol=0, atol=0)
    # (2) wan_distilled_model/model.pt: generator / generator_ema, model. / _fsdp_ prefixes
    other = release_state(tiny(seed=6))
    wrap = {f"model._fsdp_wrapped_module.{k}" if i % 2 else f"model.{k}": v
            for i, (k, v) in enumerate(state.items())}  # fmt: skip
    (tmp_path / "wan_distilled_model").mkdir()
    torch.save({"generator": wrap, "generator_ema": {f"model.{k}": v for k, v in other.items()}},
               tmp_path / "wan_distilled_model" / "model.pt")  # fmt: skip
    loaded = tiny(str(tmp_path / "wan_distilled_model" / "model.pt"), key="generator")
    for name, p in loaded.state_dict().items():
        torch.testing.assert_close(p, source.state_dict()[name], rtol=0, atol=0)
