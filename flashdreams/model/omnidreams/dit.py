"""OmniDreams (Cosmos-Dreams, ``nv-tlabs/omni-dreams``): Cosmos-Predict2.5 2B made block-causal
by Self-Forcing distillation and conditioned on a rendered HD map of the road ahead.

The HDMap video is encoded by the Wan 2.1 VAE (16 latent channels, the same latent grid as the
generated video); its patches pass ``additional_patch_embedding`` (a bias-free Linear over the
same (C, pt, ph, pw) patch layout as the latents'; the training code offers ``zero_init``, which
makes the branch a no-op on a plain Cosmos DiT, and ``random_init``) and the result is added to the latent patch tokens before the first block. Nothing
else differs from ``CosmosDiT``: the named input ``hdmap`` (B, 16, F, h, w) rides with the
forward's frames, so a block-causal rollout and a full-sequence masked forward see the same
tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from flashdreams import ConfigError
from flashdreams.model.base import ConditionInput, linear_flops
from flashdreams.model.cosmos.dit import CosmosDiT, _linear
from flashdreams.model.omnidreams.keymap import omnidreams_to_flashdreams


class OmniDreamsDiT(CosmosDiT):
    """``CosmosDiT`` plus the HDMap patch embedding of OmniDreams.

    Named conditioning inputs: ``hdmap`` (B, hdmap_channels, F, h, w), required: the
    VAE-encoded HDMap latents of the forward's latent frames (``control=hdmap``); and
    ``condition_mask`` as ``CosmosDiT`` (the I2V first frame, ``conditioner=cosmos_video``).

    Args:
        hdmap_channels: latent channels of the HDMap input (the release's
            ``additional_concat_ch``: 16, Wan 2.1 VAE latents).
        hdmap_init: ``zero`` (the branch is a no-op: the output is ``CosmosDiT``'s) or
            ``random`` (a seeded random draw as every other weight: random-weight runs exercise
            the branch); random weights only, a checkpoint overrides it.
        **kwargs: ``CosmosDiT`` arguments.
    """

    convert_checkpoint = staticmethod(omnidreams_to_flashdreams)

    def __init__(self, hdmap_channels: int = 16, hdmap_init: str = "random", **kwargs) -> None:
        super().__init__(**kwargs)
        if hdmap_channels < 1:
            raise ConfigError(f"model.hdmap_channels={hdmap_channels} must be >= 1")
        if hdmap_init not in ("zero", "random"):
            raise ConfigError(f"model.hdmap_init={hdmap_init!r} must be 'zero' or 'random'")
        self.hdmap_channels, self.hdmap_init = hdmap_channels, hdmap_init
        pt, ph, pw = self.patch_size
        self.additional_patch_embedding = nn.Linear(hdmap_channels * pt * ph * pw, self.dim,
                                                    bias=False)  # fmt: skip

    def inputs(self) -> dict[str, ConditionInput]:
        hdmap = ConditionInput.per_latent_pixel(
            "hdmap", self.hdmap_channels,
            doc="VAE latents of the HDMap video: control=hdmap with control.video=...")  # fmt: skip
        return {**super().inputs(), "hdmap": hdmap}

    def embed_flops(self, q_tokens: int, frames: int) -> float:
        """``CosmosDiT``'s plus the HDMap patch embedding per token."""
        extra = linear_flops(q_tokens, self.additional_patch_embedding)
        return super().embed_flops(q_tokens, frames) + extra

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator) -> None:
        super().init_weights(generator)
        if self.hdmap_init == "zero":
            self.additional_patch_embedding.weight.zero_()

    def embed(self, x: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Latent patch tokens plus the HDMap's (``inputs["hdmap"]``, same frames and size)."""
        tokens = super().embed(x, inputs)
        hdmap = inputs.get("hdmap")
        if hdmap is None:
            raise ValueError("OmniDreamsDiT needs inputs['hdmap'] (B, C, F, H, W)")
        b, _, f, h, w = x.shape
        if hdmap.shape[1:] != (self.hdmap_channels, f, h, w):
            raise ValueError(f"hdmap {tuple(hdmap.shape)}: need (B, {self.hdmap_channels}, "
                             f"{f}, {h}, {w}) for x {tuple(x.shape)}")  # fmt: skip
        patches = self.patches(hdmap.float().expand(b, -1, -1, -1, -1))
        return tokens + _linear(self.additional_patch_embedding, patches).float()
