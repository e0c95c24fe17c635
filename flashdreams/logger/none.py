"""A logger that records nothing (the default)."""

from __future__ import annotations

from flashdreams.logger.base import Logger


class NoLogger(Logger):
    """Discard everything; the run still writes its own ``stats.json`` and video."""
