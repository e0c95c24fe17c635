"""A fixed prompt embedding read from a tensor file (FlashVSR's ``posi_prompt.pth``).

FlashVSR has no text encoder at run time: its cross-attention reads one UMT5 embedding of a
fixed prompt, shipped as a [1, 512, 4096] tensor (``examples/WanVSR/prompt_tensor``). Every
prompt gets that embedding.
"""

from __future__ import annotations

import torch

from flashdreams import ConfigError
from flashdreams.text_encoder.base import TextEncoder


class PromptTensorTextEncoder(TextEncoder):
    """Serves the one embedding of a ``.pth`` / ``.pt`` / ``.safetensors`` tensor file.

    Args:
        path: the file (local or ``hf://org/repo/file``): a (1, L, D) or (L, D) tensor, or a
            dict holding exactly one such tensor.
    """

    def __init__(self, path: str) -> None:
        from flashdreams.io.checkpoint import load_torch_file, resolve_path

        self.path = str(path)
        local = resolve_path(path)
        if local.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(local))
        else:
            obj = load_torch_file(local)
        if isinstance(obj, dict):
            if len(obj) != 1:
                raise ConfigError(f"text_encoder.path={self.path} holds {len(obj)} tensors, "
                                  "need exactly one prompt embedding")  # fmt: skip
            obj = next(iter(obj.values()))
        if not isinstance(obj, torch.Tensor) or obj.ndim not in (2, 3) or (
                obj.ndim == 3 and obj.shape[0] != 1):  # fmt: skip
            shape = tuple(obj.shape) if isinstance(obj, torch.Tensor) else type(obj).__name__
            raise ConfigError(f"text_encoder.path={self.path} holds {shape}, need a (1, L, D) "
                              "prompt embedding")  # fmt: skip
        self.embedding = obj.reshape(obj.shape[-2:]).float().contiguous()
        self.text_len, self.text_dim = self.embedding.shape

    def encode(self, prompts: list[str], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        emb = self.embedding.to(device=device, dtype=dtype)
        return emb[None].expand(len(prompts), -1, -1).contiguous()
