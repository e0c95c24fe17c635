"""``flashdreams.Session``: one steerable, possibly endless AR video stream.

A session drives a ``Rollout`` built from a composed config::

    session = Session.from_overrides(["recipe=demo"], prompt="a fox in the snow", seed=0)
    for frames in itertools.islice(session, 8):   # endless with cache=rolling; (B, T, 3, H, W)
        ...
    session.set_prompt("the fox jumps into a river")  # takes effect at the next step
    frames = session.step(control={"keys": ["w"]})
    session.reset(seed=1)

A control that takes streamed frames (OmniDreams' HDMap) gets them with ``push_frames`` between
steps: frame ``k`` conditions video frame ``k`` of the stream.

A prompt switch ("recache") re-encodes the cross-attention K/V and rewrites the K/V of every
frame still in the KV cache under the new prompt (``recache.py``): the clean latents of those
frames are kept and their commit forwards replayed in order, block-causally, at the commit
timestep ``rollout.context_noise`` without fresh noise. Evicted frames are not replayed.

A session may be shared between threads: ``step``, ``reset``, ``set_prompt`` and ``close``
take a lock, so concurrent callers run one after the other (each step sees the state the
previous one left). After ``close()`` every one of them raises ``SessionClosed``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from flashdreams import ConfigError
from flashdreams.config import schema  # noqa: F401  (Session(cfg) of a Hydra-composed config)
from flashdreams.config.validate import check_seed, check_total_blocks
from flashdreams.rollout import Rollout, StepOutput
from flashdreams.session.control import validate_control
from flashdreams.session.recache import block_frames, replay, resident_frames

__all__ = ["Session", "SessionClosed", "SessionEnded", "SessionStep", "validate_control"]

_CONFIG = object()  # sentinel: take the value from the config / the cache's capabilities


class SessionEnded(RuntimeError):
    """The stream has no next step (its ``total_blocks`` are done or RoPE range is used up)."""


class SessionClosed(RuntimeError):
    """The session was closed: it cannot step, reset or switch prompts any more."""


@dataclass
class SessionStep:
    """One step of a session, as the server reports it."""

    step: int
    frames: torch.Tensor | None  # (B, T, 3, H, W) float in [0, 1]
    output: StepOutput
    prompt_version: int  # increments with every prompt switch that took effect
    control: dict[str, Any] | None  # the control applied at this step
    recache_ms: float  # time spent recaching on a prompt switch (0 otherwise)
    state: dict[str, Any] | None = None  # what the control did (camera recipes: the pose)

    def timings(self) -> dict[str, float]:
        """Stage times in ms; call once the step's device work is done (e.g. after ``.cpu()``)."""
        row = self.output.timer.resolve()
        row["recache_ms"] = self.recache_ms
        row["step_ms"] += self.recache_ms  # the switch delays this visible block
        row["period_ms"] += self.recache_ms
        return row


def _wraps(cache) -> bool:
    """True if the cache can hold an endless stream (old frames are evicted, not refused)."""
    return cache.rolls


class Session:
    """A steerable stream over one ``Rollout``.

    Args:
        cfg: composed run config (builds the rollout; its ``prompt``, ``seed`` and ``image``
            are defaults).
        rollout: an already built rollout to drive instead (the server shares model weights).
        prompt: the first prompt (one string for every video of the batch, or one per video).
        seed: seed of the stream's noise, an integer in [0, 2**63).
        total_blocks: AR steps of the stream, a positive integer; ``None`` is endless (needs a
            rolling cache).
            Default: endless when the cache rolls (unless an input video sets the length), else
            the config's ``rollout.total_blocks``.
        images: one PIL image per video for image-conditioned recipes (kept across resets).
        postprocess: a ``flashdreams.postprocess.Postprocess`` fed this stream's frames (a
            server's, around shared weights); None: the one ``cfg``'s ``postprocess`` names.
    """

    def __init__(self, cfg=None, *, rollout: Rollout | None = None, prompt=None, seed=None,
                 total_blocks: Any = _CONFIG, images: list | None = None,
                 postprocess=None) -> None:  # fmt: skip
        if rollout is None:
            if cfg is None:
                raise ValueError("Session needs a composed config or a rollout")
            from flashdreams.build import build_rollout
            from flashdreams.config.options import scope_options

            scope_options(cfg)  # a recipe's keys of options it did not choose are dropped
            rollout = build_rollout(cfg)
        from flashdreams.postprocess import build_postprocess

        # postprocess=...: steps return the post-processed (upscaled) frames as they come; a
        # server hands in one built around weights its sessions share
        if postprocess is None and cfg is not None:
            postprocess = build_postprocess(cfg, rollout)
        self.postprocess = postprocess
        self._lock = threading.Lock()
        self.rollout = rollout
        self._default_total = rollout.total_blocks
        size = rollout.control.run_size()  # an input of a known length (a video to upscale)
        self._finite_input = size is not None and size.latent_frames is not None
        if prompt is None:
            prompt = cfg.prompt if cfg is not None else ""
        seed = cfg.seed if seed is None and cfg is not None else seed
        if images is None and cfg is not None and cfg.get("image"):
            from flashdreams.io.image import load_image

            images = [load_image(cfg.image)] * rollout.batch_size
        self.images = images
        self.reset(seed, prompt, total_blocks)

    @classmethod
    def from_overrides(cls, overrides: list[str] = (), **kwargs) -> Session:
        """Compose the run config with ``flashdreams-run`` overrides and build a session.

        Example: ``Session.from_overrides(["recipe=demo", "device=cpu"], prompt="a fox")``.
        """
        from flashdreams.config import compose_run

        return cls(compose_run(overrides), **kwargs)

    # ------------------------------------------------------------------ state
    def reset(self, seed: int | None = None, prompt=None, total_blocks: Any = _CONFIG) -> None:
        """Start the stream over: empty cache, fresh decoder state, generator seeded ``seed``.

        Args:
            seed: new seed (``None`` keeps the current one).
            prompt: new prompt (``None`` keeps the current one).
            total_blocks: as in the constructor (default keeps the current choice).

        Raises:
            ConfigError: a seed or ``total_blocks`` out of range.
            ValueError: a prompt that is not a non-empty string or a list of them.
            SessionClosed: the session was closed.
        """
        with self._locked():
            self._reset(seed, prompt, total_blocks)

    def _reset(self, seed, prompt, total_blocks) -> None:
        if seed is not None:
            check_seed(seed)
        r = self.rollout
        if total_blocks is _CONFIG:
            total_blocks = getattr(self, "total_blocks", _CONFIG)
        if total_blocks is _CONFIG:
            endless = r.cache is not None and _wraps(r.cache) and not self._finite_input
            total_blocks = None if endless else self._default_total
        self._check_total_blocks(total_blocks)
        prompts = self._prompts(prompt) if prompt is not None else list(r.prompts)
        self.total_blocks = r.total_blocks = total_blocks
        if self.images is None:
            r.start(prompts, seed)
        else:
            r.start(prompts, seed, images=self.images)
        r.precapture()
        if self.postprocess is not None:
            self.postprocess.start()
        self._blocks: list[tuple[int, torch.Tensor]] = []  # (start frame, clean latents)
        self._pending_prompts: list[str] | None = None
        self.prompt_version = 0
        self.last: SessionStep | None = None

    def _check_total_blocks(self, total_blocks: int | None) -> None:
        r, cache = self.rollout, self.rollout.cache
        check_total_blocks(total_blocks)
        if cache is None:
            if total_blocks != 1:
                raise ConfigError("a recipe without KV cache (bidirectional) streams one block")
            return
        frames = r.run_frames(total_blocks)
        if not _wraps(cache) and (frames is None or frames > cache.capacity_frames):
            raise ConfigError(
                f"the KV cache holds {cache.capacity_frames} latent frames, too few for "
                f"total_blocks={total_blocks}; endless streams need cache=rolling"
            )

    def _prompts(self, prompt) -> list[str]:
        n = self.rollout.batch_size
        if isinstance(prompt, str):
            prompts = [prompt] * n
        elif isinstance(prompt, (list, tuple)) and all(isinstance(p, str) for p in prompt):
            prompts = list(prompt)
        else:
            raise ValueError(f"prompt must be a string or a list of {n} strings, "
                             f"not {type(prompt).__name__}")  # fmt: skip
        if len(prompts) != n:
            raise ValueError(f"prompt must be a string or a list of {n} strings, "
                             f"not {len(prompts)}")  # fmt: skip
        if any(not p.strip() for p in prompts):
            raise ValueError("prompt must not be empty")
        return prompts

    @property
    def prompts(self) -> list[str]:
        """The prompts of the next step (a pending switch included)."""
        return list(self._pending_prompts or self.rollout.prompts)

    @property
    def frame_size(self) -> tuple[int, int]:
        """(height, width) of the frames ``step`` returns (post-processed ones when chained)."""
        r = self.rollout if self.postprocess is None else self.postprocess.rollout
        return r.height, r.width

    @property
    def step_index(self) -> int:
        """Index of the next AR step."""
        return self.rollout.step_index

    @property
    def closed(self) -> bool:
        """True once ``close()`` ran."""
        return self.rollout is None

    @property
    def finished(self) -> bool:
        """True when no further step can run (its ``total_blocks`` are done, or closed)."""
        if self.rollout is None:
            return True
        # endless streams (rolling cache) never end: RoPE frame positions are unbounded
        return self.total_blocks is not None and self.rollout.step_index >= self.total_blocks

    def set_prompt(self, prompt) -> None:
        """Switch to ``prompt`` (a string, or a list of one per video) at the next step.

        Raises:
            ValueError: not a non-empty string or a list of ``batch_size`` of them.
        """
        with self._locked():
            self._pending_prompts = self._prompts(prompt)

    def push_frames(self, frames, first: int | None = None) -> int:
        """Streamed conditioning frames for the recipe's control (OmniDreams: rendered HDMap
        frames, (T, H, W, 3) uint8 RGB) for video frames ``first``, ``first + 1``, ... of the
        stream (default: after the last pushed one). They condition the steps that cover those
        frames; frames nobody pushed come from the control's file or repeat the last one.

        Returns:
            ``first``.

        Raises:
            ValueError: the control takes no frames, or they are late, too far ahead or of
                another aspect ratio (the stream goes on).
            SessionClosed: the session was closed.
        """
        with self._locked():
            return self.rollout.control.push_frames(frames, first)

    @property
    def pending_frames(self) -> int:
        """Streamed frames pushed and not used yet (at most the control's ``frames_ahead()``)."""
        return 0 if self.rollout is None else self.rollout.control.pending_frames()

    @property
    def waiting_for_frames(self) -> bool:
        """True while the next step needs streamed frames first (a live HDMap stream without a
        file, before its first frame)."""
        return self.rollout is not None and self.rollout.control.waiting()

    def close(self) -> None:
        """Drop the rollout and the kept latents (the caller frees device memory after).

        Waits for a step running on another thread; closing twice is allowed.
        """
        with self._lock:
            self._blocks, self.last, self.rollout, self.postprocess = [], None, None, None

    @contextmanager
    def _locked(self):
        """Hold the session's lock; raises ``SessionClosed`` once the session is closed."""
        with self._lock:
            if self.rollout is None:
                raise SessionClosed("the session is closed; make a new Session")
            yield

    # ------------------------------------------------------------------ stepping
    @torch.no_grad()
    def step(self, control: dict[str, Any] | None = None) -> torch.Tensor | None:
        """Run one AR step and return its frames (B, T, 3, H, W) in [0, 1].

        Args:
            control: this step's control (validated; handed to the recipe's control encoder,
                which ignores what it does not use; recorded on ``self.last``).

        Raises:
            SessionEnded: the stream is finished.
            SessionClosed: the session was closed.
        """
        with self._locked():
            return self._step(control)

    def _step(self, control: dict[str, Any] | None) -> torch.Tensor | None:
        if self.finished:
            raise SessionEnded(f"the stream ended after {self.rollout.step_index} AR steps")
        if control is not None:
            control = validate_control(control)
        self.rollout.set_control(control)
        recache_ms = self._apply_prompt()
        out = self.rollout.step()
        self._remember(out)
        state = self.rollout.control_state()
        frames = out.frames if self.postprocess is None else self._postprocess(out.frames)
        self.last = SessionStep(out.step, frames, out, self.prompt_version, control, recache_ms,
                                state)  # fmt: skip
        return frames

    def _postprocess(self, frames: torch.Tensor | None) -> torch.Tensor | None:
        """The post-processed frames that became ready (at the last step: all that are left)."""
        parts = [self.postprocess.push(frames)]
        if self.finished:
            parts.append(self.postprocess.finish())
        parts = [p for p in parts if p is not None]
        return torch.cat(parts, dim=1) if parts else None

    def __iter__(self) -> Iterator[torch.Tensor | None]:
        while not self.finished:
            try:
                yield self.step()
            except SessionEnded:  # another thread ran the last step
                return

    def _remember(self, out: StepOutput) -> None:
        """Keep the clean latents of blocks whose frames are still in the KV cache."""
        r = self.rollout
        if r.cache is None or r.history is not None:
            return  # a model that re-runs its history before every block keeps no K/V to redo
        start, latents, offset = out.start_frame, out.latents, r.frame_offset
        if start < offset:  # an I2V prefix, committed on its own before block 0
            self._blocks.append((start, latents[:, :, : offset - start]))
            start, latents = offset, latents[:, :, offset - start :]
        self._blocks.append((start, latents))
        resident = self._resident_frames()
        self._blocks = [b for b in self._blocks if resident & set(block_frames(b))]

    def _resident_frames(self) -> set[int]:
        return resident_frames(self.rollout.cache, self._blocks)

    # ------------------------------------------------------------------ recache
    def _apply_prompt(self) -> float:
        prompts, self._pending_prompts = self._pending_prompts, None
        if prompts is None or prompts == self.rollout.prompts:
            return 0.0
        t0 = time.perf_counter()
        self.rollout.set_prompts(prompts)
        self.prompt_version += 1
        if self.rollout.step_index > 0 and self.rollout.cache is not None:
            self.recache()
        return (time.perf_counter() - t0) * 1000.0

    @torch.no_grad()
    def recache(self) -> None:
        """Rewrite the K/V of every frame in the cache under the current prompts."""
        replay(self.rollout, self._blocks, self._resident_frames(), self.rollout.context())
