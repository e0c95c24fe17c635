"""No image conditioning (text-to-video recipes)."""

from __future__ import annotations

from flashdreams.conditioner.base import Conditioner


class NoConditioner(Conditioner):
    """The no-op conditioner of the base class, as a selectable option (``conditioner=none``)."""
