"""CosmosDiT against diffusers' ``CosmosTransformer3DModel`` (Predict2.5 config), shared tiny
random weights, fp32 on the CPU; and its block-causal AR forward against a full-sequence masked
forward. Tolerances: max abs error 1e-4 (outputs are O(1)).

The diffusers model is built with Predict2.5's structure (condition-mask channel, padding mask,
``crossattn_proj``, RoPE extrapolation (1, 3, 3), no learnable position embedding); its weights
are random, renamed into ours through ``flashdreams.io.cosmos_keymap``. diffusers' q/k RMS norm
eps is 1e-5 (the native network's 1e-6 is our default), so ``qk_eps`` follows it here.
"""

from __future__ import annotations

import pytest
import torch

from flashdreams.cache.full import FullKVCache
from flashdreams.cache.rolling import RollingKVCache
from flashdreams.io.cosmos_keymap import diffusers_to_flashdreams, flashdreams_to_diffusers
from flashdreams.model.cosmos import CosmosDiT

diffusers = pytest.importorskip("diffusers")

TINY = dict(dim=64, num_heads=2, num_layers=2, in_dim=4, out_dim=4, text_dim=48,
            context_dim=32, adaln_lora_dim=16, text_len=8)  # fmt: skip


def _nearest_resize_shim(monkeypatch):
    """diffusers resizes the padding mask with torchvision (absent here): the same nearest
    resize through torch, so the reference runs unchanged."""
    from types import SimpleNamespace

    from diffusers.models.transformers import transformer_cosmos

    def resize(img, size, interpolation=None):
        return torch.nn.functional.interpolate(img, size=tuple(size), mode="nearest")

    shim = SimpleNamespace(functional=SimpleNamespace(resize=resize),
                           InterpolationMode=SimpleNamespace(NEAREST="nearest"))  # fmt: skip
    monkeypatch.setattr(transformer_cosmos, "transforms", shim, raising=False)


def diffusers_model(seed: int = 0):
    from diffusers import CosmosTransformer3DModel

    torch.manual_seed(seed)
    ref = CosmosTransformer3DModel(
        in_channels=TINY["in_dim"] + 1, out_channels=TINY["out_dim"], num_attention_heads=2,
        attention_head_dim=32, num_layers=2, mlp_ratio=4.0, text_embed_dim=32,
        adaln_lora_dim=16, max_size=(16, 32, 32), patch_size=(1, 2, 2),
        rope_scale=(1.0, 3.0, 3.0), concat_padding_mask=True, extra_pos_embed_type=None,
        use_crossattn_projection=True, crossattn_proj_in_channels=48,
        encoder_hidden_states_channels=32,
    )  # fmt: skip
    with torch.no_grad():  # every tensor random and non-trivial (norm scales around 1)
        for p in ref.parameters():
            if p.ndim == 1:  # RMS norm scales
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return ref.eval()


def ours_from(ref) -> CosmosDiT:
    model = CosmosDiT(**TINY, qk_eps=1e-5)
    model.load_state_dict(diffusers_to_flashdreams(ref.state_dict()), strict=True)
    return model.eval().requires_grad_(False)


def test_keymap_roundtrip_covers_every_key():
    ref = diffusers_model()
    ours = diffusers_to_flashdreams(ref.state_dict())
    assert set(ours) == set(CosmosDiT(**TINY).state_dict())
    assert set(flashdreams_to_diffusers(ours)) == set(ref.state_dict())


@pytest.mark.parametrize("per_frame", [False, True])
def test_dit_matches_diffusers(per_frame, monkeypatch):
    _nearest_resize_shim(monkeypatch)
    ref = diffusers_model()
    model = ours_from(ref)
    b, f, h, w = 2, 3, 4, 6
    x = torch.randn(b, TINY["in_dim"], f, h, w)
    text = torch.randn(b, 5, TINY["text_dim"])
    sigma = torch.rand(b, f) if per_frame else torch.rand(b)
    cond = torch.zeros(b, 1, f, h, w)
    cond[:, :, :1] = 1.0  # Video2World: the first latent frame is given
    with torch.no_grad():
        expected = ref(
            hidden_states=x, timestep=sigma[:, None, :, None, None] if per_frame else sigma,
            encoder_hidden_states=text, condition_mask=cond,
            padding_mask=torch.zeros(1, 1, h * 8, w * 8), return_dict=False,
        )[0]  # fmt: skip
        # our timesteps are on the [0, 1000] scale (timestep_scale 0.001)
        got = model(x, sigma * 1000, model.prepare_context(text),
                    inputs={"condition_mask": cond})  # fmt: skip
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


F_, H_, W_, N_ = 2, 4, 4, 3  # frames per block, latent size, blocks
TPF = (H_ // 2) * (W_ // 2)


def _mask(sink: int, window: int | None) -> torch.Tensor:
    """[clean | noisy] block-causal mask: a block sees the cached clean frames and itself."""
    frames = 2 * N_ * F_
    allowed = torch.zeros(frames, frames, dtype=torch.bool)
    for blk in range(N_):
        own = list(range(blk * F_, (blk + 1) * F_))
        lo = 0 if window is None else max(sink, (blk + 1) * F_ - window)
        seen = [f for f in range(blk * F_) if f < sink or f >= lo]
        for offset in (0, N_ * F_):
            for q in own:
                allowed[offset + q, seen] = True
                allowed[offset + q, [offset + f for f in own]] = True
    return allowed.repeat_interleave(TPF, 0).repeat_interleave(TPF, 1)


@pytest.mark.parametrize("sink,window", [(0, None), (2, 4)])
def test_ar_rollout_equals_masked_full_sequence(sink, window):
    model = CosmosDiT(**TINY)
    model.init_weights(torch.Generator().manual_seed(0))
    model.eval().requires_grad_(False)
    ctx = model.prepare_context(torch.randn(1, 5, TINY["text_dim"]))
    c = TINY["in_dim"]
    clean = torch.randn(1, c, N_ * F_, H_, W_)
    noisy = torch.randn(1, c, N_ * F_, H_, W_)
    t_noisy = torch.rand(N_) * 1000
    ref = model(torch.cat([clean, noisy], dim=2),
                torch.cat([torch.zeros(N_ * F_), t_noisy.repeat_interleave(F_)])[None], ctx,
                torch.arange(N_ * F_).repeat(2), mask=_mask(sink, window))  # fmt: skip

    dims = dict(num_layers=2, num_heads=2, head_dim=32, tokens_per_frame=TPF,
                frames_per_block=F_, total_frames=N_ * F_)  # fmt: skip
    cache = (FullKVCache(**dims) if window is None
             else RollingKVCache(window_frames=window, sink_frames=sink, **dims))  # fmt: skip
    for blk in range(N_):
        sl = slice(blk * F_, (blk + 1) * F_)
        pos = torch.arange(blk * F_, (blk + 1) * F_)
        cache.begin_block(blk * F_, F_)
        out = model(noisy[:, :, sl], t_noisy[blk].expand(1, F_), ctx, pos, cache)
        torch.testing.assert_close(out, ref[:, :, N_ * F_ + sl.start : N_ * F_ + sl.stop],
                                   rtol=0, atol=1e-4)  # fmt: skip
        cache.begin_block(blk * F_, F_)  # commit the clean block at t = 0
        committed = model(clean[:, :, sl], torch.zeros(1, F_), ctx, pos, cache)
        torch.testing.assert_close(committed, ref[:, :, sl], rtol=0, atol=1e-4)
