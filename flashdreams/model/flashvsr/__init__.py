"""FlashVSR v1.1 streaming video super-resolution (``flashdreams.model.flashvsr.dit``)."""

from flashdreams.model.flashvsr.dit import FlashVSRDiT
from flashdreams.model.flashvsr.projector import LRProjector

__all__ = ["FlashVSRDiT", "LRProjector"]
