"""Recache: rewrite the K/V of the frames still in a KV cache under new cross-attention.

The session keeps the clean latents of every block that still has a frame in the cache, as
``(start frame, latents (B, C, F, h, w))`` in chronological order. ``replay`` runs their commit
forwards again, block-causally: each kept block attends to the frames replayed before it and
to itself, through a stand-in cache that writes into the real buffers' slots. Slot order does
not matter to attention (keys carry RoPE at absolute positions), so every frame keeps its slot.
"""

from __future__ import annotations

import torch

from flashdreams.cache.base import KV
from flashdreams.cache.experts import ExpertKVCaches

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

    Writes the forward's K/V into the slots of ``write`` frames of the real buffers and returns
    the K/V of the ``visible`` frames (the frames replayed so far, this chunk included). A
    model's extra K/V branches (``branch(name)``) get views of their own caches over the same
    frames.
    """

    def __init__(self, cache, write: list[int], visible: list[int], device) -> None:
        self.cache, self.frames, self.device = cache, (write, visible), device
        tpf = cache.tokens_per_frame
        self.write_index, self.visible_index = (
            _token_index(cache, frames, tpf).to(device) for frames in (write, visible)
        )
        self.valid_tokens = len(visible) * tpf

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> KV:
        self.cache.write(layer, self.write_index, k, v)  # (B, L, H, D), quantized if e4m3
        return KV(*self.cache.read(layer, self.visible_index))

    def branch(self, name: str) -> _ReplayView:
        return _ReplayView(self.cache.branch(name), *self.frames, self.device)


def _token_index(cache, frames: list[int], tpf: int) -> torch.Tensor:
    slots = torch.tensor([cache.frame_slot(f) for f in frames], dtype=torch.long)
    return (slots[:, None] * tpf + torch.arange(tpf)[None]).flatten()


def _view(cache, write: list[int], visible: list[int], device):
    """The stand-in of ``cache``: one view per expert of a two-expert model's caches."""
    if isinstance(cache, ExpertKVCaches):
        return ExpertKVCaches([_view(c, write, visible, device) for c in cache.experts])
    return _ReplayView(cache, write, visible, device)


@torch.no_grad()
def replay(rollout, blocks: list[Block], resident: set[int], ctx) -> None:
    """Re-run the commit forwards of the ``resident`` frames of ``blocks`` with context ``ctx``.

    Each contiguous run of resident frames of a block is one commit (``Forwards.commit``, the
    loop's own commit path, uncaptured) at the commit timestep (``rollout.context_noise``; 0 for
    an I2V prefix), without fresh noise. A two-expert model replays through every expert, each
    into its own cache.
    """
    r = rollout
    visible: list[int] = []
    for start, latents in blocks:
        for run in _contiguous_runs([f for f in block_frames((start, latents)) if f in resident]):
            visible += run
            view = _view(r.cache, run, list(visible), r.device)
            x = latents[:, :, run[0] - start : run[-1] - start + 1].float()
            t = 0.0 if run[0] < r.frame_offset else r.context_noise
            positions = torch.tensor(run, device=r.device)
            r.forwards.commit(x, ctx, positions, run[0], t, cache=view, capture=False)


def _contiguous_runs(frames: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for f in frames:
        if runs and runs[-1][-1] == f - 1:
            runs[-1].append(f)
        else:
            runs.append([f])
    return runs
