"""Prompt embeddings computed once (e.g. by UMT5-XXL on another machine) and read from disk.

File format: a safetensors file with one (text_len, text_dim) tensor per prompt under keys
``embedding.<i>``, and the prompts, in key order, as a JSON list in the metadata.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from flashdreams import ConfigError
from flashdreams.io.checkpoint import resolve_path
from flashdreams.text_encoder.base import TextEncoder

log = logging.getLogger(__name__)

FORMAT = "flashdreams.text_embeddings.v1"


def _key(index: int) -> str:
    return f"embedding.{index}"


def save_embeddings(path: str | os.PathLike, prompts: list[str], embeddings: torch.Tensor) -> None:
    """Write prompt embeddings for :class:`PrecomputedTextEncoder`.

    Args:
        path: the ``.safetensors`` file to write.
        prompts: B prompts; a repeated prompt is stored once (its first embedding).
        embeddings: (B, text_len, text_dim) their embeddings, zero past each prompt's length.

    Raises:
        ValueError: prompts and embeddings disagree in number.
    """
    if embeddings.ndim != 3 or embeddings.shape[0] != len(prompts):
        raise ValueError(
            f"need (B, text_len, text_dim) embeddings for {len(prompts)} prompts, "
            f"got shape {tuple(embeddings.shape)}"
        )
    first = {p: i for i, p in reversed(list(enumerate(prompts)))}  # prompt -> first index
    unique = list(first)
    tensors = {
        _key(j): embeddings[first[p]].detach().cpu().contiguous() for j, p in enumerate(unique)
    }
    metadata = {"format": FORMAT, "prompts": json.dumps(unique)}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)


class PrecomputedTextEncoder(TextEncoder):
    """Serves embeddings written by :func:`save_embeddings`.

    A file with a single prompt serves it for any prompt (with a warning), which suits
    benchmarks and demos that fix one prompt.

    Args:
        path: the ``.safetensors`` file (local or ``hf://org/repo/file.safetensors``).
    """

    def __init__(self, path: str) -> None:
        self.path = str(path)
        local = resolve_path(path)
        with safe_open(str(local), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            if "prompts" not in metadata:
                raise ConfigError(f"text embeddings {self.path!r} have no prompt list metadata")
            prompts = json.loads(metadata["prompts"])
            self.embeddings = {p: handle.get_tensor(_key(i)) for i, p in enumerate(prompts)}
        if not self.embeddings:
            raise ConfigError(f"text embeddings {self.path!r} hold no prompts")
        first = next(iter(self.embeddings.values()))
        self.text_len, self.text_dim = first.shape
        self._warned: set[str] = set()

    def lookup(self, prompt: str) -> torch.Tensor:
        """(text_len, text_dim) embedding of one prompt.

        Raises:
            ConfigError: the prompt is not in the file (and the file holds several prompts).
        """
        if prompt in self.embeddings:
            return self.embeddings[prompt]
        if len(self.embeddings) == 1:
            if prompt not in self._warned:
                stored = next(iter(self.embeddings))
                log.warning(
                    "prompt %r is not in %s; serving its only prompt %r", prompt, self.path, stored
                )
                self._warned.add(prompt)
            return next(iter(self.embeddings.values()))
        raise ConfigError(
            f"prompt {prompt!r} is not in precomputed text embeddings {self.path!r} "
            f"({len(self.embeddings)} prompts stored)"
        )

    def encode(self, prompts: list[str], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Look prompts up.

        Args:
            prompts: B prompt strings.
            device: where the embeddings must live.
            dtype: their dtype.

        Returns:
            (B, text_len, text_dim) embeddings.
        """
        out = torch.stack([self.lookup(p) for p in prompts])  # (B, text_len, text_dim)
        return out.to(device=device, dtype=dtype)
