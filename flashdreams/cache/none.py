"""No KV cache: bidirectional recipes run one AR step over the whole clip."""

from __future__ import annotations


def no_cache(**_dims) -> None:
    """Cache factory that returns no cache (the model then attends within the block only)."""
    return None
