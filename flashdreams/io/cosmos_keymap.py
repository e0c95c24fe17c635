"""Key maps of the Cosmos-Predict2.5 DiT: native release, diffusers, flashdreams.

flashdreams' ``CosmosDiT`` uses the native names (the ``net.`` prefix of the ``*_ema_bf16.pt``
files stripped) except three top-level modules, renamed here:

========================  =============================  ==========================
native (``net.`` dropped)  flashdreams                    diffusers
========================  =============================  ==========================
``x_embedder.proj.1``      ``patch_embed``                ``patch_embed.proj``
``t_embedder.1``           ``t_embedder``                 ``time_embed.t_embedder``
``t_embedding_norm``       ``t_norm``                     ``time_embed.norm``
``blocks.N.self_attn``     same                           ``transformer_blocks.N.attn1``
========================  =============================  ==========================

(the full block and final-layer table is ``_DIFFUSERS_BLOCK`` / ``_DIFFUSERS_TOP``).
Training-only entries of native files (``accum_*`` counters, ``pos_embedder.*`` tables,
``_extra_state``) are dropped. Keys no rule covers pass unchanged, so a loader reports them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from flashdreams.io.keymap import _rename

# native (``net.`` stripped) -> flashdreams, top level
_NATIVE_TOP: tuple[tuple[str, str], ...] = (
    ("x_embedder.proj.1", "patch_embed"),
    ("t_embedder.1", "t_embedder"),
    ("t_embedding_norm", "t_norm"),
)
# flashdreams -> diffusers ``CosmosTransformer3DModel``, top level
_DIFFUSERS_TOP: tuple[tuple[str, str], ...] = (
    ("patch_embed", "patch_embed.proj"),
    ("t_embedder", "time_embed.t_embedder"),
    ("t_norm", "time_embed.norm"),
    ("final_layer.adaln_modulation.1", "norm_out.linear_1"),
    ("final_layer.adaln_modulation.2", "norm_out.linear_2"),
    ("final_layer.linear", "proj_out"),
    ("crossattn_proj", "crossattn_proj"),
)
# flashdreams -> diffusers, the part after ``blocks.N.`` / ``transformer_blocks.N.``
_DIFFUSERS_BLOCK: tuple[tuple[str, str], ...] = tuple(
    [(f"adaln_modulation_{n}.{i}", f"norm{j}.linear_{i}")
     for j, n in ((1, "self_attn"), (2, "cross_attn"), (3, "mlp")) for i in (1, 2)]
    + [("mlp.layer1", "ff.net.0.proj"), ("mlp.layer2", "ff.net.2")]
    + [(f"{ours}.{a}", f"{theirs}.{b}")
       for ours, theirs in (("self_attn", "attn1"), ("cross_attn", "attn2"))
       for a, b in (("q_proj", "to_q"), ("k_proj", "to_k"), ("v_proj", "to_v"),
                    ("output_proj", "to_out.0"), ("q_norm", "norm_q"), ("k_norm", "norm_k"))]
)  # fmt: skip
_DROPPED = re.compile(r"(^|\.)(accum_\w+|_extra_state)$|^pos_embedder\.")
_OURS_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_DIFF_BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.(.+)$")


def native_to_flashdreams(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a native Cosmos-Predict2.5 DiT state dict (``net.`` prefix optional)."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        key = key.removeprefix("net.")
        if _DROPPED.search(key):
            continue
        out[_rename(key, _NATIVE_TOP, reverse=False) or key] = tensor
    return out


def flashdreams_to_native(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`native_to_flashdreams`, with the ``net.`` prefix."""
    return {"net." + (_rename(k, _NATIVE_TOP, reverse=True) or k): v for k, v in state_dict.items()}


def _to_diffusers_key(key: str) -> str:
    if m := _OURS_BLOCK.match(key):
        return f"transformer_blocks.{m[1]}." + (_rename(m[2], _DIFFUSERS_BLOCK, False) or m[2])
    return _rename(key, _DIFFUSERS_TOP, reverse=False) or key


def _from_diffusers_key(key: str) -> str:
    if m := _DIFF_BLOCK.match(key):
        return f"blocks.{m[1]}." + (_rename(m[2], _DIFFUSERS_BLOCK, True) or m[2])
    return _rename(key, _DIFFUSERS_TOP, reverse=True) or key


def flashdreams_to_diffusers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a ``CosmosDiT`` state dict to diffusers' ``CosmosTransformer3DModel`` names."""
    return {_to_diffusers_key(k): v for k, v in state_dict.items()}


def diffusers_to_flashdreams(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a diffusers ``CosmosTransformer3DModel`` state dict to ``CosmosDiT`` names."""
    return {_from_diffusers_key(k): v for k, v in state_dict.items()}


def looks_like_diffusers_cosmos(keys) -> bool:
    """Whether Cosmos DiT keys follow diffusers' naming (``transformer_blocks``, ``time_embed``)."""
    return any(k.startswith(("transformer_blocks.", "time_embed.", "proj_out.")) for k in keys)


def cosmos_to_flashdreams(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any supported Cosmos DiT state dict (native or diffusers) in ``CosmosDiT`` names."""
    if looks_like_diffusers_cosmos(state_dict):
        return diffusers_to_flashdreams(state_dict)
    return native_to_flashdreams(state_dict)
