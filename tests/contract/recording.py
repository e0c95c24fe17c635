"""A graph policy that runs eagerly and records what a capturing policy would key graphs by."""

from __future__ import annotations

import torch

from flashdreams.graph.cuda_graph import _flatten
from flashdreams.graph.eager import EagerPolicy

RECORDS: list[tuple] = []  # (phase, key) of every forward of every RecordingPolicy


class RecordingPolicy(EagerPolicy):
    """Pre-captures on any device; each forward's (shape key, named inputs, tensor shapes)."""

    name = "recording"

    def __init__(self) -> None:
        self.phase = "run"

    def wants_precapture(self, device: torch.device) -> bool:
        return True

    def run(self, fn, *args, shape_key):
        if shape_key is not None:
            names = tuple(tuple(sorted(a)) for a in args if isinstance(a, dict))
            shapes = tuple((tuple(t.shape), t.dtype) for t in _flatten(args))
            RECORDS.append((self.phase, (shape_key, names, shapes)))
        return fn(*args)
