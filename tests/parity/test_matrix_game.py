"""Matrix-Game 2.0: KV-cached AR rollout (with the action modules' own K/V branches) == one
full-sequence forward with a block-causal mask; zero action projections leave the base DiT.

The masked reference runs the clean and noisy copies of every block in one sequence
([clean blocks | noisy blocks], same RoPE positions, same action windows). Tolerance: fp32,
max abs error <= 1e-4 (observed ~1e-6).
"""

import copy
from functools import partial

import pytest
import torch

from flashdreams.cache.full import FullKVCache
from flashdreams.cache.rolling import RollingKVCache
from flashdreams.graph.compile import compile_blocks
from flashdreams.model.matrix_game import MatrixGameDiT
from flashdreams.model.wan import WanDiT

F, H, W, N = 3, 4, 4, 4  # frames per block, latent size, blocks
TPF = (H // 2) * (W // 2)
TINY = dict(dim=64, num_heads=4, num_layers=3, ffn_dim=128, image_dim=32, action_blocks=2,
            action_heads=2, action_embed_dim=8, keyboard_hidden_dim=32, mouse_hidden_dim=32,
            action_rope_dims=(4, 6, 6))  # fmt: skip


def tiny_matrix_game(seed: int = 0, **overrides) -> MatrixGameDiT:
    model = MatrixGameDiT(**{**TINY, **overrides})
    model.init_weights(torch.Generator().manual_seed(seed))
    return model.eval().requires_grad_(False)


def _visible(q_block: int, window: int | None) -> list[int]:
    """Clean frames (before block q_block) a block's queries see through the cache (no sink)."""
    end = (q_block + 1) * F
    lo = 0 if window is None else end - window
    return [f for f in range(q_block * F) if f >= lo]


def _mask(window: int | None) -> torch.Tensor:
    frames = 2 * N * F  # [clean frames | noisy frames]
    allowed = torch.zeros(frames, frames, dtype=torch.bool)
    for b in range(N):
        own = list(range(b * F, (b + 1) * F))
        for offset in (0, N * F):  # clean query block, noisy query block
            for q in own:
                allowed[offset + q, _visible(b, window)] = True
                allowed[offset + q, [offset + f for f in own]] = True
    return allowed.repeat_interleave(TPF, 0).repeat_interleave(TPF, 1)


@pytest.mark.parametrize("mouse_dim,window", [(2, 6), (2, 4), (0, None)])
def test_cached_rollout_with_action_branches_equals_masked_full_sequence(mouse_dim, window):
    model = tiny_matrix_game(mouse_dim=mouse_dim)
    ctx = model.prepare_context(None, torch.randn(1, 257, 32))
    clean = torch.randn(1, 16, N * F, H, W)
    noisy = torch.randn(1, 16, N * F, H, W)
    t_noisy = torch.rand(N) * 1000
    inputs = {"image_latents": torch.randn(1, 20, N * F, H, W),
              "keyboard": torch.randint(0, 2, (1, N * F, 12, 4)).float()}  # fmt: skip
    if mouse_dim:
        inputs["mouse"] = torch.randn(1, N * F, 12, 2) * 0.1

    # reference: one masked forward over [clean | noisy]
    twice = {k: torch.cat([v, v], dim=2 if v.ndim == 5 else 1) for k, v in inputs.items()}
    x_all = torch.cat([clean, noisy], dim=2)
    t_all = torch.cat([torch.zeros(N * F), t_noisy.repeat_interleave(F)])[None]
    pos = torch.arange(N * F).repeat(2)
    ref = model(x_all, t_all, ctx, pos, mask=_mask(window), inputs=twice)

    if window is None:
        factory = FullKVCache
    else:
        factory = partial(RollingKVCache, window_frames=window, sink_frames=0)
    cache = model.build_cache(factory, tokens_per_frame=TPF, frames_per_block=F,
                              total_frames=N * F, batch_size=1, device="cpu",
                              dtype=torch.float32)  # fmt: skip
    assert set(cache.branches) == ({"keyboard", "mouse"} if mouse_dim else {"keyboard"})
    for b in range(N):
        sl = slice(b * F, (b + 1) * F)
        step = {k: v[:, :, sl] if v.ndim == 5 else v[:, sl] for k, v in inputs.items()}
        positions = torch.arange(b * F, (b + 1) * F)
        cache.begin_block(b * F, F)
        for _ in range(2):  # two denoising forwards write the same slots
            out = model(noisy[:, :, sl], t_noisy[b].expand(1, F), ctx, positions, cache,
                        inputs=step)  # fmt: skip
        torch.testing.assert_close(out, ref[:, :, N * F + b * F : N * F + (b + 1) * F],
                                   rtol=0, atol=1e-4)  # fmt: skip
        cache.begin_block(b * F, F)
        committed = model(clean[:, :, sl], torch.zeros(1, F), ctx, positions, cache, inputs=step)
        torch.testing.assert_close(committed, ref[:, :, sl], rtol=0, atol=1e-4)


def test_actions_change_the_output_and_zero_projections_leave_the_base_dit():
    """With trained-like (random) action weights the keys change the prediction; with the
    output projections zeroed (the release's init) the model equals a plain Wan DiT of the same
    base weights (an independent network: ``WanDiT`` without action modules)."""
    model = tiny_matrix_game()
    image = torch.randn(1, 257, 32)
    ctx = model.prepare_context(None, image)
    x, t = torch.randn(1, 16, F, H, W), torch.full((1, F), 500.0)
    inputs = {"image_latents": torch.randn(1, 20, F, H, W),
              "keyboard": torch.zeros(1, F, 12, 4), "mouse": torch.zeros(1, F, 12, 2)}  # fmt: skip
    idle = model(x, t, ctx, inputs=inputs)
    pressed = model(x, t, ctx, inputs={**inputs, "keyboard": torch.ones(1, F, 12, 4)})
    turned = model(x, t, ctx, inputs={**inputs, "mouse": torch.full((1, F, 12, 2), 0.1)})
    assert (pressed - idle).abs().max() > 1e-3 and (turned - idle).abs().max() > 1e-3

    for i in model.action_blocks:
        model.blocks[i].action_model.proj_mouse.weight.zero_()
        model.blocks[i].action_model.proj_keyboard.weight.zero_()
    base = WanDiT(**{k: TINY[k] for k in ("dim", "num_heads", "num_layers", "ffn_dim")},
                  in_dim=36, text_dim=16, text_len=1).eval()  # fmt: skip
    del base.text_embedding
    state = {k: v for k, v in model.state_dict().items() if "action_model" not in k
             and not k.startswith("img_emb")}  # fmt: skip
    base.load_state_dict(state, strict=True)
    img = model.img_emb(image)
    base_ctx = [blk.cross_attn.context_kv(img, None) for blk in base.blocks]
    expected = base(x, t, base_ctx, inputs={"image_latents": inputs["image_latents"]})
    got = model(x, t, ctx, inputs={**inputs, "keyboard": torch.ones(1, F, 12, 4)})
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_fused_blocks_equal_unfused():
    """The fused path a graph policy installs (q/k/v GEMM, GELU epilogue, norms + modulation +
    residuals as one pass, norm1 handed across blocks through the action blocks, the action
    modules' norm + RoPE and frame-attention kernels) gives the unfused result (CPU runs the
    fused ops' reference math)."""
    model = tiny_matrix_game()
    ctx = model.prepare_context(None, torch.randn(1, 257, 32))
    x, t = torch.randn(1, 16, F, H, W), torch.full((1, F), 400.0)
    inputs = {"image_latents": torch.randn(1, 20, F, H, W),
              "keyboard": torch.rand(1, F, 12, 4), "mouse": torch.randn(1, F, 12, 2)}  # fmt: skip
    plain = model(x, t, ctx, inputs=inputs)
    for block in model.blocks:
        block.self_attn.fuse_qkv()
        block.fuse_ffn_gelu()
        block.fuse_norms()
    torch.testing.assert_close(model(x, t, ctx, inputs=inputs), plain, rtol=0, atol=1e-5)
    assert all(model.blocks[i].action_model.fused for i in model.action_blocks)


@pytest.mark.parametrize("mouse_dim", [2, 0])
def test_compiled_action_blocks_equal_eager(mouse_dim, monkeypatch):
    """What graph=compile runs (``compile_blocks``: fused q/k/v, GELU and norms, every region
    compiled with ``fullgraph``; an action block's are its self-attention's two, ``action_in``
    and ``action_out``, with only the action caches' writes between) equals eager over AR
    blocks that fill, then wrap, the 6-frame window of the DiT's and both action caches: the
    outputs and the action caches' contents. The backend is aot_eager (Dynamo's whole graph
    and AOT's functionalization, where a region could break or lose a write; Inductor's
    kernels are checked on CUDA by tests/gpu/test_matrix_game_gpu.py), which keeps it quick."""
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile",
                        lambda fn, mode=None, **kw: compile_(fn, backend="aot_eager", **kw))  # fmt: skip
    torch._dynamo.reset()
    model = tiny_matrix_game(mouse_dim=mouse_dim)
    compiled = compile_blocks(copy.deepcopy(model), "default", False)
    ctx = model.prepare_context(None, torch.randn(1, 257, 32))
    factory = partial(RollingKVCache, window_frames=6, sink_frames=0)
    caches = [model.build_cache(factory, tokens_per_frame=TPF, frames_per_block=F,
                                total_frames=None, batch_size=1, device="cpu",
                                dtype=torch.float32) for _ in range(2)]  # fmt: skip
    gen = torch.Generator().manual_seed(3)
    for b in range(3):
        inputs = {"image_latents": torch.randn(1, 20, F, H, W, generator=gen),
                  "keyboard": torch.randint(0, 2, (1, F, 12, 4), generator=gen).float()}  # fmt: skip
        if mouse_dim:
            inputs["mouse"] = torch.randn(1, F, 12, 2, generator=gen) * 0.1
        x, t = torch.randn(1, 16, F, H, W, generator=gen), torch.full((1, F), 700.0 - 200 * b)
        positions = torch.arange(b * F, (b + 1) * F)
        outs = []
        for net, cache in zip((model, compiled), caches, strict=True):
            cache.begin_block(b * F, F)
            outs.append(net(x, t, ctx, positions, cache, inputs=inputs))
        torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-5)
    assert {"action_in", "action_out"} <= set(vars(compiled.blocks[0]))  # compiled in place
    for name in caches[0].branches:
        want, got = caches[0].branch(name), caches[1].branch(name)
        for layer in range(len(model.action_blocks)):
            torch.testing.assert_close(got.k[layer], want.k[layer], rtol=0, atol=1e-5)
            torch.testing.assert_close(got.v[layer], want.v[layer], rtol=0, atol=1e-5)
