"""Cosmos-Predict2.5: the DiT (``dit.CosmosDiT``) and its RoPE (``rope``)."""

from flashdreams.model.cosmos.dit import CosmosDiT

__all__ = ["CosmosDiT"]
