"""One client's stream: its protocol state machine and its generation loop.

Everything here runs on the event loop except the jobs handed to the engine's device thread
(``_step_job``, session build and free) and JPEG encoding (a pool of worker threads, one frame
per worker), so the server stays responsive while a step runs. A step's frames are encoded and
sent while the next step runs. With ``serve.realtime`` a playout task hands frames to the
client's queue at the video's frame rate (no bursts of a whole block), while generation runs
at most ``serve.lead_s`` ahead.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from omegaconf import DictConfig

from flashdreams import ConfigError
from flashdreams.serve import protocol
from flashdreams.serve.protocol import FrameInfo, ProtocolError
from flashdreams.session import Session, SessionStep, validate_control

log = logging.getLogger("flashdreams.serve")
INTERNAL = "internal error; the details are in the server log"
_ENCODERS: ThreadPoolExecutor | None = None


def encoders() -> ThreadPoolExecutor:
    """The JPEG workers shared by every stream (Pillow releases the GIL while it encodes)."""
    global _ENCODERS
    if _ENCODERS is None:
        _ENCODERS = ThreadPoolExecutor(min(8, max(2, (os.cpu_count() or 2) // 2)),
                                       thread_name_prefix="flashdreams-jpeg")  # fmt: skip
    return _ENCODERS


class _Playout:
    """Hands a stream's messages to the client's queue, frames at ``fps`` (realtime) or at once.

    A frame is due ``index / fps`` after the stream's first frame; a late frame goes out at
    once and later frames are spaced from it (the clock restarts), so delivery never bursts
    to catch up. A stop flushes: the frames still waiting for their turn go out at once.
    """

    def __init__(self, out, fps: float | None) -> None:
        self.out, self.period = out, (1.0 / fps if fps else 0.0)
        self.items: asyncio.Queue = asyncio.Queue()
        self.t0: float | None = None
        self.index = 0
        self.hurry = asyncio.Event()  # set: the queued messages go out at once (a stop)
        self.task = asyncio.create_task(self._run())

    def put(self, item: str | bytes, paced: bool = False) -> None:
        """Queue a message; a ``paced`` one (a frame time's first frame) waits for its turn."""
        self.items.put_nowait((item, paced))

    async def _run(self) -> None:
        while True:
            item, paced = await self.items.get()
            if item is None:
                return
            if paced and self.period and not self.hurry.is_set():
                now = time.monotonic()
                if self.t0 is None:
                    self.t0 = now
                due = self.t0 + self.index * self.period
                if due > now:  # (a flush cuts the wait short)
                    try:
                        await asyncio.wait_for(self.hurry.wait(), due - now)
                    except asyncio.TimeoutError:
                        pass
                elif now - due > self.period:  # late: restart the clock at this frame
                    self.t0 = now - self.index * self.period
                self.index += 1
            self.out.put(item, droppable=True)

    def restart(self) -> None:
        """After a pause: the next frame is due at once."""
        self.t0, self.index = None, 0

    async def finish(self, how: str) -> None:
        """Stop after handing over the queued messages at their pace (``"pace"``: the stream
        finished) or at once (``"flush"``: a client stop, a restart, an error: every frame
        already produced is delivered), or dropping them (``"discard"``: the client is gone)."""
        if how in ("pace", "flush"):
            if how == "flush":
                self.hurry.set()
            self.items.put_nowait((None, False))
            await self.task
        else:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass


class _Pacer:
    """Keeps generated video at most ``lead_s`` ahead of wall-clock playback at ``fps``."""

    def __init__(self, fps: float, lead_s: float) -> None:
        self.fps, self.lead_s = fps, lead_s
        self.restart()

    def restart(self) -> None:
        self.t0, self.video_s = None, 0.0

    def add(self, frames: int) -> None:
        self.t0 = time.monotonic() if self.t0 is None else self.t0
        self.video_s += frames / self.fps

    def delay(self) -> float:
        if self.t0 is None:
            return 0.0
        return self.t0 + self.video_s - self.lead_s - time.monotonic()


class Stream:
    """Protocol handler of one WebSocket client (at most one session at a time).

    Args:
        engine: the shared engine (model weights, device thread, session slots).
        cfg: the serve config.
        out: the client's outgoing queue.
        raw_frames: frame messages carry the frame as raw (H, W, 3) RGB bytes, not a JPEG
            (the realtime endpoint encodes them to fragmented MP4 itself).
    """

    def __init__(self, engine, cfg: DictConfig, out, raw_frames: bool = False) -> None:
        self.engine, self.cfg, self.out = engine, cfg, out
        self.encode_frame = _raw_frame if raw_frames else protocol.encode_jpeg
        self.session: Session | None = None
        self.task: asyncio.Task | None = None
        self.paused = self.stop_requested = False
        self.stop_reason = "finished"
        self.wake = asyncio.Event()
        self.pending_prompt: str | None = None
        self.control: dict | None = None  # applies to every step until replaced
        self.frames: list[tuple[int | None, object]] = []  # control frames for the next step
        self.control_pending = 0  # frames the session's control held after the last step
        self.frames_made = 0
        self.pacer = _Pacer(cfg.fps, cfg.serve.lead_s) if cfg.serve.realtime else None
        self.playout: _Playout | None = None

    def hello(self) -> dict:
        """Fields of the ``hello`` message sent on connect."""
        r, s = self.cfg.rollout, self.cfg.serve
        height, width = self.engine.frame_size
        return {
            "version": protocol.PROTOCOL_VERSION, "run_name": self.cfg.run_name,
            "height": height, "width": width, "fps": self.cfg.fps,
            "frames_per_block": r.frames_per_block, "batch_size": r.batch_size,
            "first_block_frames": r.get("first_block_frames") or r.frames_per_block,
            "max_sessions": s.max_sessions, "max_message_bytes": s.max_message_bytes,
            "queue_frames": s.queue_frames, "prompt": self.cfg.prompt,
            "max_session_bytes": self.engine.max_session_bytes,
            # the keys (and mouse) the recipe's control takes: the page sends only these
            "control": self.engine.shared.conditioning.control.live_control(),
            # binary control frames (HDMap) the recipe takes ahead of its steps (0: none)
            "control_frames": self._frames_ahead(), "max_frame_bytes": s.max_frame_bytes,
            "max_frame_pixels": s.max_frame_pixels,
        }  # fmt: skip

    def _frames_ahead(self) -> int:
        return self.engine.shared.conditioning.control.frames_ahead()

    def reply(self, kind: str, **fields) -> None:
        self.out.put(protocol.event(kind, **fields), droppable=False)

    # ------------------------------------------------------------------ messages
    async def handle(self, raw: str | bytes | None) -> None:
        """Act on one client message; a bad one gets an ``error`` reply and nothing else."""
        s = self.cfg.serve
        try:
            binary = isinstance(raw, (bytes, protocol.Oversize))  # text: JSON below
            if binary and protocol.check_control_frame(raw, self._frames_ahead(),
                                                       self.cfg.run_name, s.max_frame_bytes):  # fmt: skip
                await self._control_frame(raw)
                return
            msg = protocol.parse_message(raw, s.max_message_bytes, s.max_prompt_chars)
            kind = msg["type"]
            if kind == "start":
                await self._start(msg)
                return
            if self.session is None:
                raise ProtocolError("no_session", f"{kind}: no stream is running; send start")
            if kind == "prompt":
                self.pending_prompt = msg["text"]
                self.reply("prompt", text=msg["text"], applies="next step")
            elif kind == "control":
                control = {k: v for k, v in msg.items() if k != "type"}
                try:  # its form, then what this recipe's control takes (keys of the variant)
                    control = validate_control(control)
                    self.engine.shared.conditioning.control.validate(control)
                except ValueError as err:  # ConfigError is a ValueError
                    raise ProtocolError("bad_message", f"control: {err}") from None
                self.control = control
            elif kind in ("pause", "resume"):
                self.paused = kind == "pause"
                if self.pacer is not None:
                    self.pacer.restart()
                if self.playout is not None and not self.paused:
                    self.playout.restart()
                self.wake.set()
                self.reply("paused" if self.paused else "resumed", step=self.session.step_index)
            elif kind == "stop":
                await self.end("client")
        except ProtocolError as err:
            self.out.put(protocol.error(err.code, str(err)), droppable=False)

    async def _control_frame(self, raw: bytes) -> None:
        """A binary control frame: decoded and fitted to the run's size on a worker, queued for
        the next step.

        At most ``control.max_ahead_frames`` frames wait per session, here and in the control
        together (the control's count is the one after the last step): a frame past that is
        refused before it is decoded, with one ``bad_frame`` error naming the limit, and the
        frames queued before it stay (the newest is refused, none is dropped).
        """
        if self.session is None:
            raise ProtocolError("no_session", "control frame: no stream is running; send start")
        limit = self._frames_ahead()
        waiting = len(self.frames) + self.control_pending
        if waiting >= limit:
            raise ProtocolError("bad_frame", f"control frame refused: {waiting} frames wait for "
                                f"the model already (control.max_ahead_frames={limit}); send "
                                "them no faster than the stream plays")  # fmt: skip
        r, loop = self.cfg.rollout, asyncio.get_running_loop()
        self.frames.append(await loop.run_in_executor(
            encoders(), _decode_control_frame, raw, self.cfg.serve.max_frame_pixels,
            int(r.width), int(r.height)))  # fmt: skip
        self.wake.set()

    async def _start(self, msg: dict) -> None:
        await self.end("restart")
        if not self.engine.try_acquire():
            n = self.engine.max_sessions
            raise ProtocolError("busy", f"server busy: all {n} session(s) (serve.max_sessions="
                                f"{n}) are in use; try again later")  # fmt: skip
        prompt = msg.get("prompt") or self.cfg.prompt
        seed = msg["seed"] if msg.get("seed") is not None else self.cfg.seed
        total = msg["total_blocks"] if "total_blocks" in msg else self.cfg.serve.total_blocks
        loop = asyncio.get_running_loop()
        try:
            self.engine.check_session_size(total)  # before any allocation on the device thread
            self.session = await loop.run_in_executor(
                self.engine.executor, self.engine.new_session, prompt, seed, total
            )
        except ProtocolError:
            self.engine.release()
            raise
        except (ConfigError, ValueError) as err:
            self.engine.release()
            raise ProtocolError("bad_message", f"start: {err}") from None
        except Exception:  # e.g. out of device memory: the server goes on
            self.engine.release()
            log.exception("could not build a session")
            raise ProtocolError("internal", f"start: {INTERNAL}") from None
        self.paused = self.stop_requested = False
        self.pending_prompt = self.control = None
        self.frames_made, self.frames, self.control_pending = 0, [], 0
        if self.pacer is not None:
            self.pacer.restart()
        self.playout = _Playout(self.out, self.cfg.fps if self.pacer is not None else None)
        height, width = self.session.frame_size  # upscaled when a postprocess is chained
        self.reply("started", prompt=prompt, seed=seed, total_blocks=self.session.total_blocks,
                   width=width, height=height)  # fmt: skip
        self.task = asyncio.create_task(self._generate())

    async def end(self, reason: str) -> None:
        """Stop the running stream (after its current step) and free its session.

        No step starts after this; the frames already produced (the current step's too) are
        all handed to the client's queue at once, then ``stopped`` (whose ``frames`` counts
        them), except for ``reason="disconnect"``, where they are dropped.
        """
        if self.task is None:
            return
        self.stop_requested, self.stop_reason = True, reason
        self.wake.set()
        task, self.task = self.task, None
        await task

    # ------------------------------------------------------------------ generation
    async def _wait(self, timeout: float | None) -> None:
        self.wake.clear()
        try:
            await asyncio.wait_for(self.wake.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    async def _generate(self) -> None:
        loop = asyncio.get_running_loop()
        session, emitting, reason = self.session, None, None
        try:
            while not self.stop_requested and not session.finished:
                if self.paused:
                    await self._wait(None)
                    continue
                delay = self.pacer.delay() if self.pacer is not None else 0.0
                if delay > 0:
                    await self._wait(delay)
                    continue
                if session.waiting_for_frames and not self.frames:
                    await self._wait(None)  # a live HDMap stream before its first frame
                    continue
                prompt, self.pending_prompt = self.pending_prompt, None
                frames, self.frames = self.frames, []
                *job, refused, self.control_pending = await loop.run_in_executor(
                    self.engine.executor, _step_job, session, prompt, self.control, frames
                )
                for message in refused:
                    self.reply("error", code="bad_frame", message=message)
                if emitting is not None:
                    await emitting
                emitting = asyncio.create_task(self._emit(*job))
        except Exception:  # noqa: BLE001  (reported to the client; the server goes on)
            log.exception("stream failed")
            reason = "error"
            self.reply("error", code="internal", message=INTERNAL)
        finally:
            if emitting is not None:
                await emitting
            playout, self.playout = self.playout, None
            # a client's stop (or restart) still delivers every frame already produced, at
            # once (the page paces what it received); a disconnect has no one to deliver to
            if self.stop_requested and self.stop_reason == "disconnect":
                await playout.finish("discard")
            else:
                await playout.finish("flush" if reason or self.stop_requested else "pace")
            steps = session.step_index
            self.session = None
            await loop.run_in_executor(self.engine.executor, self.engine.end_session, session)
            del session
            self.engine.release()
            reason = reason or (self.stop_reason if self.stop_requested else "finished")
            self.reply("stopped", reason=reason, steps=steps, frames=self.frames_made,
                       dropped=self.out.dropped)  # fmt: skip
            self.task = None if self.task is asyncio.current_task() else self.task

    async def _emit(self, step: SessionStep, host, done) -> None:
        """Encode a step's frames on the JPEG workers and hand them (after a ``step`` message)
        to the playout."""
        loop = asyncio.get_running_loop()
        if done is not None:
            await asyncio.to_thread(done.synchronize)
        q = self.cfg.serve.jpeg_quality
        frames = [] if host is None else [host[b, i] for i in range(host.shape[1])
                                          for b in range(host.shape[0])]  # fmt: skip
        jpegs = await asyncio.gather(
            *(loop.run_in_executor(encoders(), self.encode_frame, f, q) for f in frames)
        )
        messages, num_frames = self._messages(step, host, jpegs)
        batch = 1 if host is None else host.shape[0]
        for k, item in enumerate(messages):  # the step message, then frame by frame
            self.playout.put(item, paced=k > 0 and (k - 1) % batch == 0)
        self.frames_made += num_frames
        if self.pacer is not None:
            self.pacer.add(num_frames)

    def _messages(self, step: SessionStep, host, jpegs) -> tuple[list[str | bytes], int]:
        t = step.timings()
        frames_in_block = 0 if host is None else host.shape[1]
        head = protocol.event(
            "step", step=step.step, frames=frames_in_block, prompt_version=step.prompt_version,
            control=step.control, **{k: round(t[k], 3) for k in
                                     ("step_ms", "period_ms", "recache_ms", "commit_ms")},
            **({} if step.state is None else {"state": step.state}),  # e.g. the camera pose
        )  # fmt: skip
        messages: list[str | bytes] = [head]
        jpeg = iter(jpegs)
        for i in range(frames_in_block):
            for b in range(host.shape[0]):
                info = FrameInfo(step.step, self.frames_made + i, i, frames_in_block, b,
                                 host.shape[0], t["step_ms"], t["period_ms"], 0,
                                 step.prompt_version)  # fmt: skip
                messages.append(protocol.pack_frame(info, next(jpeg)))
        return messages, frames_in_block


def _decode_control_frame(raw: bytes, max_pixels: int, width: int, height: int):
    """On a worker: a control frame message decoded (``protocol.parse_control_frame``: size and
    aspect ratio checked from the image header first) and fitted to the run's ``width`` x
    ``height``, so a pending frame holds the run's size, not the client's."""
    from flashdreams.control.video_frames import fit

    index, frame = protocol.parse_control_frame(raw, max_pixels, (width, height))
    return index, fit(frame, width, height)


def _raw_frame(frame, quality: int) -> bytes:
    """A frame's raw RGB bytes (``quality`` unused)."""
    return frame.tobytes()


def _step_job(session: Session, prompt: str | None, control: dict | None, frames=()):
    """On the device thread: the client's control frames, then one AR step, its frames copied
    to the host without a sync.

    The copy goes to pinned memory, so this thread returns while the GPU still runs the step
    and the next step's launches queue behind it; ``done`` marks when ``host`` may be read.
    ``refused`` holds why control frames were refused (late, too far ahead, wrong shape);
    ``pending`` counts the frames the control holds after the step.
    """
    refused = []
    for index, frame in frames:
        try:
            session.push_frames(frame[None], index)
        except ValueError as err:
            refused.append(f"control frame: {err}")
    if prompt is not None:
        session.set_prompt(prompt)
    frames = session.step(control)  # (B, T, 3, H, W) in [0, 1]
    step, host, done = session.last, None, None
    if frames is not None:
        u8 = (frames.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 1, 3, 4, 2)
        u8 = u8.contiguous()  # (B, T, H, W, 3)
        if frames.is_cuda:  # into pinned memory: the copy is queued, the thread goes on
            pinned = torch.empty(u8.shape, dtype=torch.uint8, pin_memory=True)
            host = pinned.copy_(u8, non_blocking=True).numpy()
            done = torch.cuda.Event()
            done.record()
        else:
            host = u8.numpy()
    return step, host, done, refused, session.pending_frames
