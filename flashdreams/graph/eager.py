"""Plain eager execution: the reference every other policy is tested against."""

from __future__ import annotations

from flashdreams.graph.base import GraphPolicy


class EagerPolicy(GraphPolicy):
    """Runs every forward eagerly (the escape hatch when capture misbehaves)."""

    name = "eager"

    def run(self, fn, *args, shape_key):
        return fn(*args)
