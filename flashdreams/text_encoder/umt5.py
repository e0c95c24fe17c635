"""The UMT5-XXL text encoder of Wan 2.1, run through transformers' ``UMT5EncoderModel``.

Weights come from a transformers model folder or from Wan's own
``models_t5_umt5-xxl-enc-bf16.pth`` (renamed by ``flashdreams.io.keymap.wan_t5_to_transformers``,
built on the meta device and filled by assignment). Prompts are cleaned like Wan does, padded
to ``text_len`` tokens, and embeddings past each prompt's length are zeroed.
"""

from __future__ import annotations

import html
import logging
import os
import re

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

from flashdreams.io.checkpoint import as_dtype, check_state_dict, load_torch_file, resolve_path
from flashdreams.io.keymap import is_wan_t5, wan_t5_to_transformers
from flashdreams.text_encoder.base import TextEncoder

log = logging.getLogger(__name__)

# The encoder of Wan 2.1's UMT5-XXL: gated-GELU FFN, a relative-position bias in every layer.
UMT5_XXL_CONFIG = dict(
    vocab_size=256384,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
    layer_norm_epsilon=1e-6,
    is_encoder_decoder=False,
    use_cache=False,
)


def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning: fix mojibake (if ``ftfy`` is installed), unescape HTML twice,
    collapse whitespace."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def _read_weights(path: os.PathLike) -> dict[str, torch.Tensor]:
    if str(path).endswith(".safetensors"):
        return load_file(str(path), device="cpu")
    return load_torch_file(path)


def load_umt5_encoder(
    checkpoint: str, dtype: torch.dtype, config: dict | None = None
) -> UMT5EncoderModel:
    """Load a UMT5 encoder on CPU from a transformers folder or a single weights file.

    Args:
        checkpoint: a transformers model folder, or a ``.pth`` / ``.safetensors`` file with
            Wan's T5 names (or transformers names); local or ``hf://``.
        dtype: dtype of the weights.
        config: ``UMT5Config`` overrides for a single file (default: UMT5-XXL's encoder).

    Returns:
        The encoder in eval mode, gradients off.
    """
    path = resolve_path(checkpoint)
    if path.is_dir():
        model = UMT5EncoderModel.from_pretrained(path, dtype=dtype)
        return model.eval().requires_grad_(False)
    state = _read_weights(path)
    if is_wan_t5(state):
        state = wan_t5_to_transformers(state)
    if "shared.weight" in state:
        state.setdefault("encoder.embed_tokens.weight", state["shared.weight"])
    with torch.device("meta"):
        model = UMT5EncoderModel(UMT5Config(**{**UMT5_XXL_CONFIG, **(config or {})}))
    check_state_dict(model, state, source=checkpoint)
    cast: dict[int, torch.Tensor] = {}  # by source tensor, so the tied embedding is cast once
    for key, tensor in state.items():
        if id(tensor) not in cast:
            cast[id(tensor)] = tensor.to(dtype) if tensor.is_floating_point() else tensor
        state[key] = cast[id(tensor)]
    model.load_state_dict(state, strict=True, assign=True)
    model.encoder.embed_tokens.weight = model.shared.weight  # one tensor, moved once
    return model.eval().requires_grad_(False)


class UMT5TextEncoder(TextEncoder):
    """UMT5-XXL prompt encoder with a per-prompt cache.

    Args:
        checkpoint: a transformers ``UMT5EncoderModel`` folder or Wan's
            ``models_t5_umt5-xxl-enc-bf16.pth``; local path or ``hf://org/repo/path``.
        tokenizer: a tokenizer folder for ``AutoTokenizer`` (Wan ships ``google/umt5-xxl``).
        text_len: tokens per prompt; prompts are padded / truncated to it (512 in Wan).
        dtype: weight and compute dtype of the encoder.
        offload: move the encoder back to CPU after each encoding, freeing device memory.
        config: ``UMT5Config`` overrides when ``checkpoint`` is a single file (tests use a
            tiny config); None means UMT5-XXL's encoder.
    """

    def __init__(
        self,
        checkpoint: str,
        tokenizer: str,
        text_len: int = 512,
        dtype: torch.dtype | str = "bfloat16",
        offload: bool = False,
        config: dict | None = None,
    ) -> None:
        self.text_len = text_len
        self.dtype = as_dtype(dtype)
        self.offload = offload
        self.tokenizer = AutoTokenizer.from_pretrained(str(resolve_path(tokenizer)))
        self.model = load_umt5_encoder(checkpoint, self.dtype, config)
        self.text_dim = self.model.config.d_model
        self._cache: dict[str, torch.Tensor] = {}  # prompt -> (text_len, text_dim)

    @torch.no_grad()
    def _forward(self, prompts: list[str], device: torch.device) -> None:
        """Encode prompts that are not cached yet and cache their embeddings."""
        batch = self.tokenizer(
            [clean_prompt(p) for p in prompts],
            padding="max_length",
            truncation=True,
            max_length=self.text_len,
            add_special_tokens=True,
            return_tensors="pt",
        )
        ids = batch.input_ids.to(device)  # (B, text_len)
        mask = batch.attention_mask.to(device)  # (B, text_len), 1 on prompt tokens
        self.model.to(device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        hidden = hidden * mask[..., None].to(hidden.dtype)  # (B, text_len, text_dim), zero tail
        if self.offload:
            self.model.to("cpu")
        for prompt, embedding in zip(prompts, hidden, strict=True):
            self._cache[prompt] = embedding

    def encode(self, prompts: list[str], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Encode prompts, running the encoder only for prompts not seen before.

        Args:
            prompts: B prompt strings.
            device: where the embeddings must live (and where the encoder runs).
            dtype: their dtype.

        Returns:
            (B, text_len, text_dim) embeddings; positions past each prompt's length are zero.
        """
        device = torch.device(device)
        new = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if new:
            log.info("encoding %d new prompt(s) with UMT5", len(new))
            self._forward(new, device)
        out = torch.stack([self._cache[p].to(device) for p in prompts])
        return out.to(dtype=dtype)
