"""Causal-Forcing rollouts (frame-wise, chunk-wise, frame-wise I2V) == full-sequence masked forwards.

The rollout is built from the recipes (tiny DiT, random weights) and runs with its KV cache.
The reference recomputes every denoising forward from scratch as one full-sequence forward over
``[clean frames so far | noisy block]`` with a block-causal mask (a frame sees the frames of its
own block and of earlier blocks; clean frames at t = 0), RoPE at absolute positions, and the same
noise drawn in the rollout's documented order (per block: initial noise, then one draw per
re-noising step). For I2V the encoded image is block 0 of the clean frames. Tolerance: fp32,
max abs error <= 1e-4 on every generated latent.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from flashdreams.build import build_rollout
from flashdreams.io.image import image_to_tensor
from tests.unit.test_config import compose_run

ATOL = 1e-4
SIZE = 32  # pixels -> 4 x 4 latents
TPF = (SIZE // 8 // 2) ** 2  # tokens per latent frame (patch 2 x 2)
TINY = ["model.dim=64", "model.num_heads=4", "model.num_layers=2", "model.ffn_dim=128",
        "model.text_dim=32", "model.text_len=16", "model.checkpoint=null", "device=cpu",
        "dtype=float32", "graph=eager", "text_encoder=random", "vae.checkpoint=null", "vae.base_dim=8",
        f"rollout.height={SIZE}", f"rollout.width={SIZE}"]  # fmt: skip
ENCODER = ["conditioner.encoder.checkpoint=null", "conditioner.encoder.base_dim=8",
           "conditioner.encoder.num_res_blocks=1"]  # fmt: skip


def _generator_noise(seed: int):
    gen = torch.Generator().manual_seed(seed)
    return lambda shape: torch.randn(shape, generator=gen)


def _block_causal_mask(block_ids: list[int], tokens_per_frame: int) -> torch.Tensor:
    ids = torch.tensor(block_ids)
    allowed = ids[None, :] <= ids[:, None]  # (query frame, key frame)
    return allowed.repeat_interleave(tokens_per_frame, 0).repeat_interleave(tokens_per_frame, 1)


def reference_rollout(model, ctx, timesteps, fpb, num_blocks, noise_fn, prefix=None, first=None):
    """Clean latents (B, C, T, h, w) of a teacher-forced masked-forward rollout (block 0 of
    ``first`` frames when given, else ``fpb``)."""
    clean, block_ids = [], []
    if prefix is not None:
        clean, block_ids = [prefix], [0] * prefix.shape[2]
    for b in range(num_blocks):
        fpb_b = first if b == 0 and first is not None else fpb
        block = (block_ids[-1] + 1) if block_ids else 0
        x = noise_fn((1, 16, fpb_b, 4, 4))
        ids = block_ids + [block] * fpb_b
        mask = _block_causal_mask(ids, TPF)
        positions = torch.arange(len(ids))
        for j, t in enumerate(timesteps):
            seq = torch.cat([*clean, x], dim=2)
            t_frames = torch.tensor([0.0] * len(block_ids) + [t] * fpb_b)[None]
            flow = model(seq, t_frames, ctx, positions, mask=mask)[:, :, -fpb_b:]
            x0 = x - t / 1000.0 * flow
            if j + 1 < len(timesteps):
                s = timesteps[j + 1] / 1000.0
                x = (1 - s) * x0 + s * noise_fn(tuple(x.shape))
        clean.append(x0)
        block_ids = ids
    return torch.cat(clean, dim=2)


def _run(rollout, images=None) -> tuple[torch.Tensor, list]:
    rollout.start(["a fox in the snow"], images=images)
    outs = [rollout.step() for _ in range(rollout.total_blocks)]
    return torch.cat([o.latents for o in outs], dim=2), outs


@pytest.mark.parametrize("recipe,fpb,blocks", [
    ("causal_forcing_wan21_t2v_1_3b_framewise", 1, 6),
    ("causal_forcing_wan21_t2v_1_3b_chunkwise", 3, 3),
])  # fmt: skip
def test_t2v_rollout_equals_masked_reference(recipe, fpb, blocks):
    cfg = compose_run([f"recipe={recipe}", *TINY, f"rollout.total_blocks={blocks}"])
    assert cfg.rollout.frames_per_block == fpb and cfg.rollout.context_noise == 0
    rollout = build_rollout(cfg, noise_fn=_generator_noise(7))
    ours, outs = _run(rollout)
    ref = reference_rollout(rollout.model, rollout.context(), rollout.scheduler.timesteps, fpb,
                            blocks, _generator_noise(7))  # fmt: skip
    assert ours.shape == (1, 16, fpb * blocks, 4, 4)
    torch.testing.assert_close(ours, ref, rtol=0, atol=ATOL)
    assert [o.start_frame for o in outs] == [b * fpb for b in range(blocks)]
    assert sum(o.frames.shape[1] for o in outs) == 1 + 4 * (fpb * blocks - 1)


def test_i2v_framewise_rollout_equals_masked_reference(tmp_path):
    blocks = 5
    gen = torch.Generator().manual_seed(3)
    pixels = torch.randint(0, 256, (SIZE, SIZE, 3), generator=gen, dtype=torch.uint8).numpy()
    Image.fromarray(pixels).save(tmp_path / "first.png")
    image = Image.open(tmp_path / "first.png").convert("RGB")
    cfg = compose_run(["recipe=causal_forcing_wan21_i2v_1_3b_framewise", *TINY, *ENCODER,
                       f"rollout.total_blocks={blocks}", f"image={tmp_path / 'first.png'}"])  # fmt: skip
    rollout = build_rollout(cfg, noise_fn=_generator_noise(11))
    ours, outs = _run(rollout, images=[image])

    prefix = rollout.conditioner.encoder.encode(image_to_tensor([image]).unsqueeze(2))
    torch.testing.assert_close(ours[:, :, :1], prefix, rtol=0, atol=0)  # frame 0 is the image
    ref = reference_rollout(rollout.model, rollout.context(), rollout.scheduler.timesteps, 1,
                            blocks, _generator_noise(11), prefix=prefix)  # fmt: skip
    assert ours.shape == (1, 16, 1 + blocks, 4, 4)
    torch.testing.assert_close(ours, ref, rtol=0, atol=ATOL)
    assert [o.start_frame for o in outs] == [0, *range(2, 1 + blocks)]
    assert outs[0].frames.shape[1] == 1 + 4  # the image frame + block 0 (one latent frame)
    assert sum(o.frames.shape[1] for o in outs) == 1 + 4 * blocks


@pytest.mark.parametrize("window", [None, 4])
def test_t2v_rollout_with_a_one_frame_first_block_equals_masked_reference(window):
    """rollout.first_block_frames=1: block 0 is one latent frame, later blocks 3 (FastVideo's
    causal Wan 2.2 T2V schedule on the chunk-wise recipe); with a 4-frame rolling window the
    third block no longer sees frame 0, and the reference must agree."""
    extra = [] if window is None else [f"cache.window_frames={window}"]
    cfg = compose_run(["recipe=causal_forcing_wan21_t2v_1_3b_chunkwise", *TINY,
                       "rollout.total_blocks=3", "rollout.first_block_frames=1", *extra])  # fmt: skip
    rollout = build_rollout(cfg, noise_fn=_generator_noise(5))
    ours, outs = _run(rollout)
    assert [o.start_frame for o in outs] == [0, 1, 4]
    assert [o.latents.shape[2] for o in outs] == [1, 3, 3]
    assert [o.timer.latent_frames for o in outs] == [1, 3, 3]
    assert [o.frames.shape[1] for o in outs] == [1, 12, 12]  # 1 + 4 (7 - 1) video frames
    if window is None:
        ref = reference_rollout(rollout.model, rollout.context(), rollout.scheduler.timesteps, 3,
                                3, _generator_noise(5), first=1)  # fmt: skip
        torch.testing.assert_close(ours, ref, rtol=0, atol=ATOL)
    else:  # the reference's mask sees every earlier block: only the first two blocks agree
        ref = reference_rollout(rollout.model, rollout.context(), rollout.scheduler.timesteps, 3,
                                3, _generator_noise(5), first=1)  # fmt: skip
        torch.testing.assert_close(ours[:, :, :4], ref[:, :, :4], rtol=0, atol=ATOL)
        assert (ours[:, :, 4:] - ref[:, :, 4:]).abs().max() > 1e-3
