"""Recache: rewrite the K/V of the frames still in a KV cache under new cross-attention.

The session keeps the clean latents of every block that still has a frame in the cache, as
``(start frame, latents (B, C, F, h, w))`` in chronological order. ``replay`` runs their commit
forwards again, block-causally: each kept block attends to the frames replayed before it and
to itself, through a stand-in cache that writes into the real buffers' slots. Slot order does
not matter to attention (keys carry RoPE at absolute positions), so every frame keeps its slot.
"""

from __future__ import annotations

import contextlib
import sys

import torch

Block = tuple[int, torch.Tensor]  # (start frame, clean latents (B, C, F, h, w))


def block_frames(block: Block) -> range:
    """Absolute latent frames of a kept block."""
    return range(block[0], block[0] + block[1].shape[2])


def resident_frames(cache, blocks: list[Block]) -> set[int]:
    """Frames of ``blocks`` whose slot no later frame has overwritten (they are in the cache)."""
    seen, resident = set(), set()
    for f in sorted((f for b in blocks for f in block_frames(b)), reverse=True):
        slot = cache.frame_slot(f)
        if slot not in seen:
            seen.add(slot)
            resident.add(f)
    return resident


class _ReplayView:
    """Stands in for the KV cache during one replayed forward.

    Writes the forward's K/V into its slots of the real buffers and returns the K/V of the
    visible slots (the frames replayed so far, this chunk included).
    """

    def __init__(self, cache, write_index: torch.Tensor, visible_index: torch.Tensor) -> None:
        self.cache, self.write_index, self.visible_index = cache, write_index, visible_index

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        self.cache.write(layer, self.write_index, k, v)  # (B, L, H, D), quantized if e4m3
        return self.cache.read(layer, self.visible_index)


@torch.no_grad()
def replay(rollout, blocks: list[Block], resident: set[int], ctx) -> None:
    """Re-run the commit forwards of the ``resident`` frames of ``blocks`` with context ``ctx``.

    Each contiguous run of resident frames of a block is one forward at the commit timestep
    (``rollout.context_noise``; 0 for an I2V prefix), without fresh noise, with the
    conditioner's extra input channels of those frames. A two-expert model (Wan 2.2 A14B)
    replays once per expert, each into its own cache.
    """
    experts = getattr(rollout.cache, "experts", None)  # ExpertKVCaches: one cache per expert
    if experts is None:
        _replay(rollout, rollout.cache, blocks, resident, ctx, {})
        return
    for e in getattr(rollout.model, "_orig_mod", rollout.model).commit_order():
        _replay(rollout, experts[e], blocks, resident, ctx, {"expert": e})


def _replay(rollout, cache, blocks: list[Block], resident: set[int], ctx, kwargs: dict) -> None:
    r = rollout
    model = getattr(r.model, "_orig_mod", r.model)
    tpf, visible = cache.tokens_per_frame, []
    offset, conditioner = getattr(r, "frame_offset", 0), getattr(r, "conditioner", None)
    for start, latents in blocks:
        for run in _contiguous_runs([f for f in block_frames((start, latents)) if f in resident]):
            slots = torch.tensor([cache.frame_slot(f) for f in run])
            write = (slots[:, None] * tpf + torch.arange(tpf)[None]).flatten()
            visible.append(write)
            view = _ReplayView(cache, write.to(r.device), torch.cat(visible).to(r.device))
            x = latents[:, :, run[0] - start : run[-1] - start + 1].float()
            extra = None if conditioner is None else conditioner.channels(run[0], len(run))
            x = x if extra is None else torch.cat([x, extra.to(x.dtype)], dim=1)
            t = torch.tensor([0.0 if f < offset else r.context_noise for f in run])
            t = t.to(r.device).expand(r.batch_size, len(run))
            positions = torch.tensor(run, device=r.device)
            control = None if conditioner is None else conditioner.control(run[0], len(run))
            extra = kwargs if control is None else {**kwargs, "control": control}  # camera rays
            with _eager():
                model(x.to(r.dtype), t, ctx, positions, view, **extra)


def _contiguous_runs(frames: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for f in frames:
        if runs and runs[-1][-1] == f - 1:
            runs[-1].append(f)
        else:
            runs.append([f])
    return runs


def _eager():
    """Run compiled modules eagerly (a replay's shapes would otherwise trigger recompiles).

    Nothing can be compiled before ``torch._dynamo`` is imported, and importing it takes
    about a second, so it is only touched when already loaded.
    """
    if "torch._dynamo" not in sys.modules or not hasattr(torch.compiler, "set_stance"):
        return contextlib.nullcontext()
    return torch.compiler.set_stance("force_eager")
