"""FlashVSR v1.1: the LR projector streamed chunk by chunk (6 latent frames, then 2) equals a
plain re-implementation of the release's ``Buffer_LQ4x_Proj.stream_forward`` loop and its
whole-clip run; the cached one-step rollout (the release's 6-frame first chunk then 2-frame
chunks, or 2-frame chunks throughout; KV window of 3 chunks + the current one, K/V kept from
the denoising forward) equals one masked full-sequence forward.

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
from flashdreams.rollout import BlockSchedule

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
    with torch.device("meta"):  # the release's sizes
        real = LRProjector()
    assert real.conv1.weight.shape == (2048, 768, 4, 3, 3)
    assert real.conv2.weight.shape == (3072, 2048, 4, 3, 3)
    assert real.linear_layers[0].weight.shape == (1536, 3072)


FPB, FRAMES, LH, LW = 2, 12, 4, 6  # frames per later chunk, latent frames, latent size
TPF = (LH // 2) * (LW // 2)
WINDOW = 8  # kv_ratio 3 chunks + the current one


def _mask(schedule: BlockSchedule, chunks: int) -> torch.Tensor:
    """A chunk attends to itself (bidirectionally) and the frames before it in the window."""
    allowed = torch.zeros(FRAMES, FRAMES, dtype=torch.bool)
    for b in range(chunks):
        lo, hi = schedule.start(b), schedule.start(b) + schedule.frames(b)
        allowed[lo:hi, max(0, hi - WINDOW) : hi] = True
    return allowed.repeat_interleave(TPF, 0).repeat_interleave(TPF, 1)


@pytest.mark.parametrize("first", [2, 6], ids=["uniform", "release-6-then-2"])
@pytest.mark.parametrize("lr_layers", [1, 2])
def test_one_step_rollout_equals_masked_full_sequence(lr_layers, first):
    """The release's schedule (first=6): chunk 0 covers latent frames 0-5, then 2 per chunk at
    RoPE frames 6, 8, ... (its ``4 + 2 i``), each attending to the last 8 frames: the first
    chunk's 6 and then the sliding 3 chunks of 2 before the current one."""
    model = FlashVSRDiT(dim=64, num_heads=4, num_layers=3, ffn_dim=128, text_dim=16, text_len=8,
                        lr_layers=lr_layers)  # fmt: skip
    model.init_weights(torch.Generator().manual_seed(0))
    model.eval().requires_grad_(False)
    assert model.commit_mode == "none"
    ctx = model.prepare_context(torch.randn(1, 8, 16))
    schedule = BlockSchedule(FPB, first)
    chunks = 1 + (FRAMES - first) // FPB
    assert schedule.total(chunks) == FRAMES
    noise = torch.randn(1, 16, FRAMES, LH, LW)
    feats = torch.randn(1, lr_layers, FRAMES * TPF, 64)
    t = torch.full((1, FRAMES), 1000.0)
    mask = _mask(schedule, chunks)
    ref = model(noise, t, ctx, mask=mask, inputs={"lr_features": feats})
    plain = model(noise, t, ctx, mask=mask)
    assert (plain - ref).abs().max() > 1e-3  # the LR features reach the output

    cache = model.build_cache(partial(RollingKVCache, window_frames=WINDOW, sink_frames=0),
                              tokens_per_frame=TPF, frames_per_block=schedule.max_frames,
                              total_frames=None, batch_size=1, device="cpu",
                              dtype=torch.float32)  # fmt: skip
    for b in range(chunks):  # one forward per chunk; its K/V stay (no commit forward)
        sl = slice(schedule.start(b), schedule.start(b) + schedule.frames(b))
        cache.begin_block(sl.start, sl.stop - sl.start)
        step = {"lr_features": feats[:, :, sl.start * TPF : sl.stop * TPF]}
        out = model(noise[:, :, sl], t[:, sl], ctx, torch.arange(sl.start, sl.stop), cache,
                    inputs=step)  # fmt: skip
        torch.testing.assert_close(out, ref[:, :, sl], rtol=0, atol=1e-4)


def _release_sparse_attention(q, k, v, grid, topk, local_range):
    """The release's windowed block-sparse self-attention written out (batch 1): partition
    into (2, 8, 8) windows, the draft mask of mean-pooled q.k under the local mask, then
    dense attention of each query block to its kept key blocks (window order), reversed."""
    (_, lq, heads, d), (h, w) = q.shape, grid
    fq, fk = lq // (h * w), k.shape[1] // (h * w)

    def part(x, f):  # (1, f h w, H, D) -> (windows, 128, H D)
        x = x.reshape(f // 2, 2, h // 8, 8, w // 8, 8, heads * d)
        return x.permute(0, 2, 4, 1, 3, 5, 6).reshape(-1, 128, heads * d)

    qw, kw, vw = part(q, fq), part(k, fk), part(v, fk)
    pq = qw.mean(1).view(-1, heads, d).transpose(0, 1)  # (H, nq, d)
    pk = kw.mean(1).view(-1, heads, d).transpose(0, 1)
    scores = pq @ pk.transpose(1, 2) / d**0.5
    rows, cols = h // 8, w // 8
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    r, c = r.reshape(-1), c.reshape(-1)
    start_r, start_c = r - local_range // 2, c - local_range // 2
    local = ((r[None] >= start_r[:, None]) & (r[None] <= start_r[:, None] + local_range - 1)
             & (c[None] >= start_c[:, None]) & (c[None] <= start_c[:, None] + local_range - 1))  # fmt: skip
    n = rows * cols
    local = local.unsqueeze(1).unsqueeze(0).repeat(fq // 2, 1, fk // 2, 1).reshape(fq // 2 * n, -1)
    attn = (scores + torch.zeros_like(scores).masked_fill(~local, float("-inf"))).softmax(-1)
    flat = attn.reshape(heads * (fq // 2), -1)
    keep = min(flat.shape[1] - 1, topk)
    thr = flat.topk(keep + 1, dim=1).values[:, -1:]
    blocks = (flat > thr).reshape(heads, -1, attn.shape[-1])  # (H, nq, nk)
    tok = blocks.repeat_interleave(128, 1).repeat_interleave(128, 2)
    qs = qw.reshape(-1, heads, d).transpose(0, 1)  # (H, nq 128, d)
    ks, vs = (x.reshape(-1, heads, d).transpose(0, 1) for x in (kw, vw))
    out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=tok)
    out = torch.where(tok.any(-1, keepdim=True), out, 0).transpose(0, 1)  # (nq 128, H, d)
    out = out.reshape(fq // 2, rows, cols, 2, 8, 8, heads, d).permute(0, 3, 1, 4, 2, 5, 6, 7)
    return out.reshape(1, lq, heads, d), blocks


@pytest.mark.parametrize("fq,fk", [(2, 8), (6, 6)], ids=["later-chunk", "first-chunk"])
def test_sparse_mask_in_natural_order_equals_the_release_windowed_attention(fq, fk):
    """A later chunk (2 frames, 3 cached chunks + itself) and the release's first chunk (6
    frames attending to themselves: top-k per query frame pair over all 3 pairs)."""
    from flashdreams.model.flashvsr.sparse import token_mask, topk_count

    torch.manual_seed(0)
    grid, heads, d = (16, 24), 2, 8
    q = torch.randn(1, fq * 16 * 24, heads, d)
    k = torch.randn(1, fk * 16 * 24, heads, d)
    v = torch.randn_like(k)
    ratio, local_range = 0.2, 3
    ref, blocks = _release_sparse_attention(q, k, v, grid, topk_count(grid, ratio), local_range)
    assert 0.1 < blocks.float().mean() < 0.9  # the top-k and the local range both cut
    mask = token_mask(q, k, grid, ratio, local_range)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask).transpose(1, 2)  # fmt: skip
    out = torch.where(mask.any(-1).transpose(1, 2)[..., None], out, 0)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def _sparse_rollout(attention=None, **kw) -> torch.Tensor:
    model = FlashVSRDiT(dim=32, num_heads=2, num_layers=2, ffn_dim=64, text_dim=16, text_len=8,
                        **kw)  # fmt: skip
    if attention is not None:
        from flashdreams.attention.base import Attention

        model.set_attention(Attention(attention))
    model.init_weights(torch.Generator().manual_seed(0))
    model.eval().requires_grad_(False)
    torch.manual_seed(1)
    ctx = model.prepare_context(torch.randn(1, 8, 16))
    lh, lw, chunks = 32, 32, 3  # token grid 16 x 16: 4 windows per frame pair
    tpf = (lh // 2) * (lw // 2)
    noise = torch.randn(1, 16, 2 * chunks, lh, lw)
    feats = torch.randn(1, 1, 2 * chunks * tpf, 32)
    cache = model.build_cache(partial(RollingKVCache, window_frames=WINDOW, sink_frames=0),
                              tokens_per_frame=tpf, frames_per_block=2, total_frames=None,
                              batch_size=1, device="cpu", dtype=torch.float32)  # fmt: skip
    outs = []
    for b in range(chunks):
        sl = slice(2 * b, 2 * b + 2)
        cache.begin_block(2 * b, 2)
        step = {"lr_features": feats[:, :, 2 * b * tpf : (2 * b + 2) * tpf]}
        outs.append(model(noise[:, :, sl], torch.full((1, 2), 1000.0), ctx,
                          torch.arange(sl.start, sl.stop), cache, inputs=step))  # fmt: skip
    return torch.cat(outs, dim=2)


def test_sparse_rollout_attends_through_the_mask():
    """A cutting mask changes the rollout; a mask that keeps every block but the release's
    always-dropped one (``flat > the (topk + 1)-th value`` drops the smallest) stays close."""
    dense = _sparse_rollout()
    cut = _sparse_rollout(sparse_ratio=0.05, local_range=1)
    assert (cut - dense).abs().max() > 1e-2
    wide = _sparse_rollout(sparse_ratio=100.0, local_range=9)
    assert (wide - dense).abs().max() < (cut - dense).abs().max()


def test_a_huge_ratio_keeps_all_but_the_smallest_block():
    from flashdreams.model.flashvsr.sparse import block_mask

    torch.manual_seed(0)
    q, k = torch.randn(1, 2 * 16 * 16, 2, 8), torch.randn(1, 6 * 16 * 16, 2, 8)
    blocks = block_mask(q, k, (16, 16), 100.0, 9)  # (1, 2, 4, 12)
    assert blocks.shape == (1, 2, 4, 12)
    assert (blocks.view(1, 2, -1).sum(-1) == 4 * 12 - 1).all()


def test_tcdecoder_streams_as_its_whole_clip_with_the_release_key_layout(tmp_path):
    from flashdreams.model.flashvsr.tcdecoder import TCDecoder, lr_groups

    dec = TCDecoder(channels=(8, 8, 4, 4))
    keys = set(dec.state_dict())
    # the release's deepened stack: conv 1, identity conv 3 (no bias), MemBlocks 5-7, TGrow 9,
    # conv 10, ..., identity conv 24, head conv 26
    assert {"decoder.1.weight", "decoder.3.weight", "decoder.5.conv.0.weight",
            "decoder.9.conv.weight", "decoder.24.weight", "decoder.26.bias"} <= keys  # fmt: skip
    assert "decoder.3.bias" not in keys and dec.decoder[1].in_channels == 16 + 768
    path = tmp_path / "TCDecoder.ckpt"
    torch.save({k: torch.randn_like(v) * 0.1 for k, v in dec.state_dict().items()}, path)
    dec = TCDecoder(str(path), channels=(8, 8, 4, 4))

    torch.manual_seed(0)
    latents = torch.randn(1, 16, 10, 4, 4)
    lr = torch.rand(1, 3, 41, 32, 32) * 2 - 1
    whole = dec.decode_full(latents, lr_groups(lr, 0, 10))
    dec.reset()
    parts = [dec.decode_step(latents[:, :, :6], lr_groups(lr, 0, 6))]
    parts += [dec.decode_step(latents[:, :, s : s + 2], lr_groups(lr, s, 2)) for s in (6, 8)]
    assert whole.shape == (1, 37, 3, 32, 32)
    torch.testing.assert_close(torch.cat(parts, dim=1), whole, rtol=0, atol=1e-5)
    # the LR frames reach the output
    other = dec.decode_full(latents, lr_groups(-lr, 0, 10))
    assert (other - whole).abs().max() > 1e-3


def test_flex_block_sparse_path_equals_the_explicit_mask():
    """attention=flex: tokens in window order and a BlockMask of the kept 128-token blocks give
    the masked-SDPA reference (fp32, <= 1e-5), also with query blocks that keep nothing."""
    from flashdreams.attention.flex import FlexAttention

    ref = _sparse_rollout(sparse_ratio=0.05, local_range=1)
    flex = _sparse_rollout(FlexAttention(unmasked="math", compile=False), sparse_ratio=0.05,
                           local_range=1)  # fmt: skip
    torch.testing.assert_close(flex, ref, rtol=0, atol=1e-5)


def test_an_odd_block_under_sparse_attention_is_a_one_line_error():
    from flashdreams import ConfigError
    from flashdreams.model.flashvsr.sparse import block_mask

    q = torch.randn(1, 3 * 16 * 16, 2, 8)  # 3 latent frames: not whole (2, 8, 8) windows
    with pytest.raises(ConfigError, match="rollout.first_block_frames") as info:
        block_mask(q, q, (16, 16), 2.0, 9)
    assert "\n" not in str(info.value)
