"""Protocol of a streaming latent decoder, as the rollout loop sees it; the decoders' file reader.

Decoders may take named inputs besides the latents (FlashVSR's Tiny Conditional Decoder reads
the low-resolution frames, colour correction its reference frames): a decoder lists them in
``inputs()`` and ``decode_step`` takes them as keyword arguments. The loop hands decoders
latents only, so ``build.assemble_rollout`` wraps such a decoder in a ``FedDecoder`` that counts
the latent frames decoded since ``reset`` and asks the recipe's control for the inputs of each
new run of frames (``ControlEncoder.decoder_inputs(start, num)``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from flashdreams.graph.base import GraphPolicy
from flashdreams.graph.runner import GraphRunner
from flashdreams.io.checkpoint import CheckpointError, load_torch_file


def to_channels_last(module: nn.Module) -> None:
    """Convolution weights in channels-last order (5-D NDHWC, 4-D NHWC), the layout cuDNN's
    bf16 convolutions run natively; activations follow their input's layout through the
    convolutions and elementwise ops, so the input goes through :func:`conv_input`."""
    for p in module.parameters():
        if p.dim() == 5:
            p.data = p.data.contiguous(memory_format=torch.channels_last_3d)
        elif p.dim() == 4:
            p.data = p.data.contiguous(memory_format=torch.channels_last)


def conv_input(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """A (B, C, T, H, W) convolution input in the module's layout: NDHWC with ``channels_last``
    (same values and shape), else as it is."""
    return x.contiguous(memory_format=torch.channels_last_3d) if channels_last else x


class StreamingDecoder(GraphRunner, nn.Module):
    """Decodes latents block by block, carrying its causal state across AR steps.

    A decoder with a network runs its steady-shape decode under the run's graph policy
    (``GraphRunner``): the build hands each decoder a fresh instance of ``graph``
    (``set_graph``; wrappers pass it to the decoder they wrap) and the decoder routes the calls
    whose shapes repeat through ``run_graph`` (compiled, and captured per shape). Decoders that
    ignore it decode eagerly.

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

    def inputs(self) -> dict[str, str]:
        """Named inputs ``decode_step`` takes as keyword arguments (name -> what it is); for
        latent frames [s, s + T) each covers those frames (e.g. (B, 3, 4 T, H, W) video frames).
        None by default: the decoder reads latents only."""
        return {}

    def decode_step(self, latents: torch.Tensor, **inputs: torch.Tensor) -> torch.Tensor:
        """Decode the next latent frames of the clip.

        Args:
            latents: (B, C, T, h, w) new latent frames, in the model's latent space.
            inputs: the named inputs of ``inputs()`` for those frames.

        Returns:
            (B, T_out, 3, H, W) float frames in [0, 1].
        """
        raise NotImplementedError

    def warm_up(self, frames: Sequence[int], batch: int, latent_hw: tuple[int, int],
                device: torch.device, dtype: torch.dtype) -> None:  # fmt: skip
        """Before the first step (``Rollout.precapture``): make what the decoder compiles or
        captures for its steady calls, decoding stand-in latents of blocks of ``frames`` latent
        frames each, then forget them (the next ``decode_step`` starts a clip). Nothing by
        default."""

    def gather_inputs(self, num: int) -> dict[str, torch.Tensor]:
        """The named inputs of the next ``num`` latent frames, gathered now (on the current
        stream) for a ``decode_step(latents, **gathered)`` run later, e.g. on a side stream
        (``rollout.pipeline_decode``). Empty for a decoder that gathers nothing itself."""
        return {}


InputSource = Callable[[int, int], dict[str, torch.Tensor]]


class FedDecoder(StreamingDecoder):
    """A decoder with named inputs, fed from ``source(start, num)`` as the loop decodes.

    The loop calls ``decode_step(latents)`` with latents only; this wrapper counts the latent
    frames decoded since ``reset`` (a clip's first call starts at frame 0, an I2V prefix
    included), asks the source for the inputs of the new frames and passes the ones the decoder
    takes. Geometry and ``produces_frames`` are the wrapped decoder's.

    Args:
        decoder: the decoder (its ``inputs()`` non-empty).
        source: (start, num) -> named tensors of latent frames [start, start + num), e.g. a
            control's ``decoder_inputs`` (a bound method: the source is not a submodule).
    """

    def __init__(self, decoder: StreamingDecoder, source: InputSource) -> None:
        super().__init__()
        self.decoder, self._source = decoder, source
        self.latent_channels, self.spatial_factor = decoder.latent_channels, decoder.spatial_factor
        self.temporal_factor = decoder.temporal_factor
        self.produces_frames = decoder.produces_frames
        self._names = tuple(decoder.inputs())
        self._next = 0

    def inputs(self) -> dict[str, str]:
        return {}  # fed here

    def reset(self) -> None:
        self.decoder.reset()
        self._next = 0

    def set_graph(self, policy: GraphPolicy) -> None:
        self.decoder.set_graph(policy)

    def warm_up(self, frames, batch, latent_hw, device, dtype) -> None:
        self.decoder.warm_up(frames, batch, latent_hw, device, dtype)

    def gather_inputs(self, num: int) -> dict[str, torch.Tensor]:
        given = self._source(self._next, num)
        self._next += num
        return {k: given[k] for k in self._names}

    def decode_step(self, latents: torch.Tensor, **gathered: torch.Tensor) -> torch.Tensor | None:
        """Decode ``latents`` with the inputs ``gather_inputs`` gave for them (gathered here
        when none are passed)."""
        if not gathered:
            gathered = self.gather_inputs(latents.shape[2])
        return self.decoder.decode_step(latents, **gathered)


def read_tensor_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a decoder checkpoint file: ``.safetensors`` or a weights-only torch pickle.

    Args:
        path: the checkpoint file (``.safetensors``, ``.pth``, ``.pt``, ``.bin``).

    Returns:
        Key -> CPU tensor, keys as stored.

    Raises:
        CheckpointError: the file is missing, unreadable or holds no flat tensor dict.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} not found")
    if path.suffix == ".safetensors":
        return load_file(str(path), device="cpu")
    state = load_torch_file(path)
    if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"checkpoint {str(path)!r} does not hold a flat dict of tensors")
    return dict(state)
