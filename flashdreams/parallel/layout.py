"""Which rank holds which tokens under context parallelism (pure index arithmetic, no comms).

Ranks form a ``ring x ulysses`` mesh: rank ``q = g * ulysses + j`` is member ``j`` of ulysses
group ``g`` (consecutive ranks, so all-to-alls stay inside a node) and member ``g`` of ring
group ``j``.

Sequence sharding is frame-aligned: every latent frame's ``tokens_per_frame`` tokens are split
into contiguous, near-equal slices, rank ``q`` holding slice ``q`` of every frame of the block.
Each slice is padded to the common ``width`` (at most one pad token per frame) by repeating its
last real token; pads are dropped before any key is stored or attended to, so they never touch
a real token. Because every rank holds whole-frame pieces in frame order, the per-frame
modulation of the DiT applies to a shard unchanged, and a rank's share of the KV cache is an
ordinary cache with fewer tokens per frame.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from flashdreams import ConfigError


@dataclass(frozen=True)
class TokenLayout:
    """Token ownership of one ``tokens_per_frame`` on a ``ring x ulysses`` mesh.

    Args:
        tokens_per_frame: latent tokens per frame (h * w after patching).
        ulysses: ranks per all-to-all (head-sharding) group.
        ring: ranks per ring (sequence-passing) group.
        rank: this rank in the context-parallel group.
    """

    tokens_per_frame: int
    ulysses: int
    ring: int
    rank: int
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.tokens_per_frame < self.world:
            raise ConfigError(
                f"{self.tokens_per_frame} latent tokens per frame cannot be split over "
                f"{self.world} ranks: raise rollout.height/width or use fewer ranks"
            )

    # ------------------------------------------------------------------ sizes
    @property
    def world(self) -> int:
        return self.ulysses * self.ring

    @property
    def counts(self) -> list[int]:
        """Real tokens per frame held by each rank."""
        base, extra = divmod(self.tokens_per_frame, self.world)
        return [base + (q < extra) for q in range(self.world)]

    @property
    def starts(self) -> list[int]:
        """In-frame offset of each rank's slice."""
        c = self.counts
        return [sum(c[:q]) for q in range(self.world)]

    @property
    def width(self) -> int:
        """Token slots per frame on every rank (real tokens + pad)."""
        return self.counts[0]

    @property
    def group(self) -> int:
        """This rank's ulysses group (= its index in its ring group)."""
        return self.rank // self.ulysses

    def group_ranks(self, group: int) -> list[int]:
        """Ranks of ulysses group ``group``."""
        return list(range(group * self.ulysses, (group + 1) * self.ulysses))

    def group_tokens(self, group: int | None = None) -> int:
        """Real tokens per frame of a ulysses group: the frame width of its KV cache shard."""
        group = self.group if group is None else group
        return sum(self.counts[q] for q in self.group_ranks(group))

    @property
    def has_pad(self) -> bool:
        return self.tokens_per_frame % self.world != 0

    # ------------------------------------------------------------------ index tensors
    def _memo(self, key, device, build) -> torch.Tensor:
        full = (key, str(device))
        if full not in self._cache:
            self._cache[full] = torch.tensor(build(), dtype=torch.long).to(device)
        return self._cache[full]

    def shard(self, num_frames: int, device) -> torch.Tensor:
        """(F * width,) global token index of each of this rank's token slots."""
        n, s = self.counts[self.rank], self.starts[self.rank]
        w, tpf = self.width, self.tokens_per_frame
        return self._memo(("shard", num_frames), device, lambda: [
            f * tpf + s + min(p, n - 1) for f in range(num_frames) for p in range(w)
        ])  # fmt: skip

    def unshard(self, num_frames: int, device) -> torch.Tensor:
        """(F * tpf,) position of each global token in the rank-major gather of all shards."""
        w, slots = self.width, num_frames * self.width

        def build():
            owner = [(q, p) for q, n in enumerate(self.counts) for p in range(n)]
            return [q * slots + f * w + p for f in range(num_frames) for q, p in owner]

        return self._memo(("unshard", num_frames), device, build)

    def group_select(self, num_frames: int, batch: int, count: int, device) -> torch.Tensor:
        """Flat rows of this group's real tokens, frame-major, in an all-to-all receive buffer.

        The buffer is ``(ulysses, count, batch, F * width)`` rows (one per source rank, packed
        tensor, batch item, token slot). Returns ``(count, batch, F * group_tokens)`` row
        indices: tensor ``i``'s keys in cache order (frame, source rank, in-slice position).
        """
        w, slots = self.width, num_frames * self.width
        members = [self.counts[q] for q in self.group_ranks(self.group)]

        def build():
            tok = [j * slots + f * w + p
                   for f in range(num_frames) for j, n in enumerate(members) for p in range(n)]  # fmt: skip
            return [[[(j // slots) * count * batch * slots + (i * batch + b) * slots + j % slots
                      for j in tok] for b in range(batch)] for i in range(count)]  # fmt: skip

        return self._memo(("select", num_frames, batch, count), device, build)

    def local_select(self, num_frames: int, device) -> torch.Tensor:
        """(F * n,) this rank's real token slots (drops the pad) when there is no all-to-all."""
        n, w = self.counts[self.rank], self.width
        return self._memo(("local", num_frames), device, lambda: [
            f * w + p for f in range(num_frames) for p in range(n)
        ])  # fmt: skip

    def group_queries(self, num_frames: int, device) -> torch.Tensor:
        """(ulysses * F * width,) global token of each query slot after the all-to-all."""
        tpf, w = self.tokens_per_frame, self.width

        def build():
            out = []
            for q in self.group_ranks(self.group):
                n, s = self.counts[q], self.starts[q]
                out += [f * tpf + s + min(p, n - 1) for f in range(num_frames) for p in range(w)]
            return out

        return self._memo(("queries", num_frames), device, build)

    def group_keys(self, num_frames: int, device) -> torch.Tensor:
        """(F * group_tokens,) global token of each key after the all-to-all (cache order)."""
        tpf = self.tokens_per_frame

        def build():
            ranks = self.group_ranks(self.group)
            return [f * tpf + self.starts[q] + p
                    for f in range(num_frames) for q in ranks for p in range(self.counts[q])]  # fmt: skip

        return self._memo(("keys", num_frames), device, build)
