"""Shared GPU-test check: a backend captured in a CUDA graph replays what eager computes."""

import torch


def replay_equals_eager(attn, static: list[torch.Tensor], scales=(0.5, 3.0, 2.0)) -> bool:
    """Warm ``attn`` up on a side stream, capture one call on ``static`` (q, k, v), scale the
    inputs in place, replay, and compare with an eager call on the scaled inputs."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        attn(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = attn(*static)
    for x, scale in zip(static, scales, strict=True):
        x.mul_(scale)
    graph.replay()
    return torch.equal(captured, attn(*static))
