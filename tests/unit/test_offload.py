"""offload=blocks on CPU runs the same streaming code (host copies, two slots, prefetch,
pointer swaps) synchronously: outputs must equal the resident model's bit for bit."""

import pytest
import torch

from flashdreams import ConfigError
from flashdreams.bench import apply_memory_fraction
from flashdreams.build import build_rollout
from flashdreams.graph.cuda_graph import CudaGraphPolicy
from flashdreams.graph.eager import EagerPolicy
from flashdreams.offload import BlockOffloader, check_offload
from flashdreams.precision.fp8 import quantize_blocks
from tests.conftest import make_tiny_model
from tests.unit.test_config import compose_run


def _latents(overrides, steps=2):
    rollout = build_rollout(compose_run(["rollout.total_blocks=2", *overrides]))
    rollout.start(["a prompt"])
    return [rollout.step().latents for _ in range(steps)], rollout


def test_offload_blocks_equals_resident():
    ref, _ = _latents([])
    got, rollout = _latents(["offload=blocks"])
    off = rollout.offloader
    assert off is not None and off.num_loads > 0
    assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))
    blocks = rollout.model.blocks
    all_bytes = sum(p.numel() * p.element_size() for p in blocks.parameters())
    assert off.host_bytes == all_bytes  # every block lives on the host
    assert off.slot_bytes == 2 * all_bytes // len(blocks)  # the device holds two blocks
    slot_ptrs = {t.data_ptr() for slot in off.slots for t in slot}
    assert all(p.data_ptr() in slot_ptrs for p in rollout.model.blocks.parameters())


def _forward(model, ctx, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 2, 8, 8, generator=g)
    return model(x, torch.tensor([500.0]), ctx)


@pytest.mark.parametrize("fp8", [False, True])
def test_each_block_streams_once_per_forward(fp8):
    resident, streamed = make_tiny_model(num_layers=3), make_tiny_model(num_layers=3)
    if fp8:  # e4m3 buffers stream like weights
        quantize_blocks(resident, "reference")
        quantize_blocks(streamed, "reference")
    off = BlockOffloader(streamed, torch.device("cpu"))
    text = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(1))
    ctx_ref, ctx = resident.prepare_context(text), streamed.prepare_context(text)
    for a, b in zip(ctx_ref, ctx, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    _forward(streamed, ctx)
    before = off.num_loads
    for seed in range(2):
        assert torch.equal(_forward(streamed, ctx, seed), _forward(resident, ctx_ref, seed))
    assert off.num_loads - before == 2 * 3  # one load per block per forward, no reloads


def test_offload_rejects_bad_settings_in_one_line():
    with pytest.raises(
        ConfigError, match=r"^offload=blocks works with graph=eager only, not graph=cuda_graph"
    ):
        check_offload("blocks", CudaGraphPolicy())
    with pytest.raises(ConfigError, match=r"^offload='disk' is not one of: none, blocks$"):
        check_offload("disk", EagerPolicy())
    with pytest.raises(ConfigError, match="graph=cuda_graph"):
        build_rollout(compose_run(["offload=blocks", "graph=cuda_graph"]))
    with pytest.raises(ConfigError, match="not graph=compile_cuda_graph "):  # the user's choice
        build_rollout(compose_run(["offload=blocks", "graph=compile_cuda_graph"]))


def test_memory_fraction_setting():
    assert apply_memory_fraction(compose_run([])) is None  # run config: no bench section
    cfg = compose_run(["+bench.memory_fraction=1.5"])
    with pytest.raises(
        ConfigError, match=r"^bench.memory_fraction=1.5 must be a number in \(0, 1\]$"
    ):
        apply_memory_fraction(cfg)
    if not torch.cuda.is_available():
        assert apply_memory_fraction(compose_run(["+bench.memory_fraction=0.15"])) is None
