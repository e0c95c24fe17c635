"""HY-WorldPlay AR rollout with memory == the release's attention pattern stated as masked
full-sequence forwards (tiny recipe, CPU, fp32, max abs 2e-5).

The reference follows the release's pipeline loop (``pipeline_wan_w_mem_relative_rope.py``)
without any cache: for block ``b`` at frame ``s = 4 b`` it selects the memory frames (all earlier
frames up to 16, then ``select_memory``), and every Euler step runs ONE forward over
``[memory frames at t = 14 | the block at t]`` at RoPE positions ``0 .. n + 3`` with a mask in
which memory tokens see only memory tokens and block tokens see everything; the block's flow is
the last 4 frames. Block 0 carries the image latent as frame 0 at t = 14. The rollout instead
re-runs the memory into ``cache=context`` once per block and denoises the block against it.
"""

from __future__ import annotations

import json

import torch
from PIL import Image

from flashdreams.build import build_rollout
from flashdreams.model.hy_worldplay.memory import select_memory, sphere_points
from tests.unit.test_config import compose_run
from tests.unit.test_hy_worldplay_recipe import TINY

BLOCKS, FPB = 6, 4
K = [[969.7, 0.0, 960.0], [0.0, 969.7, 540.0], [0.0, 0.0, 1.0]]


def _trajectory(path) -> None:
    """A release-format JSON: frames 0-3 look down +z, 4-19 turn round (yaw 180) and walk,
    20-23 look down +z again from the start: block 5 recalls clip [0, 4), not [4, 8)."""
    poses = {}
    for i in range(BLOCKS * FPB):
        back = 4 <= i < 20
        c2w = [[-1.0 if back else 1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0],
               [0.0, 0.0, -1.0 if back else 1.0, -0.1 * i if back else 0.0],
               [0.0, 0.0, 0.0, 1.0]]  # fmt: skip
        poses[str(i)] = {"extrinsic": c2w, "K": K}
    path.write_text(json.dumps(poses))


def _mask(n: int, tpf: int) -> torch.Tensor:
    allowed = torch.zeros(n + FPB, n + FPB, dtype=torch.bool)
    allowed[:n, :n] = True  # memory frames attend only to each other
    allowed[n:, :] = True  # the block attends to the memory and itself
    return allowed.repeat_interleave(tpf, 0).repeat_interleave(tpf, 1)


def test_rollout_with_memory_equals_masked_full_sequence(tmp_path):
    image = tmp_path / "first.png"
    Image.new("RGB", (48, 40), (120, 80, 200)).save(image)
    _trajectory(tmp_path / "pose.json")
    cfg = compose_run([*TINY, f"rollout.total_blocks={BLOCKS}", f"pose={tmp_path / 'pose.json'}",
                       f"image={image}"])  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    draws: list[torch.Tensor] = []

    def noise(shape):
        draws.append(torch.randn(shape, generator=gen))
        return draws[-1].clone()

    rollout = build_rollout(cfg, noise_fn=noise)
    rollout.start(["a prompt"], images=[Image.open(image)])
    ours = torch.cat([rollout.step().latents for _ in range(BLOCKS)], dim=2)
    assert len(draws) == BLOCKS  # Euler: one draw per block

    model, ctx = rollout.model, rollout.context()
    inputs = rollout.forwards.inputs(0, BLOCKS * FPB)  # the pose control's whole trajectory
    first = rollout.conditioner._first  # the encoded image latent (B, C, 1, h, w)
    tpf = model.tokens_per_frame(rollout.latent_hw)
    m = model.memory
    points = sphere_points(m.points, m.radius, m.seed)
    sigmas = [t / 1000 for t in rollout.scheduler.timesteps] + [0.0]
    clean: list[torch.Tensor] = []
    picks = []
    for b in range(BLOCKS):
        start = b * FPB
        sel = select_memory(inputs["viewmats"][0], start, m, points) if b else []
        picks.append(sel)
        n = len(sel)
        hist = [clean[f] for f in sel]
        x = draws[b].clone()
        frames = sel + list(range(start, start + FPB))
        named = {k: v[:, frames] for k, v in inputs.items()}
        for j, t in enumerate(rollout.scheduler.timesteps):
            if b == 0:
                x[:, :, :1] = first
            t_all = torch.tensor([[14.0] * n + [t] * FPB])
            if b == 0:
                t_all[0, 0] = 14.0
            full = torch.cat([*hist, x], dim=2)
            with torch.no_grad():
                flow = model(full, t_all, ctx, torch.arange(n + FPB), None, _mask(n, tpf),
                             named)[:, :, n:]  # fmt: skip
            x = x + (sigmas[j + 1] - sigmas[j]) * flow
        if b == 0:
            x[:, :, :1] = first
        clean += [x[:, :, i : i + 1] for i in range(FPB)]
    theirs = torch.cat(clean, dim=2)
    assert picks[4] == list(range(16))
    assert picks[5] == [0, 1, 2, 3, *range(8, 20)]  # the first clip recalled: a gap
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-5)
