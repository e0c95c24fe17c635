"""Wan 2.2 A14B two-expert MoE: bidirectional parity with diffusers, causal parity with a masked
reference, per-expert caches, recipes and checkpoint layouts.

(a) ``recipe=wan22_t2v_a14b_480p`` / ``wan22_i2v_a14b_480p`` (tiny experts, random weights) ==
    diffusers' ``WanPipeline`` / ``WanImageToVideoPipeline`` with ``transformer_2`` and
    ``boundary_ratio`` (same weights, prompt embeddings, noise, UniPC schedule, tiny VAE for the
    I2V image latents; a different guidance scale per expert). fp32, max abs difference <= 5e-5
    on the latents.
(b) ``recipe=causal_wan22_a14b_480p`` (tiny, image prefix) == a teacher-forced reference that
    recomputes every forward from scratch: one full-sequence forward of the expert of the step's
    timestep over ``[image | clean blocks so far | noisy block]`` with a block-causal mask, the
    shared (FastVideo, the recipe's default) or the expert's own text K/V, the FastVideo boundary
    bridge written out here on the scheduler's grid levels, and the rollout's noise order. Only
    correct if each expert's cache holds that expert's clean K/V of every earlier block (commit
    through both experts). fp32 latents (``scheduler.latent_dtype=null``), max abs error <= 1e-4;
    with the recipe's bf16 rounding every latent the rollout returns is a bf16 value.
(c) the two experts' caches are separate buffers and both hold clean K/V after the commit.
(d) the recipes compose with the reference settings; bad settings are one-line ConfigErrors.
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKLWan, WanImageToVideoPipeline, WanPipeline
from PIL import Image
from safetensors.torch import save_file

from flashdreams import Session
from flashdreams.build import build_model, build_rollout
from flashdreams.cache.full import FullKVCache
from flashdreams.cli import user_error
from flashdreams.graph.eager import EagerPolicy
from flashdreams.io.image import load_image
from flashdreams.io.keymap import wan_to_diffusers
from tests.parity.test_pipeline_parity import TINY_VAE, _diffusers_dit, _unipc
from tests.unit.test_config import compose_run

SIZE, FRAMES = 32, 3  # pixels (4 x 4 latents), latent frames of the bidirectional clip
TPF = (SIZE // 8 // 2) ** 2  # tokens per latent frame
PROMPT, NEGATIVE = "a fox in the snow", "blurry, static"
DIT = ["model.dim=64", "model.num_heads=4", "model.num_layers=2", "model.ffn_dim=128",
       "model.text_dim=32", "model.text_len=16", "model.checkpoint=null"]  # fmt: skip
RUN = ["device=cpu", "dtype=float32", "graph=eager", "text_encoder=random", "vae.checkpoint=null",
       "vae.base_dim=8", f"rollout.height={SIZE}", f"rollout.width={SIZE}"]  # fmt: skip
ENCODER = ["conditioner.encoder.checkpoint=null", "conditioner.encoder.base_dim=8",
           "conditioner.encoder.num_res_blocks=1"]  # fmt: skip


def _image(tmp_path) -> tuple[str, Image.Image]:
    gen = torch.Generator().manual_seed(3)
    pixels = torch.randint(0, 256, (SIZE, SIZE, 3), generator=gen, dtype=torch.uint8).numpy()
    Image.fromarray(pixels).save(tmp_path / "first.png")
    return str(tmp_path / "first.png"), Image.open(tmp_path / "first.png").convert("RGB")


def _generator_noise(seed: int):
    gen = torch.Generator().manual_seed(seed)
    return lambda shape: torch.randn(shape, generator=gen)


# ---------------------------------------------------------------- (a) bidirectional vs diffusers
@pytest.mark.parametrize("batched", [False, True])
def test_t2v_a14b_matches_wan_pipeline_with_two_transformers(batched):
    steps = 4  # UniPC at shift 12: t = [1000, 973, 923, 800]: 3 high-noise steps, 1 low
    overrides = ["recipe=wan22_t2v_a14b_480p", *DIT, *RUN, f"rollout.frames_per_block={FRAMES}",
                 f"scheduler.num_steps={steps}", f"prompt='{PROMPT}'",
                 f"negative_prompt='{NEGATIVE}'", f"guidance.batched={str(batched).lower()}"]  # fmt: skip
    torch.manual_seed(1)
    noise = torch.randn(1, 16, FRAMES, SIZE // 8, SIZE // 8)
    rollout = build_rollout(compose_run(overrides), noise_fn=lambda shape: noise.clone())
    moe = rollout.model
    plan = moe.expert_plan(rollout.scheduler.begin_block(torch.device("cpu")))
    assert plan == [0, 0, 0, 1], plan  # both experts run; the boundary falls between steps
    rollout.start([PROMPT])
    ours = rollout.step().latents

    emb = rollout.text_encoder.encode([PROMPT, NEGATIVE], torch.device("cpu"), torch.float32)
    pipe = WanPipeline(
        tokenizer=None, text_encoder=None, vae=AutoencoderKLWan(**TINY_VAE),
        scheduler=_unipc(12.0), transformer=_diffusers_dit(moe.experts[0]),
        transformer_2=_diffusers_dit(moe.experts[1]), boundary_ratio=0.875,
    )  # fmt: skip
    theirs = pipe(prompt_embeds=emb[:1], negative_prompt_embeds=emb[1:], height=SIZE, width=SIZE,
                  num_frames=1 + 4 * (FRAMES - 1), num_inference_steps=steps, guidance_scale=4.0,
                  guidance_scale_2=3.0, latents=noise.clone(), output_type="latent",
                  return_dict=False)[0]  # fmt: skip
    assert ours.shape == theirs.shape == noise.shape
    torch.testing.assert_close(ours, theirs, rtol=0, atol=5e-5)


def test_i2v_a14b_matches_wan_image_to_video_pipeline_with_two_transformers(tmp_path):
    torch.manual_seed(0)
    vae = AutoencoderKLWan(**TINY_VAE).eval()
    vae.save_pretrained(tmp_path / "vae")
    path, _ = _image(tmp_path)
    image = load_image(path)  # as flashdreams-run reads image=
    overrides = ["recipe=wan22_i2v_a14b_480p", *DIT, *RUN, f"rollout.frames_per_block={FRAMES}",
                 "scheduler.num_steps=4", f"conditioner.encoder.checkpoint={tmp_path / 'vae'}",
                 f"image={path}", f"prompt='{PROMPT}'", f"negative_prompt='{NEGATIVE}'",
                 "guidance.low_noise_scale=2.0"]  # fmt: skip
    torch.manual_seed(1)
    noise = torch.randn(1, 16, FRAMES, SIZE // 8, SIZE // 8)
    rollout = build_rollout(compose_run(overrides), noise_fn=lambda shape: noise.clone())
    moe = rollout.model
    assert moe.in_dim == 36 and moe.boundary == 0.9
    plan = moe.expert_plan(rollout.scheduler.begin_block(torch.device("cpu")))
    assert 0 in plan and 1 in plan, plan
    rollout.start([PROMPT], images=[image])
    ours = rollout.step().latents

    emb = rollout.text_encoder.encode([PROMPT, NEGATIVE], torch.device("cpu"), torch.float32)
    pipe = WanImageToVideoPipeline(
        tokenizer=None, text_encoder=None, vae=vae, scheduler=_unipc(5.0), image_processor=None,
        image_encoder=None, transformer=_diffusers_dit(moe.experts[0]),
        transformer_2=_diffusers_dit(moe.experts[1]), boundary_ratio=0.9,
    )  # fmt: skip
    theirs = pipe(image=image, prompt_embeds=emb[:1], negative_prompt_embeds=emb[1:], height=SIZE,
                  width=SIZE, num_frames=1 + 4 * (FRAMES - 1), num_inference_steps=4,
                  guidance_scale=3.5, guidance_scale_2=2.0, latents=noise.clone(),
                  output_type="latent", return_dict=False)[0]  # fmt: skip
    assert ours.shape == theirs.shape == noise.shape
    torch.testing.assert_close(ours, theirs, rtol=0, atol=5e-5)


# ---------------------------------------------------------------- (b) causal vs masked reference
def _block_causal_mask(block_ids: list[int]) -> torch.Tensor:
    ids = torch.tensor(block_ids)
    allowed = ids[None, :] <= ids[:, None]  # (query frame, key frame)
    return allowed.repeat_interleave(TPF, 0).repeat_interleave(TPF, 1)


def _bridge_step(x, flow, j, sched, noise_fn):
    """FastVideo's causal MoE sampler, written out in float64 on the scheduler's levels (x0:
    ``sigmas``, re-noising: ``renoise_sigmas``, the boundary: ``boundary_sigma``)."""
    t, s, b = sched.timesteps, sched.sigmas[j], sched.boundary_sigma
    x, flow = x.double(), flow.double()
    if j + 1 == len(t):
        return (x - s * flow).float()
    nxt = sched.renoise_sigmas[j + 1]
    if t[j] >= 875.0:  # high-noise expert: to the boundary, then the Gaussian bridge
        x_b = x - (s - b) * flow
        if t[j + 1] < 875.0:
            return x_b.float()
        a = (1 - nxt) / (1 - b)
        noise = noise_fn(tuple(x.shape)).double()
        return (a * x_b + (nxt**2 - (a * b) ** 2) ** 0.5 * noise).float()
    return ((1 - nxt) * (x - s * flow) + nxt * noise_fn(tuple(x.shape)).double()).float()


def reference_moe_rollout(moe, contexts, sched, prefix, fpb, num_blocks, noise_fn, first=None):
    """Clean latents of a teacher-forced rollout, every forward recomputed with a mask (no
    ``prefix``: text only; ``first``: frames of block 0 when they differ from ``fpb``)."""
    clean, block_ids = ([], []) if prefix is None else ([prefix], [0] * prefix.shape[2])
    for b in range(num_blocks):
        frames = first if b == 0 and first is not None else fpb
        x = noise_fn((1, 16, frames, 4, 4))
        ids = block_ids + [block_ids[-1] + 1 if block_ids else 0] * frames
        mask, positions = _block_causal_mask(ids), torch.arange(len(ids))
        for j, t in enumerate(sched.timesteps):
            expert = 0 if t >= moe.boundary * 1000 else 1
            seq = torch.cat([*clean, x], dim=2)
            t_frames = torch.tensor([0.0] * len(block_ids) + [t] * frames)[None]
            flow = moe.experts[expert](seq, t_frames, contexts[expert], positions, mask=mask)
            x = _bridge_step(x, flow[:, :, -frames:], j, sched, noise_fn)
        clean.append(x)
        block_ids = ids
    return torch.cat(clean, dim=2)


def _causal(tmp_path, *extra):
    path, image = _image(tmp_path)
    cfg = compose_run(["recipe=causal_wan22_a14b_480p", *DIT, *RUN, *ENCODER, f"image={path}",
                       "rollout.total_blocks=2", *extra])  # fmt: skip
    return build_rollout(cfg, noise_fn=_generator_noise(11)), image


@pytest.mark.parametrize("shared", [True, False])
def test_causal_moe_rollout_equals_masked_reference_per_expert(tmp_path, shared):
    rollout, image = _causal(tmp_path, f"model.shared_cross_attn={str(shared).lower()}",
                             "scheduler.latent_dtype=null")  # fmt: skip
    moe, sched = rollout.model, rollout.scheduler
    assert sched.boundary == moe.boundary == 0.875 and rollout.frames_per_block == 3
    # the checkpoint's shift-5 grid: 3 high-noise steps (t >= 875), 5 low-noise ones
    assert moe.expert_plan(sched.begin_block(torch.device("cpu"))) == [0] * 3 + [1] * 5
    rollout.start([PROMPT], images=[image])
    outs = [rollout.step() for _ in range(2)]
    ours = torch.cat([o.latents for o in outs], dim=2)

    emb = rollout.text_encoder.encode([PROMPT], torch.device("cpu"), torch.float32)
    contexts = [e.prepare_context(emb) for e in moe.experts]  # each expert's own text K/V
    if shared:  # FastVideo: one cross-attention cache, filled by the high-noise expert
        contexts[1] = contexts[0]
    prefix = outs[0].latents[:, :, :1]
    ref = reference_moe_rollout(moe, contexts, sched, prefix, 3, 2, _generator_noise(11))
    assert ours.shape == (1, 16, 1 + 2 * 3, 4, 4)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)
    if shared:  # the expert's own K/V is another model: the reference must see the difference
        own = [e.prepare_context(emb) for e in moe.experts]
        other = reference_moe_rollout(moe, own, sched, prefix, 3, 2, _generator_noise(11))
        assert (other - ref).abs().max() > 1e-3


def test_causal_t2v_rollout_with_a_one_frame_first_block_equals_masked_reference():
    """recipe=causal_wan22_t2v_a14b_480p: no image; FastVideo's MoE stage denoises block 0 as
    one latent frame, then blocks of 3, through the same experts, bridge and shared text K/V."""
    cfg = compose_run(["recipe=causal_wan22_t2v_a14b_480p", *DIT, *RUN, "rollout.total_blocks=3",
                       "scheduler.latent_dtype=null"])  # fmt: skip
    rollout = build_rollout(cfg, noise_fn=_generator_noise(13))
    moe, sched = rollout.model, rollout.scheduler
    assert (rollout.first_block_frames, rollout.frames_per_block, rollout.frame_offset) == (1, 3, 0)
    assert moe.shared_cross_attn and rollout.cache.experts[0].capacity_frames == 7
    rollout.start([PROMPT])
    outs = [rollout.step() for _ in range(3)]
    assert [o.latents.shape[2] for o in outs] == [1, 3, 3]
    assert [o.start_frame for o in outs] == [0, 1, 4]
    assert [o.frames.shape[1] for o in outs] == [1, 12, 12]  # Wan VAE: 1 + 4 (7 - 1) frames
    ours = torch.cat([o.latents for o in outs], dim=2)

    emb = rollout.text_encoder.encode([PROMPT], torch.device("cpu"), torch.float32)
    shared = moe.experts[0].prepare_context(emb)  # the high-noise expert fills the one cache
    ref = reference_moe_rollout(moe, [shared, shared], sched, None, 3, 3, _generator_noise(13),
                                first=1)  # fmt: skip
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)
    uniform = reference_moe_rollout(moe, [shared, shared], sched, None, 3, 3, _generator_noise(13))
    assert (uniform[:, :, :7] - ref).abs().max() > 1e-3  # the schedule changes the video


def test_causal_i2v_recipe_without_image_points_to_the_t2v_recipe():
    cfg = compose_run(["recipe=causal_wan22_a14b_480p", *DIT, *RUN, *ENCODER])
    with pytest.raises(Exception) as info:
        build_rollout(cfg)
    message = user_error(info.value)
    assert message is not None and "\n" not in message
    assert message.startswith("image=null") and "recipe=causal_wan22_t2v_a14b_480p" in message


def test_causal_moe_rollout_latents_are_bf16_values_by_default(tmp_path):
    rollout, image = _causal(tmp_path)  # the recipe's scheduler.latent_dtype=bfloat16
    rollout.start([PROMPT], images=[image])
    for _ in range(2):
        latents = rollout.step().latents[:, :, -3:]  # this block's frames
        assert torch.equal(latents, latents.bfloat16().float())
        assert latents.abs().sum() > 0


# ---------------------------------------------------------------- (c) per-expert caches
def test_expert_caches_are_separate_and_both_hold_clean_kv(tmp_path):
    rollout, image = _causal(tmp_path)
    moe, caches = rollout.model, rollout.cache.experts
    assert len(caches) == 2 and caches[0] is not caches[1]
    assert all(caches[0].k[i].data_ptr() != caches[1].k[i].data_ptr() for i in range(2))
    assert all(e.attention is moe.attention for e in moe.experts)  # the policy reached both
    rollout.start([PROMPT], images=[image])
    out = rollout.step()  # image frame + block 0 (frames 1..3), then the commit
    emb = rollout.text_encoder.encode([PROMPT], torch.device("cpu"), torch.float32)
    valid = caches[0].valid_tokens
    assert valid == caches[1].valid_tokens == 4 * TPF
    for e, expert in enumerate(moe.experts):  # fresh clean commits of image + block 0
        fresh = FullKVCache(num_layers=2, num_heads=4, head_dim=16, tokens_per_frame=TPF,
                            frames_per_block=3, total_frames=4)  # fmt: skip
        owner = moe.experts[0] if moe.shared_cross_attn else expert  # whose text K/V it reads
        ctx = owner.prepare_context(emb)
        for start, num in ((0, 1), (1, 3)):
            fresh.begin_block(start, num)
            x = out.latents[:, :, start : start + num]
            expert(x, torch.zeros(1, num), ctx, torch.arange(start, start + num), fresh)
        for layer in range(2):
            torch.testing.assert_close(caches[e].k[layer][:, :valid], fresh.k[layer][:, :valid],
                                       rtol=0, atol=1e-5)  # fmt: skip
            torch.testing.assert_close(caches[e].v[layer][:, :valid], fresh.v[layer][:, :valid],
                                       rtol=0, atol=1e-5)  # fmt: skip
    assert not torch.allclose(caches[0].k[1][:, :valid], caches[1].k[1][:, :valid])


class _RecordingPolicy(EagerPolicy):
    """Eager, recording the shape key and the expert of every forward."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def run(self, fn, *args, shape_key):
        self.calls.append((shape_key, args[5]))  # (x, t, ctx, positions, inputs, expert, cache)
        return fn(*args)


def test_graph_shape_key_names_the_expert(tmp_path):
    rollout, image = _causal(tmp_path)
    rollout.graph = policy = _RecordingPolicy()
    rollout.start([PROMPT], images=[image])
    rollout.step()
    rollout.step()
    # a captured graph replays one expert: equal keys never mix experts (a commit's key is
    # the forward's key with "kv": the experts' forward_kv, graphs of their own)
    kinds = ["kv" if key[-1] == "kv" else "step" for key, _ in policy.calls]
    assert all((key[0] if kind == "kv" else key)[1] == expert
               for (key, expert), kind in zip(policy.calls, kinds, strict=True))  # fmt: skip
    experts = [expert for _, expert in policy.calls]
    # image commit (both experts), 3 high + 5 low steps, commit (both), 3 high + 5 low steps
    assert experts == [0, 1] + [0] * 3 + [1] * 5 + [0, 1] + [0] * 3 + [1] * 5
    assert kinds == (["kv"] * 2 + ["step"] * 8) * 2


def test_offload_idle_expert_keeps_results_and_swaps(tmp_path):
    base, image = _causal(tmp_path)
    base.start([PROMPT], images=[image])
    want = torch.cat([base.step().latents for _ in range(2)], dim=2)
    rollout, _ = _causal(tmp_path, "model.offload_idle_expert=true")
    moe = rollout.model
    assert moe.resident == 0 and moe.commit_order() == [0, 1]
    rollout.start([PROMPT], images=[image])
    got = torch.cat([rollout.step().latents for _ in range(2)], dim=2)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert moe.resident == 1  # the last block ends on the low-noise expert (no commit after it)


def test_session_recache_rewrites_both_expert_caches():
    # the demo recipe (preview decoder, 4 steps [1000, 937.5, 833.3, 625]) with A14B experts
    cfg = compose_run(["model=wan22_t2v_a14b", *DIT, "device=cpu", "rollout.height=64",
                       "rollout.width=64", "cache.window_frames=12"])  # fmt: skip
    session = Session(cfg, prompt="a fox")
    assert session.rollout.model.expert_plan(torch.tensor([1000.0, 937.5, 833.3, 625.0])) == [
        0, 0, 1, 1]  # fmt: skip
    for _ in range(3):
        session.step()
    caches = session.rollout.cache.experts
    before = [[k.clone() for k in cache.k] for cache in caches]
    session.recache()  # replays the 3 committed blocks through each expert, into its own cache
    for cache, ks in zip(caches, before, strict=True):
        for a, b in zip(ks, cache.k, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    session.set_prompt("a burning city")
    session.step()
    assert session.last.recache_ms > 0
    assert not torch.allclose(caches[0].k[1], before[0][1])  # the switch rewrote both caches
    assert not torch.allclose(caches[1].k[1], before[1][1])


# ---------------------------------------------------------------- (d) recipes and settings
def test_recipes_compose_with_reference_settings():
    t2v = compose_run(["recipe=wan22_t2v_a14b_480p"])
    assert (t2v.model.boundary, t2v.scheduler.shift, t2v.scheduler.num_steps) == (0.875, 12, 40)
    assert (t2v.guidance.scale, t2v.guidance.low_noise_scale) == (4.0, 3.0)
    assert (t2v.model.dim, t2v.model.num_layers, t2v.model.ffn_dim, t2v.model.in_dim) == (
        5120, 40, 13824, 16)  # fmt: skip
    i2v = compose_run(["recipe=wan22_i2v_a14b_480p"])
    assert (i2v.model.boundary, i2v.scheduler.shift, i2v.scheduler.num_steps) == (0.9, 5, 40)
    assert (i2v.guidance.scale, i2v.guidance.low_noise_scale) == (3.5, 3.5)
    assert i2v.model.in_dim == 36 and i2v.model.image_dim is None
    causal = compose_run(["recipe=causal_wan22_a14b_480p", "model.boundary=0.9"])
    assert causal.scheduler.boundary == 0.9  # follows the model's boundary
    assert list(causal.scheduler.timesteps) == [1000, 850, 700, 550, 350, 275, 200, 125]
    # FastVideo's released inference: the checkpoint's shift-5 grid, bf16 latents, one shared
    # cross-attention K/V; the variant recipe keeps each expert's own text K/V
    sched = causal.scheduler
    assert (sched.grid, sched.shift, sched.latent_dtype) == ("self_forcing", 5.0, "bfloat16")
    assert causal.model.shared_cross_attn is True
    variant = compose_run(["recipe=causal_wan22_a14b_480p_expert_text_kv"])
    assert variant.model.shared_cross_attn is False and variant.scheduler == compose_run(
        ["recipe=causal_wan22_a14b_480p"]).scheduler  # fmt: skip
    assert causal.model.checkpoint.endswith("Diffusers/transformer")
    assert causal.model.low_noise_checkpoint.endswith("Diffusers/transformer_2")
    # the T2V checkpoint from text alone: FastVideo's [1, 3, 3, 3, 3, 3, 3] blocks (19 frames)
    t2v = compose_run(["recipe=causal_wan22_t2v_a14b_480p"])
    assert t2v.scheduler == compose_run(["recipe=causal_wan22_a14b_480p"]).scheduler
    assert t2v.model.shared_cross_attn is True and t2v.cache == causal.cache
    assert "rand0nmr/SFWan2.2-T2V-A14B-Diffusers/transformer" in t2v.model.checkpoint
    assert t2v.model.low_noise_checkpoint.endswith("T2V-A14B-Diffusers/transformer_2")
    r = t2v.rollout
    assert (r.first_block_frames, r.frames_per_block, r.total_blocks) == (1, 3, 7)
    assert t2v.conditioner._target_.endswith("NoConditioner") and t2v.text_recipe is None


@pytest.mark.parametrize("override,needle", [
    ("model.boundary=1.5", "model.boundary=1.5 must be in (0, 1)"),
    ("model.offload_idle_expert=true graph=cuda_graph", "model.offload_idle_expert=true"),
    ("model.offload_idle_expert=true graph=compile_cuda_graph", "model.offload_idle_expert=true"),
    ("model.boundary=0", "model.boundary=0"),
    ("guidance.low_noise_scale=-1", "guidance.low_noise_scale=-1.0 must be >= 0"),
])  # fmt: skip
def test_bad_moe_setting_is_one_line_config_error(override, needle):
    cfg = compose_run(["recipe=wan22_t2v_a14b_480p", *DIT, *RUN, "rollout.frames_per_block=3",
                       *override.split()])  # fmt: skip
    with pytest.raises(Exception) as info:
        build_rollout(cfg)
    message = user_error(info.value)
    assert message is not None and needle in message and "\n" not in message


# ---------------------------------------------------------------- checkpoint layouts
def _write_expert(folder, state, diffusers: bool) -> None:
    folder.mkdir(parents=True)
    if diffusers:
        state = wan_to_diffusers(state)
        (folder / "config.json").write_text(json.dumps({"_class_name": "WanTransformer3DModel"}))
    save_file({k: v.contiguous() for k, v in state.items()},
              folder / "diffusion_pytorch_model.safetensors")  # fmt: skip


@pytest.mark.parametrize("layout", [("high_noise_model", "low_noise_model", False),
                                    ("transformer", "transformer_2", True)])  # fmt: skip
def test_both_expert_checkpoint_layouts_load(tmp_path, layout):
    high, low, diffusers = layout
    cfg = compose_run(["model=wan22_t2v_a14b", *DIT])
    src = build_model(cfg.model, torch.device("cpu"), torch.float32, seed=5)
    for name, expert in ((high, src.experts[0]), (low, src.experts[1])):
        _write_expert(tmp_path / name, expert.state_dict(), diffusers)
    for extra in ([f"model.checkpoint={tmp_path}"],
                  [f"model.checkpoint={tmp_path / high}",
                   f"model.low_noise_checkpoint={tmp_path / low}"]):  # fmt: skip
        got = build_model(compose_run(["model=wan22_t2v_a14b", *DIT, *extra]).model,
                          torch.device("cpu"), torch.float32, seed=0)  # fmt: skip
        for name, value in src.state_dict().items():
            torch.testing.assert_close(got.state_dict()[name], value, rtol=0, atol=0)
    with pytest.raises(Exception) as info:  # one expert named, the other missing
        build_model(compose_run(["model=wan22_t2v_a14b", *DIT,
                                 f"model.checkpoint={tmp_path / high}"]).model,
                    torch.device("cpu"), torch.float32, seed=0)  # fmt: skip
    message = str(user_error(info.value))
    assert message.startswith("model.low_noise_checkpoint=null") and "\n" not in message


def test_idle_expert_move_follows_a_fused_qkv():
    """graph=compile fuses q/k/v after the experts are placed: a move installs the fused tensor
    (the one the forward reads) from the host copy, and q/k/v become views of it again."""
    cfg = compose_run(["model=wan22_t2v_a14b", *DIT, "model.offload_idle_expert=true"])
    moe = build_model(cfg.model, torch.device("cpu"), torch.float32, seed=0)
    for expert in moe.experts:
        for block in expert.blocks:
            block.self_attn.fuse_qkv()
    moe._move(1, torch.device("cpu"))  # the layout changed: host copies are taken again
    tensors, fused = moe._tensors(1)
    assert len(fused) == len(moe.experts[1].blocks)
    sa = fused[0]
    index = next(i for i, t in enumerate(tensors) if t is sa.qkv_weight)
    marked = moe._host[1][index] + 1.0  # a host copy the live weights do not hold yet
    moe._host[1][index] = marked
    moe._move(1, torch.device("cpu"))
    torch.testing.assert_close(sa.qkv_weight, marked, rtol=0, atol=0)
    dim = sa.q.weight.shape[0]
    torch.testing.assert_close(sa.k.weight, marked[dim : 2 * dim], rtol=0, atol=0)
    h = torch.randn(1, 5, sa.qkv_weight.shape[1])
    q, k, v = sa.project(h)
    torch.testing.assert_close(k, sa.k(h))  # fused GEMM and the q/k/v views agree
