"""OmniDreams (Cosmos-Dreams): the HDMap-conditioned block-causal Cosmos-Predict2.5 DiT."""

from flashdreams.model.omnidreams.dit import OmniDreamsDiT

__all__ = ["OmniDreamsDiT"]
