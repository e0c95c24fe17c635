"""Key map of OmniDreams (Cosmos-Dreams) checkpoints: the Cosmos-Predict2.5 native names plus
the HDMap branch.

The released single-view files (``nvidia/omni-dreams-models``,
``single_view/{distilled,teacher,student-init}/<uuid>_model.pt``) are consolidated training
states: the student's weights under ``net.*`` (the native Cosmos names of
``flashdreams.io.cosmos_keymap``), next to other networks of the distillation
(``net_ema.*``, ``net_fake_score.*``, ``net_real_score.*``), which are dropped. The HDMap branch is ``net.additional_patch_embedding.proj.1.weight``
(the native ``PatchEmbed``: a rearrange, then a bias-free Linear), here
``additional_patch_embedding.weight``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from flashdreams.io.cosmos_keymap import native_to_flashdreams

NATIVE_HDMAP = "additional_patch_embedding.proj.1."
OURS_HDMAP = "additional_patch_embedding."
#: prefixes of other networks a distillation checkpoint holds next to the student's ``net.``
OTHER_NETS = ("net_ema.", "net_fake_score.", "net_real_score.", "net_teacher.")


def omnidreams_to_flashdreams(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a native OmniDreams state dict (``net.`` prefix optional) to ``OmniDreamsDiT``.

    When the keys carry the student's ``net.`` prefix, every other network of the file
    (``net_ema.``, ``net_fake_score.``, ...) is dropped. (A file wrapped as ``{"model": ...}``
    loads with ``model.checkpoint_key=model``.)
    """
    state = dict(state_dict)
    if any(k.startswith("net.") for k in state):
        state = {k: v for k, v in state.items() if k.startswith("net.")}
    out = {}
    for key, tensor in native_to_flashdreams(state).items():
        if key.startswith(NATIVE_HDMAP):
            key = OURS_HDMAP + key[len(NATIVE_HDMAP) :]
        out[key] = tensor
    return out


def flashdreams_to_omnidreams(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`omnidreams_to_flashdreams` (``net.`` prefix, native names)."""
    from flashdreams.io.cosmos_keymap import flashdreams_to_native

    out = {}
    for key, tensor in flashdreams_to_native(state_dict).items():
        if key.startswith("net." + OURS_HDMAP):
            key = "net." + NATIVE_HDMAP + key[len("net." + OURS_HDMAP) :]
        out[key] = tensor
    return out
