"""One KV cache per expert of a mixture-of-experts DiT (Wan 2.2 A14B), driven as one."""

from __future__ import annotations

from flashdreams.cache.base import KVCache


class ExpertKVCaches:
    """The loop's KV cache for a model with several experts: one ``KVCache`` per expert.

    Every expert attends to K/V computed by its own weights, so each keeps its own buffers.
    The loop drives them together: ``begin_block`` and ``reset`` reach every expert's cache
    (they share slots and valid lengths), and a forward writes only the cache of the expert
    it runs (``experts[i]``). The commit runs once per expert, so each cache holds clean K/V.

    Args:
        caches: one cache per expert, built by the same factory (same layout and capacity).
    """

    def __init__(self, caches: list[KVCache]) -> None:
        self.experts = list(caches)

    def __len__(self) -> int:
        return len(self.experts)

    def begin_block(self, start_frame: int, num_frames: int) -> None:
        for cache in self.experts:
            cache.begin_block(start_frame, num_frames)

    def reset(self) -> None:
        for cache in self.experts:
            cache.reset()

    def frame_slot(self, frame: int) -> int:
        return self.experts[0].frame_slot(frame)

    @property
    def valid_tokens(self) -> int:
        return self.experts[0].valid_tokens

    @property
    def filled_frames(self) -> int:
        return self.experts[0].filled_frames

    @property
    def capacity_frames(self) -> int:
        return self.experts[0].capacity_frames

    def sizer(self):
        return self.experts[0].sizer()

    @property
    def rolls(self) -> bool:
        return self.experts[0].rolls

    @property
    def frames_per_block(self) -> int:
        return self.experts[0].frames_per_block

    @property
    def tokens_per_frame(self) -> int:
        return self.experts[0].tokens_per_frame

    @property
    def is_steady(self) -> bool:
        return self.experts[0].is_steady

    def update(self, layer, k, v):
        raise RuntimeError("ExpertKVCaches.update: a forward must use one expert's cache "
                           "(experts[i]); the MoE model selects it")  # fmt: skip
