"""LingBot-World camera conditioning: rays, resampling, relative poses, pose files, keys, schedule."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from flashdreams import ConfigError
from flashdreams.conditioner.camera_geometry import (
    PoseIntegrator,
    fold_rays,
    framewise_relative,
    ray_maps,
    resample_poses,
    scale_intrinsics,
)
from flashdreams.control.camera import CameraControl, load_intrinsics, load_poses
from tests.unit.test_config import compose_run

SMALL_ENCODER = ["conditioner.encoder.checkpoint=null", "conditioner.encoder.base_dim=8",
                 "conditioner.encoder.num_res_blocks=1"]  # fmt: skip


def rot_y(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def rot_x(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def pose(rot: np.ndarray, t) -> np.ndarray:
    out = np.eye(4)
    out[:3, :3], out[:3, 3] = rot, t
    return out


def trajectory(n: int, yaw_step=0.03, pitch_step=0.01, v=(0.1, -0.02, 0.3)) -> np.ndarray:
    """c2w with constant angular velocity (yaw, then pitch) and constant velocity."""
    return np.stack([pose(rot_y(yaw_step * i) @ rot_x(pitch_step * i), np.array(v) * i)
                     for i in range(n)])  # fmt: skip


def test_rays_match_explicit_back_projection():
    h, w, n = 16, 24, 2
    c2w = torch.from_numpy(trajectory(3)[1:])  # two non-trivial poses
    k = torch.tensor([[20.0, 18.0, 11.0, 7.5], [25.0, 22.0, 12.5, 8.0]], dtype=torch.float64)
    rays = ray_maps(c2w, k, h, w)  # (N, 6, H, W)
    folded = fold_rays(rays, 8)  # (384, N, 2, 3)
    assert folded.shape == (6 * 64, n, h // 8, w // 8)
    for f in range(n):
        fx, fy, cx, cy = k[f].tolist()
        kinv = np.linalg.inv(np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1]]))
        m = c2w[f].numpy()
        for v in range(h):
            for u in range(w):
                point = m[:3, :3] @ (kinv @ np.array([u + 0.5, v + 0.5, 1.0])) + m[:3, 3]
                d = (point - m[:3, 3]) / np.linalg.norm(point - m[:3, 3])
                expect = np.concatenate([m[:3, 3], d])
                np.testing.assert_allclose(rays[f, :, v, u].numpy(), expect, atol=1e-6)
                i, dy, j, dx = v // 8, v % 8, u // 8, u % 8
                got = folded[[c * 64 + dy * 8 + dx for c in range(6)], f, i, j]
                np.testing.assert_allclose(got.numpy(), expect, atol=1e-6)


def test_resampling_follows_constant_velocity_trajectories():
    src = torch.from_numpy(trajectory(9, yaw_step=0.2, pitch_step=0.0, v=(0.5, 0.0, -1.0)))
    targets = [0.0, 0.5, 2.25, 7.75, 8.0]
    out = resample_poses(src, targets)
    for got, s in zip(out, targets, strict=True):
        want = pose(rot_y(0.2 * s), np.array([0.5, 0.0, -1.0]) * s)
        np.testing.assert_allclose(got.numpy(), want, atol=1e-9)
    # the quaternion sign flip of a long rotation must not take the long way round
    flip = torch.from_numpy(np.stack([pose(rot_y(a), np.zeros(3)) for a in (3.0, 3.3)]))
    np.testing.assert_allclose(resample_poses(flip, [0.5])[0, :3, :3].numpy(), rot_y(3.15),
                               atol=1e-9)  # fmt: skip


def test_framewise_relative_poses_and_block_boundaries():
    c2w = torch.from_numpy(trajectory(6))
    rel = framewise_relative(c2w)
    torch.testing.assert_close(rel[0], torch.eye(4, dtype=torch.float64))
    for i in range(1, 6):
        torch.testing.assert_close(c2w[i - 1] @ rel[i], c2w[i])
    # a block's first frame is relative to the previous block's last one
    torch.testing.assert_close(framewise_relative(c2w[3:], previous=c2w[2]), rel[3:])


def _conditioner(tmp_path, poses=None, intrinsics=None, **kwargs):
    paths = {}
    for name, arr in (("poses", poses), ("intrinsics", intrinsics)):
        if arr is not None:
            paths[name] = str(tmp_path / f"{name}.npy")
            np.save(paths[name], arr)
    return CameraControl(**paths, **kwargs)


def test_pose_file_is_resampled_to_latent_cadence_and_normalized(tmp_path):
    video = trajectory(23)  # 4 * 5 + 1 usable video frames -> 6 latent frames (+2 ignored)
    k = np.array([[400.0, 400.0, 416.0, 240.0]] * 23)
    cond = _conditioner(tmp_path, video, k)
    cond.prepare(1, height=32, width=48, num_frames=6, device="cpu")
    assert len(cond.poses) == 6
    for n, p in enumerate(cond.poses):
        np.testing.assert_allclose(p.numpy(), video[4 * n], atol=1e-9)
    rel = cond.relative_poses(0, 6)
    steps = rel[1:, :3, 3].norm(dim=-1)
    assert float(steps.max()) == pytest.approx(1.0)  # reference: unit max translation
    np.testing.assert_allclose(rel[:, :3, :3].numpy(),
                               framewise_relative(torch.from_numpy(video[::4][:6]))[:, :3, :3],
                               atol=1e-9)  # fmt: skip
    # intrinsics given for 480 x 832, rescaled to the run's 32 x 48
    torch.testing.assert_close(cond.k, torch.tensor([400 * 48 / 832, 400 * 32 / 480,
                                                     416 * 48 / 832, 240 * 32 / 480],
                                                    dtype=torch.float64))  # fmt: skip
    feats = cond.inputs(3, 3)["camera"]
    assert feats.shape == (1, 384, 3, 4, 6)
    want = fold_rays(ray_maps(rel[3:], cond.k, 32, 48), 8)
    torch.testing.assert_close(feats[0], want)
    with pytest.raises(ConfigError, match="cover 6 latent frames, the run needs 7"):
        cond.prepare(1, height=32, width=48, num_frames=7, device="cpu")


def test_pose_file_longer_than_the_clip_is_cut_before_normalizing(tmp_path):
    """The reference cuts the trajectory to the clip, then divides by its largest step: a file
    whose later poses move faster must not shrink the clip's translations."""
    video = trajectory(41)  # 11 latent frames of poses
    video[21:, :3, 3] = video[20, :3, 3] + (video[21:, :3, 3] - video[20, :3, 3]) * 5
    cond = _conditioner(tmp_path, video)
    cond.prepare(1, height=32, width=48, num_frames=6, device="cpu")  # 21 video frames
    steps = cond.relative_poses(0, 6)[1:, :3, 3].norm(dim=-1)
    assert float(steps.max()) == pytest.approx(1.0)
    cond.prepare(1, height=32, width=48, num_frames=None, device="cpu")  # endless: whole file
    assert len(cond.poses) == 11
    assert float(cond.relative_poses(0, 6)[1:, :3, 3].norm(dim=-1).max()) < 0.5


def test_intrinsics_rescale_to_464():
    k = torch.tensor([500.0, 500.0, 416.0, 240.0])
    out = scale_intrinsics(k, (480, 832), (464, 832))
    torch.testing.assert_close(out, torch.tensor([500.0, 500 * 464 / 480, 416.0, 240 * 464 / 480],
                                                 dtype=torch.float64))  # fmt: skip


BAD_POSES = [
    (np.zeros((5, 3, 4)), "expected camera-to-world poses of shape [T, 4, 4], got [5, 3, 4]"),
    (np.eye(4), "got [4, 4]"),
    (np.stack([np.eye(4), np.full((4, 4), np.nan)]), "pose 1 holds NaN or inf"),
    (np.stack([np.eye(4), pose(2 * np.eye(3), np.zeros(3))]), "pose 1 is not rigid"),
    (np.stack([pose(np.diag([1.0, 1.0, -1.0]), np.zeros(3))]), "pose 0 is not rigid"),
    (np.stack([np.eye(4), np.eye(4) + np.eye(4, k=-3)]), "pose 1 has last row"),
]


@pytest.mark.parametrize("arr,message", BAD_POSES)
def test_bad_pose_files_give_one_line_errors(tmp_path, arr, message):
    path = tmp_path / "poses.npy"
    np.save(path, arr)
    with pytest.raises(ConfigError) as err:
        load_poses(str(path))
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"poses='{path}'") and message in text


def test_bad_intrinsics_and_unreadable_files(tmp_path):
    np.save(tmp_path / "k.npy", np.array([[0.0, 1.0, 2.0, 3.0]]))
    with pytest.raises(ConfigError, match=r"^intrinsics=.*fx, fy > 0$"):
        load_intrinsics(str(tmp_path / "k.npy"))
    np.save(tmp_path / "k3.npy", np.ones((2, 3)))
    with pytest.raises(ConfigError, match=r"expected intrinsics of shape \[T, 4\]"):
        load_intrinsics(str(tmp_path / "k3.npy"))
    (tmp_path / "junk.npy").write_text("not numpy")
    with pytest.raises(ConfigError, match=r"^poses='.*junk.npy' is not a .npy array"):
        load_poses(str(tmp_path / "junk.npy"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_poses(str(tmp_path / "missing.npy"))


def test_bad_pose_file_fails_the_cli_with_one_line(tmp_path):
    np.save(tmp_path / "p.npy", np.zeros((4, 4, 3)))
    Image.new("RGB", (32, 32)).save(tmp_path / "x.png")
    args = ["recipe=lingbot_world_fast", "device=cpu", f"poses={tmp_path / 'p.npy'}",
            f"image={tmp_path / 'x.png'}", "model.checkpoint=null", f"hydra.run.dir={tmp_path / 'run'}",
            *SMALL_ENCODER]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "flashdreams.cli", *args], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"flashdreams: error: poses='{tmp_path / 'p.npy'}': expected camera-to-world poses of "
        "shape [T, 4, 4], got [4, 4, 3] (float64)"
    )


def test_camera_control_needs_a_camera_model():
    from flashdreams.build import build_conditioning

    cfg = compose_run(["recipe=demo", "conditioner=concat", "control=camera", "model.in_dim=36",
                       *SMALL_ENCODER])  # fmt: skip
    with pytest.raises(ConfigError, match="^control=.* gives the conditioning input 'camera', "
                       "which the model .WanDiT. does not accept"):  # fmt: skip
        build_conditioning(cfg, torch.device("cpu"))
    cfg = compose_run(["recipe=demo", "conditioner=concat", "model.in_dim=36",
                       "model.camera_channels=384", *SMALL_ENCODER])  # fmt: skip
    with pytest.raises(ConfigError, match="needs the conditioning input 'camera'"):
        build_conditioning(cfg, torch.device("cpu"))


def test_pose_integrator_keys():
    start = torch.eye(4, dtype=torch.float64)
    integ = PoseIntegrator(move=1.0, turn_deg=10.0, max_pitch_deg=25.0)
    fwd = integ.step(start, ["w"])
    torch.testing.assert_close(fwd[:3, 3], torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
    back = integ.step(start, ["s"])
    assert float(back[2, 3]) == pytest.approx(-1.0)
    strafe = integ.step(start, ["e"])
    assert float(strafe[0, 3]) == pytest.approx(1.0)  # right is +x in OpenCV
    yaw = integ.step(start, ["d"])  # turn right: forward (z) swings towards +x
    np.testing.assert_allclose(yaw[:3, :3].numpy(), rot_y(math.radians(10)), atol=1e-12)
    moved = integ.step(yaw, ["w"])
    np.testing.assert_allclose(moved[:3, 3].numpy(), [math.sin(math.radians(10)), 0,
                                                      math.cos(math.radians(10))], atol=1e-12)  # fmt: skip
    up = start
    for _ in range(5):  # pitch up is clamped at 25 degrees
        up = integ.step(up, ["i"])
    assert float(up[1, 2]) == pytest.approx(-math.sin(math.radians(20)))  # forward tilts to -y
    level = integ.step(up, ["w"])
    assert float(level[1, 3]) == pytest.approx(0.0)  # translation stays horizontal


def test_token_features_follow_the_reference_layout():
    """Token (f, i, j) feature ((c * 64 + py * 8 + px) * 4 + qy * 2 + qx) is ray channel c at
    pixel (16 i + 8 qy + py, 16 j + 8 qx + px): the reference's ``f (h c1) (w c2) c -> ... (c c1
    c2)`` fold followed by its ``c (f c1) (h c2) (w c3) -> (f h w) (c c1 c2 c3)`` patchify."""
    from flashdreams.model.camera import CameraEncoder

    rays = torch.randn(2, 6, 32, 48, generator=torch.Generator().manual_seed(0))
    tokens = CameraEncoder(384, 8, (1, 2, 2)).patchify(fold_rays(rays, 8)[None])
    assert tokens.shape == (1, 2 * 2 * 3, 1536)
    gen = torch.Generator().manual_seed(1)
    for _ in range(200):
        f, i, j, c, py, px, qy, qx = (int(torch.randint(0, n, (1,), generator=gen))
                                      for n in (2, 2, 3, 6, 8, 8, 2, 2))  # fmt: skip
        token = (f * 2 + i) * 3 + j
        feature = (c * 64 + py * 8 + px) * 4 + qy * 2 + qx
        assert tokens[0, token, feature] == rays[f, c, 16 * i + 8 * qy + py, 16 * j + 8 * qx + px]
