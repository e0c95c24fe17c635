"""No guidance: one conditional forward per step (distilled few-step models)."""

from __future__ import annotations

from flashdreams.guidance.base import Guidance


class NoGuidance(Guidance):
    """The identity rule of the base class, as a selectable option (``guidance=none``)."""
