"""Protocol of a text encoder, as the rollout loop sees it."""

from __future__ import annotations

import torch


class TextEncoder:
    """Turns prompts into the context embeddings the DiT cross-attends to.

    Attributes:
        text_len: number of context tokens produced per prompt (512 for UMT5 in Wan).
        text_dim: width of each context token (4096 for UMT5-XXL).
    """

    text_len: int = 512
    text_dim: int = 4096

    def encode(self, prompts: list[str], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Encode prompts.

        Args:
            prompts: B prompt strings.
            device: where the embeddings must live.
            dtype: their dtype.

        Returns:
            (B, text_len, text_dim) embeddings; positions past each prompt's length are zero.
        """
        raise NotImplementedError
