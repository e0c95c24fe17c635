"""Decode a block's latents and commit its K/V: one after the other, or overlapped.

Overlapped decode (``overlap_decode``, CUDA only): the block's decode runs on a side stream,
after the diffuse, while the commit forward runs on the current stream. The commit writes only
the KV cache, never the latents the decode reads; the current stream waits for the decode
before the frames leave the step. Step latency stays encode + diffuse + decode (the decode timed
on its stream); the block period becomes the time from the step's start to both being done.

Pipelined decode (``pipeline_decode``): block n's decode runs on the side stream while the
commit of block n and the next step's encode, control and diffuse run on the current stream;
step n returns the frames of block n - 1 (the current stream waits for that decode at the end
of step n, after its own work is queued), so frames come one step late and in order. A finite
run's last step returns both blocks left; an endless one hands its last block out through
``Rollout.flush``. The decoder's named inputs are gathered on the current stream before the
decode is queued (``StreamingDecoder.gather_inputs``), so a control may free its own copies
freely; the latents are copied, and every tensor crossing streams is ``record_stream``-ed.
Step n's ``decode_ms`` is its own block's decode (side-stream events); its period runs from
its start to its commit and the previous block's decode done. On CPU the decode runs in place
and the frames still come one step late (the same order as on CUDA).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from flashdreams import ConfigError
from flashdreams.stats import StepTimer
from flashdreams.vae.base import StreamingDecoder

log = logging.getLogger(__name__)
_logged_cpu: set[str] = set()  # stream options whose CPU fallback was logged (once per process)


def _stream_option(name: str, value, device: torch.device, on_cpu: str) -> bool:
    """``rollout.<name>`` checked (a bool); logs once per process what CPU does instead."""
    if not isinstance(value, bool):
        raise ConfigError(f"rollout.{name}={value!r} must be true or false")
    if value and device.type != "cuda" and name not in _logged_cpu:
        _logged_cpu.add(name)
        log.info("rollout.%s=true: %s on %s (the overlap needs CUDA streams)", name, on_cpu,
                 device.type)  # fmt: skip
    return value


def check_overlap(overlap_decode, device: torch.device) -> bool:
    """Whether the decode really overlaps the commit: asked for, and on CUDA."""
    on_cpu = "decode and commit run one after the other"
    return _stream_option("overlap_decode", overlap_decode, device, on_cpu) and (
        device.type == "cuda"
    )


def check_pipeline(pipeline_decode, device: torch.device) -> bool:
    """``rollout.pipeline_decode`` checked; on CPU the frames still come one step late."""
    on_cpu = "frames come one step late; the decode runs in place"
    return _stream_option("pipeline_decode", pipeline_decode, device, on_cpu)


class Lagged:
    """The in-order hand-out of pipelined decodes: ``push`` gives back the items pushed before
    (one step late), and every item left when ``last`` is set; ``drain`` empties it."""

    def __init__(self) -> None:
        self._held: list = []

    def push(self, item, last: bool = False) -> list:
        """Hold ``item``; return the earlier items in push order (all, ``item`` too, if
        ``last``)."""
        self._held.append(item)
        keep = 0 if last else 1
        out, self._held = self._held[: len(self._held) - keep], self._held[len(self._held) - keep :]
        return out

    def drain(self) -> list:
        """Every item held, in push order (an endless stream stopping)."""
        out, self._held = self._held, []
        return out

    def __len__(self) -> int:
        return len(self._held)


class BlockDecoder:
    """Runs a block's decode and its commit (``commit``: a callable, or None for none).

    Args:
        vae: the streaming decoder.
        dtype: the latents' dtype for the decoder.
        device: the run's device.
        overlap: decode on a side stream while the commit runs (CUDA; see the module doc).
        pipeline: decode block n while block n + 1 is diffused; frames one step late.
    """

    def __init__(self, vae: StreamingDecoder, dtype: torch.dtype, device: torch.device,
                 overlap: bool, pipeline: bool = False) -> None:  # fmt: skip
        self.vae, self.dtype, self.device = vae, dtype, device
        self.overlap = check_overlap(overlap, device)
        self.pipeline = check_pipeline(pipeline, device)
        self._side_stream: torch.cuda.Stream | None = None  # made on first use
        self._lagged = Lagged()  # (frames, decoded event or None) of blocks not handed out

    def reset(self) -> None:
        """Drop the decodes not handed out (a new clip); the decoder's own state is the VAE's."""
        self._lagged.drain()

    def __call__(self, x0: torch.Tensor, timer: StepTimer, commit: Callable[[], None] | None,
                 last: bool = False) -> torch.Tensor | None:  # fmt: skip
        """Frames (B, T, 3, H, W) of latents ``x0`` (B, C, F, h, w); ``commit`` runs too.

        With ``pipeline``: the frames of the blocks decoded before (and of this one if
        ``last``), or None when none are due."""
        if self.pipeline:
            return self._pipelined(x0, timer, commit, last)
        if self.overlap:
            return self._overlapped(x0, timer, commit)
        timer.start("decode")
        frames = self.vae.decode_step(x0.to(self.dtype))
        timer.stop()
        if commit is not None:
            timer.start("commit")
            commit()
            timer.stop()
        return frames

    def _overlapped(self, x0, timer: StepTimer, commit) -> torch.Tensor | None:
        """Decode on the side stream while the commit runs on the current one (CUDA).

        Both start after the diffuse. The commit writes only the KV cache (its input is a read
        of ``x0``, as is the decode's); the current stream waits for the decode before the
        frames are returned, so every later use of them is ordered after it.
        """
        main, side = torch.cuda.current_stream(self.device), self._side()
        latents = x0.to(self.dtype)  # (B, C, F, h, w), made on the current stream
        side.wait_stream(main)  # the decode starts after the diffuse
        with torch.cuda.stream(side):
            latents.record_stream(side)  # its memory is not reused before the decode read it
            timer.start("decode")  # events on the side stream: the decode's own time
            frames = self.vae.decode_step(latents)
            timer.stop()
            decoded = torch.cuda.Event()
            decoded.record(side)
        if commit is not None:
            timer.start("commit")
            commit()
            timer.stop()
        main.wait_event(decoded)  # frames are complete for whatever the caller runs next
        if frames is not None:
            frames.record_stream(main)  # made on the side stream, freed after main's uses
        timer.close_period()
        return frames

    def _side(self) -> torch.cuda.Stream:
        if self._side_stream is None:  # high priority: the decode is on the visible path
            self._side_stream = torch.cuda.Stream(self.device, priority=-1)
        return self._side_stream

    def _pipelined(self, x0, timer: StepTimer, commit, last: bool) -> torch.Tensor | None:
        """Queue this block's decode on the side stream, run the commit, hand out the frames
        decoded before (see the module doc)."""
        latents = x0.to(self.dtype, copy=True)  # the decode's own: x0 may be a reused buffer
        gathered = self.vae.gather_inputs(latents.shape[2])  # on the current stream
        decoded = None
        if self.device.type == "cuda":
            main, side = torch.cuda.current_stream(self.device), self._side()
            side.wait_stream(main)  # the decode starts after the diffuse and the gathering
            with torch.cuda.stream(side):
                for tensor in (latents, *gathered.values()):
                    tensor.record_stream(side)  # not reused before the decode read it
                timer.start("decode")  # events on the side stream: the decode's own time
                frames = self.vae.decode_step(latents, **gathered)
                timer.stop()
                decoded = torch.cuda.Event()
                decoded.record(side)
        else:
            timer.start("decode")
            frames = self.vae.decode_step(latents, **gathered)
            timer.stop()
        if commit is not None:
            timer.start("commit")
            commit()
            timer.stop()
        due = self._lagged.push((frames, decoded), last)
        if not due:
            timer.close_period()
            return None
        out = self._hand_out(due)
        timer.close_period()
        return out

    def flush(self) -> torch.Tensor | None:
        """The frames of the decodes not handed out yet (an endless stream stopping), or None."""
        due = self._lagged.drain()
        return self._hand_out(due) if due else None

    def _hand_out(self, due: list) -> torch.Tensor | None:
        """Frames of ``due`` decodes in order; the current stream waits for each decode."""
        parts = []
        for frames, decoded in due:
            if decoded is not None:
                main = torch.cuda.current_stream(self.device)
                main.wait_event(decoded)  # frames complete for whatever the caller runs next
                if frames is not None:
                    frames.record_stream(main)  # made on the side stream, freed after main's uses
            if frames is not None:
                parts.append(frames)
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
