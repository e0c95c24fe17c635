"""Key maps between checkpoint naming schemes of the Wan 2.1 DiT.

flashdreams' ``WanDiT`` uses the names of the Wan original release (``blocks.N.self_attn.q``,
``blocks.N.modulation``, ``head.head``). This module converts whole state dicts between those
names and the names of diffusers' ``WanTransformer3DModel`` (``blocks.N.attn1.to_q``,
``blocks.N.scale_shift_table``, ``proj_out``), and unwraps Self-Forcing / CausVid training
checkpoints (``generator_ema`` / ``generator`` entries, ``model.`` and wrapper prefixes).

Keys that no rule covers pass through unchanged, so a loader reports them as unexpected.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

# Top-level modules: (Wan original prefix, diffusers prefix).
_TOP_LEVEL: tuple[tuple[str, str], ...] = (
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("img_emb.proj.0", "condition_embedder.image_embedder.norm1"),
    ("img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj"),
    ("img_emb.proj.3", "condition_embedder.image_embedder.ff.net.2"),
    ("img_emb.proj.4", "condition_embedder.image_embedder.norm2"),
    ("img_emb.emb_pos", "condition_embedder.image_embedder.pos_embed"),
    ("head.head", "proj_out"),
    ("head.modulation", "scale_shift_table"),
)


def _block_rules() -> tuple[tuple[str, str], ...]:
    """Rules for the part of a key after ``blocks.N.``: (Wan original, diffusers)."""
    rules = [
        ("modulation", "scale_shift_table"),
        ("ffn.0", "ffn.net.0.proj"),
        ("ffn.2", "ffn.net.2"),
        # Wan's affine cross-attention norm is norm3; diffusers calls it norm2 (and vice versa).
        ("norm3", "norm2"),
        ("norm2", "norm3"),
    ]
    projections = (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"))
    for wan_attn, diff_attn in (("self_attn", "attn1"), ("cross_attn", "attn2")):
        for wan_proj, diff_proj in projections:
            rules.append((f"{wan_attn}.{wan_proj}", f"{diff_attn}.{diff_proj}"))
        for norm in ("norm_q", "norm_k"):
            rules.append((f"{wan_attn}.{norm}", f"{diff_attn}.{norm}"))
    rules += [
        ("cross_attn.k_img", "attn2.add_k_proj"),
        ("cross_attn.v_img", "attn2.add_v_proj"),
        ("cross_attn.norm_k_img", "attn2.norm_added_k"),
    ]
    return tuple(rules)


_BLOCK_RULES = _block_rules()
_BLOCK_RE = re.compile(r"^(blocks\.\d+\.)(.+)$")

# Wrapper segments that FSDP, activation checkpointing and torch.compile insert into names.
_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
# Prefixes of the wrapped DiT in training / single-file checkpoints, the longest first.
_MODEL_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")
# Entries of a training checkpoint holding generator weights, in order of preference.
_GENERATOR_ENTRIES = ("generator_ema", "generator")


def _rename(name: str, rules: tuple[tuple[str, str], ...], reverse: bool) -> str | None:
    """Apply the first rule whose source matches ``name`` at a dotted boundary.

    Args:
        name: a key or the tail of a key.
        rules: (Wan, diffusers) prefix pairs.
        reverse: map diffusers → Wan instead of Wan → diffusers.

    Returns:
        The renamed key, or None when no rule matches.
    """
    for wan, diff in rules:
        src, dst = (diff, wan) if reverse else (wan, diff)
        if name == src or name.startswith(src + "."):
            return dst + name[len(src) :]
    return None


def _convert_key(key: str, reverse: bool) -> str:
    match = _BLOCK_RE.match(key)
    if match is not None:
        renamed = _rename(match.group(2), _BLOCK_RULES, reverse)
        return key if renamed is None else match.group(1) + renamed
    renamed = _rename(key, _TOP_LEVEL, reverse)
    return key if renamed is None else renamed


def wan_key_to_diffusers(key: str) -> str:
    """Name of one Wan original key in diffusers' ``WanTransformer3DModel``."""
    return _convert_key(key, reverse=False)


def diffusers_key_to_wan(key: str) -> str:
    """Name of one diffusers ``WanTransformer3DModel`` key in the Wan original scheme."""
    return _convert_key(key, reverse=True)


def _convert(state_dict: Mapping[str, torch.Tensor], reverse: bool) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        new_key = _convert_key(key, reverse)
        if new_key in out:
            raise KeyError(f"two checkpoint keys map onto {new_key!r} (second one: {key!r})")
        out[new_key] = tensor
    return out


def wan_to_diffusers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a Wan original DiT state dict to diffusers' ``WanTransformer3DModel`` names.

    Args:
        state_dict: tensors keyed by Wan original names.

    Returns:
        A new dict with the same tensors (not copied) keyed by diffusers names.
    """
    return _convert(state_dict, reverse=False)


def diffusers_to_wan(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a diffusers ``WanTransformer3DModel`` state dict to Wan original names.

    Args:
        state_dict: tensors keyed by diffusers names.

    Returns:
        A new dict with the same tensors (not copied) keyed by Wan original names.
    """
    return _convert(state_dict, reverse=True)


def looks_like_diffusers(keys: list[str] | Mapping[str, object]) -> bool:
    """Whether DiT keys follow diffusers' naming (``condition_embedder``, ``attn1``, ...)."""
    for key in keys:
        if key.startswith(("condition_embedder.", "proj_out.", "scale_shift_table")):
            return True
        if ".attn1." in key or ".attn2." in key:
            return True
    return False


def strip_wrapper_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop FSDP / checkpointing / compile wrapper segments and the training ``model.`` prefix.

    Args:
        state_dict: keys such as ``model._fsdp_wrapped_module.blocks.0.self_attn.q.weight``.

    Returns:
        A new dict keyed like ``blocks.0.self_attn.q.weight``.
    """
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        new_key = key
        for segment in _WRAPPER_SEGMENTS:
            new_key = new_key.replace(segment, "")
        for prefix in _MODEL_PREFIXES:
            if new_key.startswith(prefix):
                new_key = new_key[len(prefix) :]
                break
        out[new_key] = tensor
    return out


def generator_entries(obj: Mapping[str, object]) -> list[str]:
    """Top-level entries of a training ``.pt`` that hold state dicts (its envelope keys)."""
    return [k for k, v in obj.items() if isinstance(v, Mapping)]


def unwrap_training_checkpoint(
    obj: Mapping[str, object], key: str | None = None
) -> tuple[dict[str, torch.Tensor], str | None]:
    """Extract the generator weights of a Self-Forcing / CausVid ``.pt`` checkpoint.

    Args:
        obj: what ``torch.load`` returned.
        key: the envelope entry to load (``generator``, ``generator_ema``, ...); None takes
            ``generator_ema``, then ``generator``, else the dict itself as the state dict.

    Returns:
        The DiT state dict, keyed by the names the training code's DiT used (wrapper prefixes
        stripped, non-tensor entries dropped), and the entry it came from (None: the dict
        itself).

    Raises:
        KeyError: ``key`` is not an entry holding a state dict.
    """
    entry = None
    if key is not None:
        if not isinstance(obj.get(key), Mapping):
            raise KeyError(key)
        entry = key
    else:
        entry = next((e for e in _GENERATOR_ENTRIES if isinstance(obj.get(e), Mapping)), None)
    inner = obj if entry is None else obj[entry]
    tensors = {k: v for k, v in inner.items() if isinstance(v, torch.Tensor)}
    return strip_wrapper_prefixes(tensors), entry


# UMT5 encoder: Wan's ``models_t5_umt5-xxl-enc-bf16.pth`` names (tail after ``blocks.N.``)
# → transformers ``UMT5EncoderModel`` names (tail after ``encoder.block.N.``).
_T5_BLOCK_RULES: tuple[tuple[str, str], ...] = (
    ("norm1", "layer.0.layer_norm"),
    ("attn.q", "layer.0.SelfAttention.q"),
    ("attn.k", "layer.0.SelfAttention.k"),
    ("attn.v", "layer.0.SelfAttention.v"),
    ("attn.o", "layer.0.SelfAttention.o"),
    ("pos_embedding.embedding", "layer.0.SelfAttention.relative_attention_bias"),
    ("norm2", "layer.1.layer_norm"),
    ("ffn.gate.0", "layer.1.DenseReluDense.wi_0"),  # the GELU branch of the gated FFN
    ("ffn.fc1", "layer.1.DenseReluDense.wi_1"),  # the linear branch
    ("ffn.fc2", "layer.1.DenseReluDense.wo"),
)
_T5_TOP_LEVEL: tuple[tuple[str, str], ...] = (
    ("token_embedding", "shared"),
    ("norm", "encoder.final_layer_norm"),
)
_WAN_T5_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")
_HF_T5_BLOCK_RE = re.compile(r"^encoder\.block\.(\d+)\.(.+)$")


def is_wan_t5(keys: Mapping[str, object]) -> bool:
    """Whether a UMT5 encoder state dict uses Wan's names (``token_embedding.weight``)."""
    return "token_embedding.weight" in keys


def wan_t5_to_transformers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename Wan's UMT5 encoder weights to transformers' ``UMT5EncoderModel`` names.

    The token embedding is returned under both ``shared.weight`` and its tied alias
    ``encoder.embed_tokens.weight`` (the same tensor).

    Args:
        state_dict: tensors keyed like ``blocks.0.attn.q.weight``.

    Returns:
        A new dict keyed like ``encoder.block.0.layer.0.SelfAttention.q.weight``.
    """
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        match = _WAN_T5_BLOCK_RE.match(key)
        if match is not None:
            tail = _rename(match.group(2), _T5_BLOCK_RULES, reverse=False)
            new_key = key if tail is None else f"encoder.block.{match.group(1)}.{tail}"
        else:
            new_key = _rename(key, _T5_TOP_LEVEL, reverse=False) or key
        out[new_key] = tensor
    if "shared.weight" in out:
        out["encoder.embed_tokens.weight"] = out["shared.weight"]
    return out


def transformers_t5_to_wan(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename transformers ``UMT5EncoderModel`` weights to Wan's UMT5 encoder names.

    Args:
        state_dict: tensors keyed like ``encoder.block.0.layer.0.SelfAttention.q.weight``.

    Returns:
        A new dict keyed like ``blocks.0.attn.q.weight`` (the tied alias dropped).
    """
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if key == "encoder.embed_tokens.weight":
            continue
        match = _HF_T5_BLOCK_RE.match(key)
        if match is not None:
            tail = _rename(match.group(2), _T5_BLOCK_RULES, reverse=True)
            new_key = key if tail is None else f"blocks.{match.group(1)}.{tail}"
        else:
            new_key = _rename(key, _T5_TOP_LEVEL, reverse=True) or key
        out[new_key] = tensor
    return out


# Wan 2.2 VAE (``Wan2.2_VAE.pth``) → diffusers ``AutoencoderKLWan`` (``is_residual=True``) names.
_VAE_RESNET_RULES: tuple[tuple[str, str], ...] = (
    ("residual.0", "norm1"),
    ("residual.2", "conv1"),
    ("residual.3", "norm2"),
    ("residual.6", "conv2"),
    ("shortcut", "conv_shortcut"),
)
_VAE_TOP_LEVEL: tuple[tuple[str, str], ...] = (
    ("conv1", "quant_conv"),
    ("conv2", "post_quant_conv"),
    ("encoder.conv1", "encoder.conv_in"),
    ("decoder.conv1", "decoder.conv_in"),
    ("encoder.head.0", "encoder.norm_out"),
    ("encoder.head.2", "encoder.conv_out"),
    ("decoder.head.0", "decoder.norm_out"),
    ("decoder.head.2", "decoder.conv_out"),
    ("encoder.middle.1", "encoder.mid_block.attentions.0"),
    ("decoder.middle.1", "decoder.mid_block.attentions.0"),
)
# encoder.downsamples.I.downsamples.J.<rest> / decoder.upsamples.I.upsamples.J.<rest>
_VAE22_LEVEL_RE = re.compile(
    r"^(encoder|decoder)\.(down|up)samples\.(\d+)\.(?:down|up)samples\.(\d+)\.(.+)$"
)
_VAE_MIDDLE_RE = re.compile(r"^(encoder|decoder)\.middle\.([02])\.(.+)$")


def wan22_vae_key_to_diffusers(key: str) -> str:
    """Name of one key of Wan's ``Wan2.2_VAE.pth`` in diffusers' ``AutoencoderKLWan``.

    Each level of the original is a flat list (``decoder.upsamples.I.upsamples.J``): residual
    blocks first, then one resampler; diffusers names them ``up_blocks.I.resnets.J`` and
    ``up_blocks.I.upsampler`` (``down_blocks.I.downsampler`` in the encoder). The parameter-free
    average / duplicate shortcuts have no keys. Unknown keys come back unchanged.
    """
    if m := _VAE22_LEVEL_RE.match(key):
        side, kind, level, index, rest = m.groups()
        if rest.startswith(("resample.", "time_conv.")):
            return f"{side}.{kind}_blocks.{level}.{kind}sampler.{rest}"
        tail = _rename(rest, _VAE_RESNET_RULES, reverse=False)
        return key if tail is None else f"{side}.{kind}_blocks.{level}.resnets.{index}.{tail}"
    if m := _VAE_MIDDLE_RE.match(key):
        tail = _rename(m[3], _VAE_RESNET_RULES, reverse=False)
        resnet = int(m[2]) // 2
        return key if tail is None else f"{m[1]}.mid_block.resnets.{resnet}.{tail}"
    return _rename(key, _VAE_TOP_LEVEL, reverse=False) or key


# LingBot-World camera branch: release names (Wan original scheme + camera modules) →
# flashdreams names (``flashdreams.model.camera``). Top-level, then the part after ``blocks.N.``.
_LINGBOT_TOP_LEVEL: tuple[tuple[str, str], ...] = (
    ("patch_embedding_wancamctrl", "camera_encoder.proj"),  # Linear(6*64*1*2*2 = 1536, dim)
    ("c2ws_hidden_states_layer1", "camera_encoder.mlp1"),
    ("c2ws_hidden_states_layer2", "camera_encoder.mlp2"),
)
_LINGBOT_BLOCK_RULES: tuple[tuple[str, str], ...] = (
    ("cam_injector_layer1", "camera_injector.mlp1"),
    ("cam_injector_layer2", "camera_injector.mlp2"),
    ("cam_scale_layer", "camera_injector.scale"),
    ("cam_shift_layer", "camera_injector.shift"),
)


def _convert_lingbot_key(key: str, reverse: bool) -> str:
    match = _BLOCK_RE.match(key)
    if match is not None:
        renamed = _rename(match.group(2), _LINGBOT_BLOCK_RULES, reverse=reverse)
        return key if renamed is None else match.group(1) + renamed
    return _rename(key, _LINGBOT_TOP_LEVEL, reverse=reverse) or key


def lingbot_to_flashdreams(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the camera modules of a LingBot-World checkpoint; other keys pass unchanged.

    ``patch_embedding_wancamctrl`` → ``camera_encoder.proj``, ``c2ws_hidden_states_layer{1,2}``
    → ``camera_encoder.mlp{1,2}``, ``blocks.N.cam_injector_layer{1,2}`` →
    ``blocks.N.camera_injector.mlp{1,2}``, ``blocks.N.cam_{scale,shift}_layer`` →
    ``blocks.N.camera_injector.{scale,shift}``.
    """
    return {_convert_lingbot_key(k, reverse=False): v for k, v in state_dict.items()}


def flashdreams_to_lingbot(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`lingbot_to_flashdreams` (release names of the camera modules)."""
    return {_convert_lingbot_key(k, reverse=True): v for k, v in state_dict.items()}
