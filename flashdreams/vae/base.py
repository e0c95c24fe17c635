"""Protocol of a streaming latent decoder, as the rollout loop sees it.

Also holds the two checkpoint helpers the decoders share (reading a state dict from a file, and
one readable error for a state dict that does not fit a module).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from flashdreams import ConfigError


class StreamingDecoder(nn.Module):
    """Decodes latents block by block, carrying its causal state across AR steps.

    Frame convention (Wan 2.1 family): T latent frames decode to ``1 + 4 * (T - 1)`` video
    frames over the whole clip; the first call yields ``1 + 4 * (T0 - 1)`` frames and every
    later call ``4 * T`` frames, so a block-by-block decode equals a full-clip decode.

    Attributes:
        latent_channels: channels of the latent (16 for Wan 2.1).
        spatial_factor: pixels per latent pixel along H and W (8 for Wan 2.1).
        temporal_factor: video frames per latent frame after the first (4 for Wan 2.1).
        produces_frames: False for decoders that return ``None`` (benchmarks of the DiT alone).
    """

    latent_channels: int = 16
    spatial_factor: int = 8
    temporal_factor: int = 4
    produces_frames: bool = True

    def reset(self) -> None:
        """Forget the streaming state; the next ``decode_step`` starts a new clip."""
        raise NotImplementedError

    def decode_step(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode the next latent frames of the clip.

        Args:
            latents: (B, C, T, h, w) new latent frames, in the model's latent space.

        Returns:
            (B, T_out, 3, H, W) float frames in [0, 1].
        """
        raise NotImplementedError


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a flat tensor dict from a ``.safetensors`` file or a torch pickle (``.pth``/``.pt``).

    Args:
        path: the checkpoint file.

    Returns:
        Key → tensor, on the CPU.

    Raises:
        ConfigError: if the file does not exist or holds no tensor dict.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"vae.checkpoint: no such file: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
        raise ConfigError(f"vae.checkpoint: {path} does not hold a flat dict of tensors")
    return dict(state)


def _listing(names: Iterable[str], limit: int = 6) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... (+{len(names) - limit} more)" if len(names) > limit else "")


def check_state_dict(module: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise one readable error if ``state`` does not fit ``module`` exactly.

    Args:
        module: the module to fill (it may live on the meta device).
        state: the tensors to load, already under the module's key names.
        source: what the tensors came from, named in the message.

    Raises:
        ConfigError: listing the missing, unexpected and wrongly shaped keys.
    """
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if state[k].shape != expected[k].shape
    ]
    problems = [
        f"{len(items)} {label} [{_listing(items)}]"
        for label, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("wrongly shaped", wrong),
        )
        if items
    ]
    if problems:
        raise ConfigError(
            f"vae.checkpoint: {source} does not fit {type(module).__name__}: " + "; ".join(problems)
        )
