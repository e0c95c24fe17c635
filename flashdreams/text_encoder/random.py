"""Seeded random prompt embeddings, for benchmarks and demos without the 11 GB UMT5-XXL."""

from __future__ import annotations

import hashlib

import torch

from flashdreams.text_encoder.base import TextEncoder


class RandomTextEncoder(TextEncoder):
    """Random embeddings that depend only on (seed, prompt), shaped like UMT5-XXL's output.

    Meant for benchmarks and demos: the DiT's cost does not depend on the embedding values,
    and the video will not follow the prompt. Like the real encoder, positions past the
    (pseudo) prompt length are zero. The prompt is hashed with SHA-1, never with Python's
    salted ``hash``, so the same prompt gives the same embedding in every process.

    Args:
        text_len: context tokens per prompt (512 for Wan).
        text_dim: width of a token (4096 for UMT5-XXL).
        seed: global seed mixed into every prompt's hash.
        prompt_tokens: number of non-zero tokens per prompt; None derives it from the prompt
            (its word count plus one end-of-sequence token), capped at ``text_len``.
    """

    def __init__(
        self,
        text_len: int = 512,
        text_dim: int = 4096,
        seed: int = 0,
        prompt_tokens: int | None = None,
    ) -> None:
        if prompt_tokens is not None and not 0 < prompt_tokens <= text_len:
            raise ValueError(f"prompt_tokens must be in [1, {text_len}], got {prompt_tokens}")
        self.text_len = text_len
        self.text_dim = text_dim
        self.seed = seed
        self.prompt_tokens = prompt_tokens

    def num_tokens(self, prompt: str) -> int:
        """Pseudo token count of a prompt: the positions that get non-zero embeddings."""
        if self.prompt_tokens is not None:
            return self.prompt_tokens
        return min(len(prompt.split()) + 1, self.text_len)

    def _prompt_seed(self, prompt: str) -> int:
        digest = hashlib.sha1(f"{self.seed}\x00{prompt}".encode()).digest()
        return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)

    def embed(self, prompt: str) -> torch.Tensor:
        """(text_len, text_dim) fp32 CPU embedding of one prompt."""
        generator = torch.Generator().manual_seed(self._prompt_seed(prompt))
        out = torch.zeros(self.text_len, self.text_dim)
        num = self.num_tokens(prompt)
        out[:num] = torch.randn(num, self.text_dim, generator=generator)
        return out

    def encode(self, prompts: list[str], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Embed prompts.

        Args:
            prompts: B prompt strings.
            device: where the embeddings must live.
            dtype: their dtype.

        Returns:
            (B, text_len, text_dim) embeddings, zero past each prompt's pseudo length.
        """
        out = torch.stack([self.embed(p) for p in prompts])  # (B, text_len, text_dim)
        return out.to(device=device, dtype=dtype)
