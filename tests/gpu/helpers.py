"""Shared pieces of the GPU tests: relative error, random attention inputs, graph replay."""

import torch

from flashdreams.graph.cuda_graph import capture

# the small Wan DiT of the stepped GPU tests (real kernels, seconds per run)
SMALL_WAN = [
    "rollout.height=256", "rollout.width=256", "model.dim=512", "model.num_heads=4",
    "model.num_layers=4", "model.ffn_dim=1024", "device=cuda", "dtype=bfloat16",
]  # fmt: skip


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of ``a`` against ``b``, in fp32."""
    return float((a.float() - b.float()).norm() / b.float().norm())


def random_qkv(lq: int, lk: int, heads: int = 12, head_dim: int = 128) -> list[torch.Tensor]:
    """Seeded bf16 (1, L, H, D) q, k, v on the GPU; k and v scaled 2 and 0.5 (unequal ranges)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    return [torch.randn(1, n, heads, head_dim, device="cuda", generator=g, dtype=torch.bfloat16) * s
            for n, s in ((lq, 1.0), (lk, 2.0), (lk, 0.5))]  # fmt: skip


def replay_equals_eager(attn, static: list[torch.Tensor], scales=(0.5, 3.0, 2.0)) -> bool:
    """Warm ``attn`` up on a side stream, capture one call on ``static`` (q, k, v), scale the
    inputs in place, replay, and compare with an eager call on the scaled inputs."""
    graph, captured = capture(lambda: attn(*static))
    for x, scale in zip(static, scales, strict=True):
        x.mul_(scale)
    graph.replay()
    return torch.equal(captured, attn(*static))


def pre_captured_latents(overrides: list[str], steps: int = 5) -> list[torch.Tensor]:
    """Clean latents (fp32) of the first ``steps`` AR steps of the composed ``overrides``,
    started and pre-captured as a run is (a prompt, the run's seed)."""
    from flashdreams.build import build_rollout
    from tests.unit.test_config import compose_run

    rollout = build_rollout(compose_run(overrides))
    rollout.start(["a prompt"])
    rollout.precapture()
    return [rollout.step().latents.float() for _ in range(steps)]
