"""OmniDreams (HDMap-conditioned causal Cosmos DiT), fp32 on the CPU, tiny random weights:

* the block-causal AR rollout with HDMap tokens (rolling KV window, commits of clean blocks)
  equals one full-sequence forward of [clean | noisy] frames under the block-causal mask, with
  the same HDMap latents on both halves (atol 1e-4);
* with a zero ``additional_patch_embedding`` the model is the plain ``CosmosDiT`` (atol 0);
* a tiny file in the release's consolidated ``.pt`` format (``net.*`` student next to
  ``net_ema.*`` / ``net_fake_score.*``, ``net.additional_patch_embedding.proj.1.weight``) loads;
* the HDMap control's block-by-block encode equals one Wan VAE encode of the whole clip.
"""

from __future__ import annotations

import numpy as np
import torch

from flashdreams.cache.rolling import RollingKVCache
from flashdreams.conditioner.cosmos_video import read_last_frames
from flashdreams.control.hdmap import HDMapControl
from flashdreams.io.checkpoint import materialize
from flashdreams.io.image import image_to_tensor
from flashdreams.io.video import Mp4Writer
from flashdreams.model.cosmos import CosmosDiT
from flashdreams.model.omnidreams import OmniDreamsDiT
from flashdreams.model.omnidreams.keymap import flashdreams_to_omnidreams
from flashdreams.vae.wan21_encode import Wan21Encoder

TINY = dict(dim=64, num_heads=2, num_layers=2, in_dim=16, out_dim=16, text_dim=48,
            context_dim=32, adaln_lora_dim=16, text_len=8)  # fmt: skip
F_, H_, W_, N_, WINDOW = 2, 4, 4, 3, 4  # frames per block, latent size, blocks, KV window
TPF = (H_ // 2) * (W_ // 2)


def _model(seed: int = 0, **kw) -> OmniDreamsDiT:
    model = OmniDreamsDiT(**TINY, **kw)
    model.init_weights(torch.Generator().manual_seed(seed))
    return model.eval().requires_grad_(False)


def _mask() -> torch.Tensor:
    """[clean | noisy] mask: a block sees itself and the clean frames of the KV window."""
    frames = 2 * N_ * F_
    allowed = torch.zeros(frames, frames, dtype=torch.bool)
    for blk in range(N_):
        own = list(range(blk * F_, (blk + 1) * F_))
        seen = [f for f in range(blk * F_) if f >= (blk + 1) * F_ - WINDOW]
        for offset in (0, N_ * F_):
            for q in own:
                allowed[offset + q, seen] = True
                allowed[offset + q, [offset + f for f in own]] = True
    return allowed.repeat_interleave(TPF, 0).repeat_interleave(TPF, 1)


def test_ar_rollout_with_hdmap_equals_masked_full_sequence():
    model = _model()
    ctx = model.prepare_context(torch.randn(1, 5, TINY["text_dim"]))
    clean, noisy = torch.randn(2, 1, 16, N_ * F_, H_, W_)
    hdmap = torch.randn(1, 16, N_ * F_, H_, W_)
    t_noisy = torch.rand(N_) * 1000
    t_full = torch.cat([torch.full((N_ * F_,), 128.0), t_noisy.repeat_interleave(F_)])[None]
    ref = model(torch.cat([clean, noisy], dim=2), t_full, ctx, torch.arange(N_ * F_).repeat(2),
                mask=_mask(), inputs={"hdmap": torch.cat([hdmap, hdmap], dim=2)})  # fmt: skip
    no_map = model(torch.cat([clean, noisy], dim=2), t_full, ctx,
                   torch.arange(N_ * F_).repeat(2), mask=_mask(),
                   inputs={"hdmap": torch.zeros(1, 16, 2 * N_ * F_, H_, W_)})  # fmt: skip
    assert (ref - no_map).abs().max() > 1e-2  # the map steers the prediction

    cache = RollingKVCache(window_frames=WINDOW, num_layers=2, num_heads=2, head_dim=32,
                           tokens_per_frame=TPF, frames_per_block=F_, total_frames=N_ * F_)  # fmt: skip
    for blk in range(N_):
        sl = slice(blk * F_, (blk + 1) * F_)
        pos, inputs = torch.arange(sl.start, sl.stop), {"hdmap": hdmap[:, :, sl]}
        cache.begin_block(sl.start, F_)
        out = model(noisy[:, :, sl], t_noisy[blk].expand(1, F_), ctx, pos, cache, inputs=inputs)
        torch.testing.assert_close(out, ref[:, :, N_ * F_ + sl.start : N_ * F_ + sl.stop],
                                   rtol=0, atol=1e-4)  # fmt: skip
        cache.begin_block(sl.start, F_)  # commit the clean block at the context noise 128
        committed = model(clean[:, :, sl], torch.full((1, F_), 128.0), ctx, pos, cache,
                          inputs=inputs)  # fmt: skip
        torch.testing.assert_close(committed, ref[:, :, sl], rtol=0, atol=1e-4)


def test_zero_hdmap_branch_is_plain_cosmos():
    ours = _model(hdmap_init="zero")
    assert not ours.additional_patch_embedding.weight.any()
    plain = CosmosDiT(**TINY).eval()
    missing, unexpected = plain.load_state_dict(ours.state_dict(), strict=False)
    assert missing == [] and unexpected == ["additional_patch_embedding.weight"]
    x, ctx_text = torch.randn(1, 16, 2, H_, W_), torch.randn(1, 5, TINY["text_dim"])
    t, cond = torch.tensor([[700.0, 0.1]]), torch.zeros(1, 1, 2, H_, W_)
    cond[:, :, :1] = 1
    hdmap = torch.randn(1, 16, 2, H_, W_)
    got = ours(x, t, ours.prepare_context(ctx_text),
               inputs={"hdmap": hdmap, "condition_mask": cond})  # fmt: skip
    want = plain(x, t, plain.prepare_context(ctx_text), inputs={"condition_mask": cond})
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_release_checkpoint_format_loads(tmp_path):
    source = _model(seed=3)
    state = flashdreams_to_omnidreams(source.state_dict())
    assert state["net.additional_patch_embedding.proj.1.weight"].shape == (64, 16 * 4)
    assert "net.x_embedder.proj.1.weight" in state
    for other in ("net_ema.", "net_fake_score."):  # other networks of the distillation state
        state.update({other + k[4:]: torch.zeros_like(v) for k, v in state.items()
                      if k.startswith("net.")})  # fmt: skip
    state["net.accum_video_sample_counter"] = torch.tensor(7)
    path = tmp_path / "e5cadda3-8f52-43b2-b621-aa3d4c9f0588_model.pt"
    torch.save(state, path)
    with torch.device("meta"):
        meta = OmniDreamsDiT(**TINY, hdmap_init="zero")
    loaded = materialize(meta, str(path), "cpu", torch.float32)
    for name, tensor in source.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0)


def test_streamed_hdmap_encode_equals_one_shot(tmp_path):
    frames = np.random.default_rng(0).integers(0, 255, (13, 32, 32, 3), dtype=np.uint8)
    with Mp4Writer(tmp_path / "hdmap.mp4", fps=30) as writer:
        writer.write(frames)
    enc = Wan21Encoder(base_dim=8, dim_mult=[1, 2, 2, 2], num_res_blocks=1)
    control = HDMapControl(enc, video=str(tmp_path / "hdmap.mp4"), fps=30)
    control.prepare(1, height=32, width=32, num_frames=4, device="cpu")
    streamed = torch.cat([control.inputs(s, 2)["hdmap"] for s in (0, 0, 2, 2)][1::2], dim=2)
    pixels = image_to_tensor(read_last_frames(str(tmp_path / "hdmap.mp4"), 13))  # as decoded
    whole = enc.encode(pixels.permute(1, 0, 2, 3)[None])
    assert streamed.shape == whole.shape == (1, 16, 4, 4, 4)
    torch.testing.assert_close(streamed, whole, rtol=0, atol=1e-5)


def test_pushed_hdmap_frames_give_the_file_driven_rollout(tmp_path):
    """The closed loop: HDMap frames pushed block by block (control.live=true, no file) give
    the same latents as the run driven by a file of the same frames."""
    from PIL import Image

    from flashdreams.build import build_rollout
    from tests.unit.test_config import compose_run
    from tests.unit.test_omnidreams_cli import ENCODER

    frames = np.random.default_rng(1).integers(0, 255, (13, 32, 32, 3), dtype=np.uint8)
    with Mp4Writer(tmp_path / "hdmap.mp4", fps=30) as writer:
        writer.write(frames)
    Image.fromarray(frames[0]).save(tmp_path / "first.png")
    base = ["recipe=omnidreams_single_view", "model=omnidreams_tiny", "model.checkpoint=null",
            "graph=eager", "text_encoder=random", "vae=none", "device=cpu", "dtype=float32",
            "rollout.height=32", "rollout.width=32", "rollout.total_blocks=2", *ENCODER,
            "control.encoder.dtype=float32", f"image={tmp_path / 'first.png'}"]  # fmt: skip
    runs = {}
    for mode in ("file", "live"):
        extra = ([f"control.video={tmp_path / 'hdmap.mp4'}"] if mode == "file"
                 else ["control.live=true"])  # fmt: skip
        gen = torch.Generator().manual_seed(0)  # the same draws, in the same order, per run
        rollout = build_rollout(compose_run([*base, *extra]),
                                noise_fn=lambda shape, gen=gen: torch.randn(shape, generator=gen))  # fmt: skip
        rollout.start(["a road"], images=[Image.open(tmp_path / "first.png")])
        decoded = [np.asarray(f) for f in read_last_frames(str(tmp_path / "hdmap.mp4"), 13)]
        outs = []
        for step, chunk in enumerate((decoded[:5], decoded[5:13])):
            if mode == "live":
                assert rollout.control.push_frames(np.stack(chunk)) == (0, 5)[step]
            outs.append(rollout.step().latents)
        runs[mode] = torch.cat(outs, dim=2)
    torch.testing.assert_close(runs["live"], runs["file"], rtol=0, atol=0)
