"""LingBot-World-Fast: the camera-conditioned causal rollout == its teacher-forced masked forward.

The rollout is built from the ``lingbot_world_fast`` recipe (tiny DiT with the camera branch,
random weights) and runs with its KV cache; the camera follows a pose file, or live keys that
change from block to block. The reference recomputes every denoising forward as one
full-sequence forward over ``[clean frames so far | noisy block]`` with a block-causal mask, the
conditioner's I2V channels and the camera rays of all those frames (taken from the finished
trajectory, so the per-block relative poses must agree with the whole clip's), the scheduler's
integer model timesteps and its levels (x0 and re-noising, vendor grid), and the same noise.
Tolerance: fp32, max abs error <= 1e-4. Zeroed camera layers reproduce the plain I2V DiT bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from flashdreams import ConfigError
from flashdreams.build import build_rollout
from flashdreams.model.wan import WanDiT
from tests.parity.test_framewise_chunkwise import TINY, TPF, _block_causal_mask, _generator_noise
from tests.unit.test_camera import trajectory
from tests.unit.test_config import compose_run

ATOL = 1e-4
ENCODER = ["conditioner.encoder.checkpoint=null", "conditioner.encoder.base_dim=8",
           "conditioner.encoder.num_res_blocks=1"]  # fmt: skip
KEYS = [["w"], ["d", "w"], ["i", "q"]]  # live keys held during blocks 0, 1, 2


def reference_rollout(model, y, rays, ctx, sched, fpb, num_blocks, noise_fn):
    """Clean latents (B, C, T, h, w) of the teacher-forced masked-forward rollout, from the
    I2V channels ``y`` and the camera rays ``rays`` of all its frames."""
    clean, block_ids = [], []
    for block in range(num_blocks):
        x = noise_fn((1, 16, fpb, 4, 4))
        ids = block_ids + [block] * fpb
        n = len(ids)
        mask, positions = _block_causal_mask(ids, TPF), torch.arange(n)
        for j, t in enumerate(sched.timesteps):
            seq = torch.cat([*clean, x], dim=2)
            t_frames = torch.tensor([0.0] * len(block_ids) + [t] * fpb)[None]
            flow = model(torch.cat([seq, y[:, :, :n]], dim=1), t_frames, ctx, positions,
                         mask=mask, inputs={"camera": rays[:, :, :n]})[:, :, -fpb:]  # fmt: skip
            x0 = x - sched.sigmas[j] * flow
            if j + 1 < len(sched.timesteps):
                s = sched.renoise_sigmas[j + 1]  # the vendor re-noises at another tie
                x = (1 - s) * x0 + s * noise_fn(tuple(x.shape))
        clean.append(x0)
        block_ids = ids
    return torch.cat(clean, dim=2)


@pytest.mark.parametrize("source", ["pose_file", "live_keys"])
def test_camera_rollout_equals_masked_reference(tmp_path, source):
    blocks, fpb = 3, 3
    gen = torch.Generator().manual_seed(5)
    pixels = torch.randint(0, 256, (32, 32, 3), generator=gen, dtype=torch.uint8).numpy()
    Image.fromarray(pixels).save(tmp_path / "first.png")
    image = Image.open(tmp_path / "first.png").convert("RGB")
    extra = [f"image={tmp_path / 'first.png'}"]
    if source == "pose_file":
        np.save(tmp_path / "poses.npy", trajectory(4 * (blocks * fpb - 1) + 1, 0.05, 0.02))
        np.save(tmp_path / "k.npy", np.array([[30.0, 28.0, 16.0, 15.0]]))
        extra += [f"poses={tmp_path / 'poses.npy'}", f"intrinsics={tmp_path / 'k.npy'}",
                  "control.intrinsics_size=[32,32]"]  # fmt: skip
    cfg = compose_run(["recipe=lingbot_world_fast", *TINY, *ENCODER, *extra,
                       f"rollout.total_blocks={blocks}"])  # fmt: skip
    assert cfg.rollout.frames_per_block == fpb and cfg.cache.window_frames >= blocks * fpb
    rollout = build_rollout(cfg, noise_fn=_generator_noise(9))
    rollout.start(["a lake at dawn"], images=[image])
    outs = []
    for block in range(blocks):
        rollout.set_control({"keys": KEYS[block]} if source == "live_keys" else None)
        outs.append(rollout.step())
    ours = torch.cat([o.latents for o in outs], dim=2)

    camera, total = rollout.control, blocks * fpb
    moved = camera.relative_poses(0, total)[1:]
    assert (moved[:, :3, 3].norm(dim=-1) > 0.5).all()  # the camera moved in every frame
    y = rollout.conditioner.inputs(0, total)["image_latents"]
    ref = reference_rollout(rollout.model, y, camera.inputs(0, total)["camera"],
                            rollout.context(), rollout.scheduler, fpb, blocks,
                            _generator_noise(9))  # fmt: skip
    assert ours.shape == (1, 16, fpb * blocks, 4, 4)
    torch.testing.assert_close(ours, ref, rtol=0, atol=ATOL)

    # the rays matter: a still camera gives a different rollout
    still = reference_rollout(rollout.model, y, _still_rays(camera, total), rollout.context(),
                              rollout.scheduler, fpb, blocks, _generator_noise(9))  # fmt: skip
    assert (still - ref).abs().max() > 100 * ATOL


def _still_rays(camera, num):
    """The rays of a camera that never moves, with ``camera``'s intrinsics and size."""
    from flashdreams.conditioner.camera_geometry import fold_rays, ray_maps

    eye = torch.eye(4, dtype=torch.float64).expand(num, 4, 4)
    return fold_rays(ray_maps(eye, camera.k, *camera.size), 8)[None].float()


def _tiny(camera: bool) -> WanDiT:
    return WanDiT(dim=64, num_heads=4, num_layers=2, ffn_dim=128, in_dim=36, text_dim=32,
                  text_len=16, camera_channels=384 if camera else None)  # fmt: skip


def test_zero_camera_layers_reproduce_the_plain_i2v_model():
    cam, plain = _tiny(True), _tiny(False)
    cam.init_weights(torch.Generator().manual_seed(0))
    missing, unexpected = plain.load_state_dict(cam.state_dict(), strict=False)
    assert not missing and unexpected and all("camera" in k for k in unexpected)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 36, 3, 4, 4, generator=gen)
    rays = torch.randn(1, 384, 3, 4, 4, generator=gen)
    t = torch.tensor([[999.0, 978.0, 947.0]])
    ctx = plain.prepare_context(torch.randn(1, 16, 32, generator=gen))
    with torch.no_grad():
        base = plain(x, t, ctx)
        assert torch.equal(cam(x, t, ctx), base)  # no control: no injection
        assert (
            cam(x, t, ctx, inputs={"camera": rays}) - base
        ).abs().max() > 1e-3  # random camera layers
        for block in cam.blocks:
            for layer in (block.camera_injector.scale, block.camera_injector.shift):
                layer.weight.zero_()
                layer.bias.zero_()
        assert torch.equal(cam(x, t, ctx, inputs={"camera": rays}), base)


def test_short_pose_file_fails_before_the_model_loads(tmp_path, monkeypatch):
    import flashdreams.build as build

    Image.new("RGB", (32, 32)).save(tmp_path / "first.png")
    np.save(tmp_path / "poses.npy", trajectory(4 * 5 + 1, 0.05, 0.02))  # 6 latent frames
    cfg = compose_run(["recipe=lingbot_world_fast", *TINY, *ENCODER, "rollout.total_blocks=3",
                       f"image={tmp_path / 'first.png'}", f"poses={tmp_path / 'poses.npy'}"])  # fmt: skip

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was built before the pose file was checked")

    monkeypatch.setattr(build, "build_model", no_loading)
    with pytest.raises(ConfigError, match="cover 6 latent frames, the run needs 9"):
        build.build_rollout(cfg)
