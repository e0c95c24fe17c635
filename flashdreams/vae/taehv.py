"""TAEHV decoder for Wan 2.1 latents (the ``taew2_1`` weights), streamed block by block.

TAEHV (madebyollin/taehv) is a small per-frame conv net whose only temporal links are its
MemBlocks, each of which also reads its own input one frame earlier, and its TGrow layers, which
turn one frame into ``stride`` frames. Both allow a whole block of frames to go through each
layer at once; streaming only needs, per MemBlock, the last input frame of the previous block.

Layer order (and so checkpoint key names ``decoder.<index>.*``) follows the reference network:
Clamp, conv, ReLU, then three levels of [3 MemBlocks, 2x Upsample, TGrow, conv], then ReLU, conv.
TAEHV consumes the DiT's (normalized) latents directly; it has no latent mean/std.

With ``compile=True`` on CUDA the stateless part of a block's decode (latents + the carried
MemBlock inputs -> frames + the new MemBlock inputs) runs through ``torch.compile`` with static
shapes; the memory bookkeeping stays in Python. One compile per block shape (the first block,
and the steady one when it differs), so it happens during the warm-up steps.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from flashdreams import ConfigError
from flashdreams.graph.compile import compile_static
from flashdreams.io.checkpoint import check_state_dict, resolve_path
from flashdreams.vae.base import StreamingDecoder, read_tensor_file, to_channels_last

log = logging.getLogger(__name__)
_logged_cpu_fallback = False  # the CPU fallback of ``compile=True`` is logged once per process

TIME_STRIDES = (1, 2, 2)  # TGrow stride per level for Wan 2.1: 1 latent frame -> 4 frames


def _conv(n_in: int, n_out: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, bias=bias)


class Clamp(nn.Module):
    """Soft clamp of the input latents to (-3, 3)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    """Residual conv block that also sees its input one frame earlier (``past``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            _conv(2 * channels, channels),
            nn.ReLU(),
            _conv(channels, channels),
            nn.ReLU(),
            _conv(channels, channels),
        )

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        """Args: x, past: (N*T, C, H, W), ``past[i]`` being the frame before ``x[i]``."""
        return F.relu(self.conv(torch.cat([x, past], dim=1)) + x)


class TGrow(nn.Module):
    """Turns each frame into ``stride`` consecutive frames with one 1x1 conv."""

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(channels, channels * stride, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N*T, C, H, W) -> (N*T*stride, C, H, W), the frames of one input kept together."""
        return self.conv(x).reshape(-1, *x.shape[1:])


def register_wan21_stats(module: nn.Module, latent_channels: int, setting: str) -> None:
    """Wan 2.1's latent mean / std as (1, C, 1, 1, 1) buffers ``latent_mean`` / ``latent_std`` of
    a TAEHV file trained on raw Wan latents (LightTAE); ``setting`` names the option in errors."""
    from flashdreams.vae.wan21 import WAN21_LATENTS_MEAN, WAN21_LATENTS_STD

    if latent_channels != len(WAN21_LATENTS_MEAN):
        raise ConfigError(f"{setting}=true needs Wan 2.1's {len(WAN21_LATENTS_MEAN)} latent "
                          f"channels")  # fmt: skip
    for name, stats in (("latent_mean", WAN21_LATENTS_MEAN), ("latent_std", WAN21_LATENTS_STD)):
        module.register_buffer(name, torch.tensor(stats).reshape(1, -1, 1, 1, 1), persistent=False)


def build_taehv_decoder(latent_channels: int, channels: Sequence[int]) -> nn.Sequential:
    """The TAEHV decoder stack, indexed as the reference checkpoints expect.

    Args:
        latent_channels: input latent channels (16 for Wan 2.1).
        channels: widths of the three levels and of the output head (256, 128, 64, 64).
    """
    c = [int(v) for v in channels]
    layers: list[nn.Module] = [Clamp(), _conv(latent_channels, c[0]), nn.ReLU()]
    for level, stride in enumerate(TIME_STRIDES):
        layers += [MemBlock(c[level]) for _ in range(3)]
        layers += [nn.Upsample(scale_factor=2), TGrow(c[level], stride)]
        layers += [_conv(c[level], c[level + 1], bias=False)]
    layers += [nn.ReLU(), _conv(c[3], 3)]
    return nn.Sequential(*layers)


class TAEHVDecoder(StreamingDecoder):
    """Streaming TAEHV decoder: each ``decode_step`` runs only the new latent frames.

    A clip of T latent frames gives 4 T raw frames of which TAEHV drops the first 3, so the clip
    decodes to ``1 + 4 (T - 1)`` frames; the first ``decode_step`` drops them, later ones none.

    Args:
        checkpoint: ``taew2_1.pth`` or ``.safetensors`` (decoder keys used, encoder keys ignored);
            None = random weights.
        channels: level widths (256, 128, 64, 64); smaller only for tests.
        latent_channels: latent channels (16 for Wan 2.1).
        seed: seed of the random weights when ``checkpoint`` is None.
        compile: compile the per-block decode with ``torch.compile`` (CUDA only; on CPU it
            logs one line and stays eager).
        raw_latents: the checkpoint decodes Wan's raw latents (LightX2V's LightTAE,
            ``lighttaew2_1``): the DiT's normalized latents are mapped back with Wan 2.1's
            latent mean / std first (``z * std + mean``); ``taew2_1`` takes them as they are.
        channels_last: run the convolutions on NHWC activations and weights, cuDNN's native
            bf16 layout (same values and shapes; without it cuDNN transposes every convolution's
            input and output between NCHW and NHWC). The MemBlock memories and the returned
            frames stay in the default layout.
    """

    spatial_factor = 8
    temporal_factor = 4
    frames_to_trim = 3

    def __init__(
        self,
        checkpoint: str | None = None,
        channels: Sequence[int] = (256, 128, 64, 64),
        latent_channels: int = 16,
        seed: int = 0,
        compile: bool = False,
        raw_latents: bool = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        for key, value in (("compile", compile), ("raw_latents", raw_latents),
                           ("channels_last", channels_last)):  # fmt: skip
            if not isinstance(value, bool):
                raise ConfigError(f"vae.{key}={value!r} must be true or false")
        self.compile = compile
        self._compiled = None  # torch.compile of ``_stack``, built on the first CUDA decode
        self.latent_channels = int(latent_channels)
        if checkpoint is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.decoder = self._build(self.latent_channels, channels)
                self._init_random_weights()
        else:
            with torch.device("meta"):
                self.decoder = self._build(self.latent_channels, channels)
            state = self._decoder_state(read_tensor_file(resolve_path(checkpoint)))
            check_state_dict(self, state, str(checkpoint))
            self.load_state_dict(state, assign=True)
        self.channels_last = channels_last
        if channels_last:
            to_channels_last(self.decoder)
        self.raw_latents = raw_latents
        if raw_latents:
            register_wan21_stats(self, self.latent_channels, "vae.raw_latents")
        self.reset()

    def _build(self, latent_channels: int, channels: Sequence[int]) -> nn.Sequential:
        """The decoder stack (a subclass may widen or deepen it: FlashVSR's TCDecoder)."""
        return build_taehv_decoder(latent_channels, channels)

    def _init_random_weights(self) -> None:
        """Variance-keeping random weights (PyTorch's default init decodes to black frames):
        unit-gain normal convs, zero biases, the head centred on mid-grey."""
        for module in self.decoder.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="linear")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.constant_(self.decoder[-1].bias, 0.5)

    def _decoder_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Decoder keys of a TAEHV file, with TGrow weights cut to this model's strides."""
        out = {k: v.float() for k, v in state.items() if not k.startswith("encoder.")}
        for i, layer in enumerate(self.decoder):
            key = f"decoder.{i}.conv.weight"
            if isinstance(layer, TGrow) and key in out:
                rows = layer.conv.weight.shape[0]
                out[key] = out[key][-rows:]  # a wider file keeps its last-frame outputs
        return out

    def reset(self) -> None:
        """Forget the MemBlock memories; the next ``decode_step`` starts a new clip."""
        self._memory: dict[int, torch.Tensor] = {}
        self._started = False

    def _stack(
        self, x: torch.Tensor, pasts: list[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The stateless decode of consecutive latent frames (what ``compile`` compiles).

        Args:
            x: (N, T, C, h, w) latent frames.
            pasts: per MemBlock in order, its input frame just before ``x`` (N, C', H', W').

        Returns:
            (N, 4 T, 3, H, W) untrimmed frames in [0, 1], and per MemBlock its last input frame.
        """
        n = x.shape[0]
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        h = x.flatten(0, 1).contiguous(memory_format=layout)  # (N*T, C, h, w)
        lasts: list[torch.Tensor] = []
        for layer in self.decoder:
            if not isinstance(layer, MemBlock):
                # TGrow's frame split is a reshape, which hands back the default layout
                h = layer(h).contiguous(memory_format=layout)
                continue
            frames = h.unflatten(0, (n, -1))  # (N, T', C, H, W)
            prev = pasts[len(lasts)].unsqueeze(1)  # (N, 1, C, H, W)
            past = torch.cat([prev, frames[:, :-1]], dim=1).flatten(0, 1)  # (N*T', C, H, W)
            # (N, C, H, W), contiguous as the clip start's zeros: one compiled graph for both
            lasts.append(frames[:, -1].clone(memory_format=torch.contiguous_format))
            h = layer(h, past.contiguous(memory_format=layout))
        frames = h.unflatten(0, (n, -1)).clamp(0.0, 1.0)  # (N, 4T, 3, H, W)
        return frames.contiguous(), lasts

    def _memory_shapes(self, n: int, height: int, width: int) -> list[tuple[int, ...]]:
        """(N, C, H, W) of each MemBlock's input for latents of size ``height`` x ``width``."""
        shapes, c = [], self.latent_channels
        for layer in self.decoder:
            if isinstance(layer, MemBlock):
                shapes.append((n, c, height, width))
            elif isinstance(layer, nn.Upsample):
                height, width = height * 2, width * 2
            elif isinstance(layer, nn.Conv2d):
                c = layer.out_channels
        return shapes

    def _forward(self, x: torch.Tensor, memory: dict[int, torch.Tensor] | None,
                 stack=None) -> torch.Tensor:  # fmt: skip
        """Run the stack on a run of consecutive latent frames.

        Args:
            x: (N, T, C, h, w) latent frames.
            memory: per MemBlock number, its input frame just before ``x`` (absent = zeros, the
                clip start); updated in place with the last frame. None = a whole clip.
            stack: the stateless decode to run (``_stack`` or its compiled form).

        Returns:
            (N, 4 T, 3, H, W) frames in [0, 1], untrimmed.
        """
        memory = {} if memory is None else memory
        shapes = self._memory_shapes(x.shape[0], x.shape[3], x.shape[4])
        pasts = [memory[k] if k in memory else x.new_zeros(shape)
                 for k, shape in enumerate(shapes)]  # fmt: skip
        frames, lasts = (stack or self._stack)(x, pasts)
        memory.update(enumerate(lasts))
        return frames

    def _stack_for(self, x: torch.Tensor):
        """The decode of ``x``'s device: compiled on CUDA when ``compile`` is set, else eager."""
        global _logged_cpu_fallback
        if not self.compile:
            return self._stack
        if x.device.type != "cuda":
            if not _logged_cpu_fallback:
                _logged_cpu_fallback = True
                log.info("vae.compile=true: TAEHV decode stays eager on %s (compiled on CUDA "
                         "only)", x.device.type)  # fmt: skip
            return self._stack
        if self._compiled is None:
            self._compiled = compile_static(self._stack)
        return self._compiled

    def _as_frames(self, latents: torch.Tensor) -> torch.Tensor:
        dtype = self.decoder[1].weight.dtype
        if self.raw_latents:  # LightTAE: Wan's raw latents
            latents = latents.float() * self.latent_std.float() + self.latent_mean.float()
        return latents.transpose(1, 2).to(dtype)  # (B, C, T, h, w) -> (B, T, C, h, w)

    @torch.no_grad()
    def decode_full(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode a whole clip in one parallel pass (the reference for the streaming path).

        Args:
            latents: (B, C, T, h, w) normalized Wan latents of the whole clip.

        Returns:
            (B, 1 + 4 (T - 1), 3, H, W) frames in [0, 1].
        """
        return self._forward(self._as_frames(latents), None)[:, self.frames_to_trim :]

    @torch.no_grad()
    def decode_step(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode the next latent frames of the clip, carrying the MemBlock memories.

        Args:
            latents: (B, C, T, h, w) normalized Wan latents.

        Returns:
            (B, T_out, 3, H, W) frames in [0, 1]; T_out = 1 + 4 (T - 1) on the first call of a
            clip, 4 T after.
        """
        x = self._as_frames(latents)
        frames = self._forward(x, self._memory, self._stack_for(x))
        if not self._started:
            self._started = True
            frames = frames[:, self.frames_to_trim :]
        return frames
