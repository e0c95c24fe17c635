"""FlashVSR v1.1: the LR projector streamed chunk by chunk (6 latent frames, then 2) equals a
plain re-implementation of the release's ``Buffer_LQ4x_Proj.stream_forward`` loop and its
whole-clip run; the cached one-step rollout (2-frame chunks, KV window of 3 chunks + the
current one, K/V kept from the denoising forward) equals one masked full-sequence forward.

Tolerances: fp32, max abs error <= 1e-5 (projector, observed ~1e-7) and <= 1e-4 (DiT, observed
~1e-6).
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F

from flashdreams.cache.rolling import RollingKVCache
from flashdreams.model.flashvsr import FlashVSRDiT, LRProjector

H1, H2, DIM = 8, 12, 32  # tiny projector widths


def _projector(layers: int = 1) -> LRProjector:
    torch.manual_seed(0)
    p = LRProjector(3, DIM, layers, H1, H2)
    with torch.no_grad():
        for name, t in p.named_parameters():
            t.copy_(torch.randn_like(t) * (1.0 if "gamma" in name else 0.05))
    return p.eval()


def _release_stream(p: LRProjector, video: torch.Tensor) -> torch.Tensor:
    """The release's streaming loop written out with plain ops: chunk 0 reads LR frame 0 (the
    first frame x4) and returns nothing, then 6 groups of 4 frames, then 2 per chunk; each
    conv's cache is set from the chunk itself (``x[:, :, -2:]``) before the conv reads it."""
    cache = {}

    def shuffle(x):  # 'b c (f 1) (h 16) (w 16) -> b (c 1 16 16) f h w'
        b, c, f, h, w = x.shape
        x = x.reshape(b, c, f, h // 16, 16, w // 16, 16)
        return x.permute(0, 1, 4, 6, 2, 3, 5).reshape(b, c * 256, f, h // 16, w // 16)

    def conv(layer, x, cached):
        x = torch.cat([cached, x], dim=2)  # 2 cached frames replace the causal padding
        return F.conv3d(F.pad(x, (1, 1, 1, 1, 0, 0), mode="replicate"), layer.weight,
                        layer.bias, stride=(2, 1, 1))  # fmt: skip

    def rms(norm, x):
        return F.normalize(x, dim=1) * norm.scale * norm.gamma

    def step(clip, first):
        if first:
            clip = torch.cat([clip[:, :, :1].repeat(1, 1, 3, 1, 1), clip], dim=2)
        x = shuffle(clip)
        cache["conv1"] = x[:, :, -2:].clone()
        x = F.silu(rms(p.norm1, conv(p.conv1, x, cache["conv1"])))
        cache["conv2"] = x[:, :, -2:].clone()
        if first:
            return None
        x = F.silu(rms(p.norm2, conv(p.conv2, x, cache["conv2"])))
        x = x.flatten(2).transpose(1, 2)  # 'b c f h w -> b (f h w) c'
        return torch.stack([lin(x) for lin in p.linear_layers], dim=1)

    outs = [step(video[:, :, 0:1], True)]
    for i in range(1, (video.shape[2] - 1) // 4 + 1):
        outs.append(step(video[:, :, 4 * i - 3 : 4 * i + 1], False))
    return torch.cat([o for o in outs if o is not None], dim=2)


@pytest.mark.parametrize("layers", [1, 2])
def test_streamed_projector_equals_the_release_loop_and_the_whole_clip(layers):
    p = _projector(layers)
    video = torch.rand(1, 3, 41, 32, 48) * 2 - 1  # 8n+1 frames -> 10 latent frames
    with torch.no_grad():
        ref = _release_stream(p, video)
        whole = p.clip(video)
        chunks = [p.stream(video, 0, 6)] + [p.stream(video, s, 2) for s in (6, 8)]
    tpf = (32 // 16) * (48 // 16)
    assert ref.shape == (1, layers, 10 * tpf, DIM)
    torch.testing.assert_close(whole, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.cat(chunks, dim=2), ref, rtol=0, atol=1e-5)
    # a latent frame depends on its own 4 LR frames only (the release's cache carries nothing)
    changed = video.clone()
    changed[:, :, 1:5] = 0
    with torch.no_grad():
        diff = (p.clip(changed) - whole).abs().amax(dim=(0, 1, 3)).view(10, tpf).amax(1)
    assert diff[0] > 1e-3 and diff[1:].max() == 0


def test_projector_loads_the_release_key_names(tmp_path):
    names = {"conv1.weight", "conv1.bias", "norm1.gamma", "conv2.weight", "conv2.bias",
             "norm2.gamma", "linear_layers.0.weight", "linear_layers.0.bias"}  # fmt: skip
    assert set(LRProjector(3, DIM, 1, H1, H2).state_dict()) == names
    assert LRProjector().conv1.weight.shape == (2048, 768, 4, 3, 3)  # the release's sizes
    assert LRProjector().linear_layers[0].weight.shape == (1536, 3072)


FPB, CHUNKS, LH, LW = 2, 6, 4, 6  # frames per chunk, chunks, latent size
TPF = (LH // 2) * (LW // 2)
WINDOW = 8  # kv_ratio 3 chunks + the current one


def _mask() -> torch.Tensor:
    frames = FPB * CHUNKS
    allowed = torch.zeros(frames, frames, dtype=torch.bool)
    for b in range(CHUNKS):
        hi = (b + 1) * FPB
        allowed[b * FPB : hi, max(0, hi - WINDOW) : hi] = True
    return allowed.repeat_interleave(TPF, 0).repeat_interleave(TPF, 1)


@pytest.mark.parametrize("lr_layers", [1, 2])
def test_one_step_rollout_equals_masked_full_sequence(lr_layers):
    model = FlashVSRDiT(dim=64, num_heads=4, num_layers=3, ffn_dim=128, text_dim=16, text_len=8,
                        lr_layers=lr_layers)  # fmt: skip
    model.init_weights(torch.Generator().manual_seed(0))
    model.eval().requires_grad_(False)
    assert model.commit_mode == "none"
    ctx = model.prepare_context(torch.randn(1, 8, 16))
    frames = FPB * CHUNKS
    noise = torch.randn(1, 16, frames, LH, LW)
    feats = torch.randn(1, lr_layers, frames * TPF, 64)
    t = torch.full((1, frames), 1000.0)
    ref = model(noise, t, ctx, mask=_mask(), inputs={"lr_features": feats})
    plain = model(noise, t, ctx, mask=_mask())
    assert (plain - ref).abs().max() > 1e-3  # the LR features reach the output

    cache = model.build_cache(partial(RollingKVCache, window_frames=WINDOW, sink_frames=0),
                              tokens_per_frame=TPF, frames_per_block=FPB, total_frames=None,
                              batch_size=1, device="cpu", dtype=torch.float32)  # fmt: skip
    for b in range(CHUNKS):  # one forward per chunk; its K/V stay (no commit forward)
        sl = slice(b * FPB, (b + 1) * FPB)
        cache.begin_block(b * FPB, FPB)
        step = {"lr_features": feats[:, :, b * FPB * TPF : (b + 1) * FPB * TPF]}
        out = model(noise[:, :, sl], t[:, sl], ctx, torch.arange(sl.start, sl.stop), cache,
                    inputs=step)  # fmt: skip
        torch.testing.assert_close(out, ref[:, :, sl], rtol=0, atol=1e-4)
