"""Protocol of a control encoder: live or scripted control -> named inputs of the DiT.

The base class is also the no-op control of recipes without one (``control=none``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from flashdreams.graph.runner import GraphRunner
from flashdreams.model.base import ConditionInput


@dataclass(frozen=True)
class RunSize:
    """The run size an input implies (a video to upscale): None where it implies nothing."""

    height: int | None = None  # output pixels
    width: int | None = None
    latent_frames: int | None = None  # latent frames the input fills (None: unknown / endless)


class ControlEncoder(GraphRunner, nn.Module):
    """Turns a clip's control (a file, then each step's live control) into named tensors.

    Per clip the loop calls ``prepare(batch, ...)`` once; before each AR step the session hands
    it the step's live control (``set_control``, already validated by the session); every forward
    then asks ``inputs(start, num)`` for the tensors of latent frames [start, start + num), keyed
    by the names of ``provides()``, which the model must accept (``DiT.inputs``), after the loop
    called ``encode_block(start, num)`` once per block (the timed ``control`` stage). A control
    that takes streamed frames (``frames_ahead() > 0``) gets them through ``push_frames``.
    ``state()`` reports what was applied (the server sends it with each step).

    Subclasses declare the inputs they give in ``provides()`` with the shapes the model expects.
    A control with a network of its own (an encoder) runs its forwards under the run's graph
    policy (``GraphRunner``): the build hands it a fresh instance (``set_graph``) and
    ``run_graph`` compiles and, for a ``shape_key``, captures them as the policy does the DiT's.
    """

    def provides(self) -> dict[str, ConditionInput]:
        """Named inputs this control gives (none here)."""
        return {}

    def run_size(self) -> RunSize | None:
        """The run size this control's input proposes (``rollout.height`` / ``width`` /
        ``total_blocks`` left null take it: ``build.resolve_run_size``); None by default."""
        return None

    def decoder_provides(self) -> dict[str, str]:
        """Named decoder inputs this control gives (``StreamingDecoder.inputs``); none here."""
        return {}

    def decoder_inputs(self, start: int, num: int) -> dict[str, torch.Tensor]:
        """Named decoder inputs of latent frames [start, start + num) (``decoder_provides``)."""
        return {}

    def take_parts(self) -> dict[str, list]:
        """Sub-stage timings recorded since the last call (name -> (begin, end) ``stats.Mark``
        pairs, e.g. the LR projector's forwards), added to the step's ``StepTimer``; none here."""
        return {}

    def parts_inside(self) -> dict[str, str]:
        """The stage each of ``take_parts``'s parts runs inside (``{"projector": "diffuse"}``:
        the step's stats then also give the stage without it, ``dit_ms``); parts not named run
        beside the stages. None here."""
        return {}

    def check_frames(self, num_frames: int) -> None:
        """Fail in one line, before any model loads, if a clip of ``num_frames`` latent frames
        cannot be controlled (a control file too short); nothing to check by default."""

    def prepare(self, batch: int, *, height: int, width: int, num_frames: int | None,
                device: torch.device) -> None:  # fmt: skip
        """Start a clip of ``num_frames`` latent frames (None: an endless stream)."""

    def live_control(self) -> dict[str, Any] | None:
        """What a live client may send (``{"keys": [...], "mouse": bool}``: the browser page
        sends only these), or None when the control takes no keys. Optional ``mouse_per_px``:
        the protocol's ``mouse`` units per pointer pixel per video frame (the page sends pixels x
        it; absent: pixels), ``mouse_max``: the per-axis bound the control clamps to."""
        return None

    def set_control(self, control: dict[str, Any] | None) -> None:
        """The live control of the next step (validated by the session), or None."""

    def validate(self, control: dict[str, Any]) -> None:
        """One-line ``ConfigError`` unless ``control`` is a live control this encoder takes (a
        server checks every message with it, before the step that would use it); anything
        goes by default."""

    def frames_ahead(self) -> int:
        """Streamed frames (``push_frames``) this control holds at most beyond the ones it
        used; 0: it takes none (the server refuses binary frame messages)."""
        return 0

    def push_frames(self, frames, first: int | None = None) -> int:
        """Hand in streamed conditioning frames (OmniDreams: rendered HDMap frames) for video
        frames ``first``, ``first + 1``, ... of the stream; returns ``first``.

        Raises:
            ValueError: this control takes no streamed frames (or they do not fit).
        """
        raise ValueError(f"{type(self).__name__} takes no streamed frames")

    def pending_frames(self) -> int:
        """Streamed frames pushed and held, not used yet (a server bounds its queue by them)."""
        return 0

    def waiting(self) -> bool:
        """True while the next step cannot run until frames are pushed."""
        return False

    def encode_block(self, start: int, num: int) -> None:
        """Do the costly part of ``inputs(start, num)`` now (an encode), before the block's
        forwards: the rollout times it as the step's ``control`` stage. Nothing by default."""

    #: where the loop calls ``encode_ahead`` (``rollout.prefetch_control``): ``denoise``, once
    #: the block's denoising is queued (its GPU work runs beside the denoising), or ``commit``,
    #: once the block's decode is queued too, right before its commit (beside the commit: the
    #: denoising and decode, the step's latency, keep the GPU to themselves)
    ahead_beside = "denoise"

    def read_ahead(self, start: int, num: int) -> None:
        """The host part of a later block's ``encode_ahead`` (reading its input), called once
        the current block's denoising is queued, whatever ``ahead_beside``: the host works
        while the GPU denoises. Nothing by default."""

    def encode_ahead(self, start: int, num: int) -> None:
        """Start the costly part of ``inputs(start, num)`` for a later block now, off the
        critical path (``rollout.prefetch_control``: the loop calls it for the next block at
        ``ahead_beside``): on CUDA a control queues it on a side stream, and the block's
        ``encode_block`` then only waits for it.
        The result must equal the in-step encode's; a control whose input for those frames may
        still change (streamed frames not arrived) encodes nothing ahead, or drops what it
        encoded when the input changes. Nothing by default."""

    def inputs(self, start: int, num: int) -> dict[str, torch.Tensor]:
        """Named tensors of latent frames [start, start + num)."""
        return {}

    def state(self) -> dict[str, Any] | None:
        """JSON-able summary of the control applied last (e.g. the camera pose), or None."""
        return None


class NoControl(ControlEncoder):
    """No control input (``control=none``)."""
