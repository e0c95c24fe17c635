"""Cosmos-Reason1-7B as the text encoder of Cosmos-Predict2.5, through transformers'
``Qwen2_5_VLForConditionalGeneration`` (the Qwen2.5-VL architecture; text only).

A prompt is wrapped in Cosmos' chat (a fixed system turn, the prompt as the user turn, no
generation prompt), tokenized to exactly ``text_len`` tokens (truncated or padded with the pad
token), and run with ``output_hidden_states``. Every layer's output (not the embedding) is
normalized over its channels, ``(h - mean) / (std + 1e-8)``, and the layers are concatenated:
28 layers x 3584 = 100352 channels for the 7B model, the width of the DiT's ``crossattn_proj``.
As the official pipelines, the padding tokens are attended to and keep their embeddings.
"""

from __future__ import annotations

import logging

import torch

from flashdreams.io.checkpoint import as_dtype, resolve_path
from flashdreams.text_encoder.base import TextEncoder

log = logging.getLogger(__name__)

SYSTEM_PROMPT = "You are a helpful assistant who will provide prompts to an image generator."
# Files of a tokenizer-only repository fetch (not the 16 GB of weights of an Instruct repo)
TOKENIZER_PATTERNS = ("*.json", "*.txt", "*.jinja")
# Files of the encoder itself
MODEL_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.jinja")


def conversation(prompt: str) -> list[dict]:
    """The chat Cosmos-Predict2.5 encodes a prompt in."""
    return [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
        {"role": "user", "content": [{"type": "text", "text": prompt}]},
    ]


def all_layer_embeddings(hidden_states: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """(B, L, layers * width) fp32: each layer's output normalized over channels, concatenated
    (``hidden_states[0]``, the token embedding, is left out)."""
    out = []
    for h in hidden_states[1:]:
        h = h.float()
        out.append((h - h.mean(dim=-1, keepdim=True)) / (h.std(dim=-1, keepdim=True) + 1e-8))
    return torch.cat(out, dim=-1)


class Reason1TextEncoder(TextEncoder):
    """Cosmos-Reason1 (Qwen2.5-VL) prompt encoder with a per-prompt cache.

    Args:
        checkpoint: a transformers model folder of Cosmos-Reason1-7B (or any Qwen2.5-VL),
            local or ``hf://org/repo``.
        tokenizer: a tokenizer folder with Qwen2.5-VL's chat template (the official pipeline
            uses ``Qwen/Qwen2.5-VL-7B-Instruct``'s); None: ``checkpoint``'s own.
        text_len: tokens per prompt (512).
        dtype: weight and compute dtype of the encoder.
        offload: move the encoder back to CPU after each encoding, freeing ~16 GB of the device.
    """

    def __init__(self, checkpoint: str, tokenizer: str | None = None, text_len: int = 512,
                 dtype: torch.dtype | str = "bfloat16", offload: bool = False) -> None:  # fmt: skip
        from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

        self.text_len = text_len
        self.dtype = as_dtype(dtype)
        self.offload = offload
        folder = resolve_path(checkpoint, MODEL_PATTERNS)
        tok = folder if tokenizer is None else resolve_path(tokenizer, TOKENIZER_PATTERNS)
        self.tokenizer = AutoTokenizer.from_pretrained(str(tok))
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=self.dtype)
        self.model = model.eval().requires_grad_(False)
        text = self.model.config.get_text_config()
        self.text_dim = text.num_hidden_layers * text.hidden_size
        self._cache: dict[str, torch.Tensor] = {}  # prompt -> (text_len, text_dim) on the CPU

    def token_ids(self, prompt: str) -> list[int]:
        """The ``text_len`` token ids of one prompt's chat, truncated or padded."""
        ids = self.tokenizer.apply_chat_template(
            conversation(prompt), tokenize=True, add_generation_prompt=False,
            add_vision_id=False, max_length=self.text_len, truncation=True,
            padding="max_length",
        )  # fmt: skip
        if not isinstance(ids, list):  # a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)

    @torch.no_grad()
    def _forward(self, prompts: list[str], device: torch.device) -> None:
        ids = torch.tensor([self.token_ids(p) for p in prompts], device=device)
        self.model.to(device)
        out = self.model(input_ids=ids, output_hidden_states=True, logits_to_keep=1)
        embeddings = all_layer_embeddings(out.hidden_states).to(self.dtype)
        if self.offload:
            self.model.to("cpu")
        for prompt, embedding in zip(prompts, embeddings, strict=True):
            self._cache[prompt] = embedding.cpu()

    def encode(self, prompts: list[str], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Encode prompts, running the encoder only for prompts not seen before.

        Returns:
            (B, text_len, text_dim) embeddings.
        """
        device = torch.device(device)
        new = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if new:
            log.info("encoding %d new prompt(s) with Cosmos-Reason1", len(new))
            self._forward(new, device)
        return torch.stack([self._cache[p] for p in prompts]).to(device=device, dtype=dtype)
