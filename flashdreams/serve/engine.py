"""The server's generation engine: model weights loaded once, sessions that share them.

All device work (building a session's buffers, AR steps, freeing) runs on one worker thread,
so the steps of concurrent sessions interleave (round-robin, in arrival order) and never race
on the shared model. ``max_sessions`` bounds how many sessions hold device memory at once, and
``serve.max_session_bytes`` how much one may take: a session's size is computed from the
warm-up session before anything is allocated, so a client cannot stall the device thread
with a huge allocation.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

import torch
from omegaconf import DictConfig

from flashdreams import ConfigError
from flashdreams.build import SharedParts, assemble_rollout, build_shared
from flashdreams.postprocess import PostprocessFactory, chained
from flashdreams.rollout import Rollout
from flashdreams.serve.protocol import ProtocolError
from flashdreams.session import Session

log = logging.getLogger(__name__)


def spawn_rollout(shared: SharedParts, cfg: DictConfig, total_blocks: int | None = None) -> Rollout:
    """A rollout that shares the loaded model weights, text and image encoders.

    It owns its KV cache (sized for ``total_blocks`` when the cache is a full one), decoder
    state, scheduler, conditioner, control and graph-policy state. The model was already
    prepared (compiled) by the first policy, so ``prepare`` does not run again.
    """
    return assemble_rollout(cfg, shared, total_blocks=total_blocks)


class Engine:
    """Loads the recipe once and hands out sessions up to ``max_sessions``.

    Args:
        cfg: the composed serve config (run config + ``serve`` block).
    """

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.max_sessions = int(cfg.serve.max_sessions)
        self.shared = build_shared(cfg)  # weights and encoders; every session owns the rest
        self.device = self.shared.device
        self.post = None  # postprocess=...: its weights once, a Postprocess per session
        if chained(cfg) is not None:
            r = cfg.rollout
            self.post = PostprocessFactory(cfg, int(r.height), int(r.width), int(r.batch_size),
                                           self.device)  # fmt: skip
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="flashdreams-device")
        self._lock = threading.Lock()
        self._active = 0
        self._live: weakref.WeakSet[Session] = weakref.WeakSet()
        self.images = None
        if cfg.get("image"):
            from flashdreams.io.image import load_image

            self.images = [load_image(cfg.image)] * int(cfg.rollout.batch_size)
        self.session_fixed_bytes, self.frame_bytes, self.cache_rolls = 0, 0.0, False
        self.executor.submit(self._warm_up).result()
        self.baseline_bytes = self.memory_bytes()
        self.max_session_bytes = self._session_limit()

    # ------------------------------------------------------------------ slots
    def try_acquire(self) -> bool:
        """Reserve a session slot; False when ``max_sessions`` are in use."""
        with self._lock:
            if self._active >= self.max_sessions:
                return False
            self._active += 1
            return True

    def release(self) -> None:
        """Give a slot back; the last one out has the spare rebuilt if it was used up."""
        with self._lock:
            self._active = max(0, self._active - 1)
            idle = self._active == 0
        if idle and self._spare is None:
            self.executor.submit(self._refill_if_idle)

    @property
    def frame_size(self) -> tuple[int, int]:
        """(height, width) of the frames a stream delivers (upscaled when a postprocess is
        chained: known once the warm-up built one)."""
        if self.post is not None and self.post.frame_size is not None:
            return self.post.frame_size
        return int(self.cfg.rollout.height), int(self.cfg.rollout.width)

    @property
    def active(self) -> int:
        """Sessions holding a slot."""
        return self._active

    # ------------------------------------------------------------------ on the worker thread
    def new_session(self, prompt: str, seed: int, total_blocks) -> Session:
        """A session: the warm spare when it fits, else built (device buffers allocated here)."""
        spare = self._take_spare(prompt, seed, total_blocks)
        if spare is not None:
            return spare
        rollout = spawn_rollout(self.shared, self.cfg, total_blocks)
        session = Session(rollout=rollout, prompt=prompt, seed=seed, total_blocks=total_blocks,
                          images=self.images, postprocess=self.post and self.post())  # fmt: skip
        self._live.add(session)
        return session

    def _warm_up(self) -> None:
        """Run one step of a throw-away session on the device thread.

        This checks the recipe at startup and makes the one-time allocations (cuBLAS
        workspaces: 32 MiB per thread and stream on Hopper) before the memory baseline is read.
        """
        before = self.memory_bytes()
        session = self.new_session(self.cfg.prompt, self.cfg.seed, 1)
        session.step()
        self._measure(session, before)
        self.free(session)
        self._build_spare()

    def free(self, session: Session) -> None:
        """Drop a session's buffers and return its device memory to the allocator's pool."""
        session.close()
        del session
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ the warm spare
    # One idle session, built for the default stream (``serve.total_blocks``) at startup and
    # kept when a stream of that length ends: a ``start`` that fits it only resets it (its
    # buffers, decoder and graph captures stay warm), so the first frame is one step away.
    # It holds a slot's memory; a start that does not fit frees it before building its own,
    # so the sessions alive never exceed ``max_sessions``.
    _spare: Session | None = None

    def _build_spare(self) -> None:
        try:
            self._spare = self.new_session(self.cfg.prompt, self.cfg.seed,
                                           self.cfg.serve.total_blocks)  # fmt: skip
        except ConfigError:  # e.g. an endless default on a full cache: no spare
            self._spare = None

    def _take_spare(self, prompt: str, seed: int, total_blocks) -> Session | None:
        spare, self._spare = self._spare, None
        if spare is None:
            return None
        if spare.total_blocks != total_blocks:
            self.free(spare)  # its memory goes to the session built instead
            return None
        try:
            spare.reset(seed=seed, prompt=prompt)
        except BaseException:
            self.free(spare)
            raise
        return spare

    def _refill_if_idle(self) -> None:
        """Rebuild the spare while no stream runs (device thread): nothing waits on it."""
        if self._spare is not None or self._active:
            return
        try:
            self._build_spare()
        except Exception:  # noqa: BLE001  (e.g. out of memory: the server runs without)
            log.exception("could not rebuild the spare session")

    def end_session(self, session: Session) -> None:
        """A stream ended: keep its session as the spare when it fits the default stream and
        there is none, else free it (device thread)."""
        default = self.cfg.serve.total_blocks
        if self._spare is None and not session.closed and session.total_blocks == default:
            self._spare = session
            return
        self.free(session)

    # ------------------------------------------------------------------ session size
    def _measure(self, session: Session, before: int | None) -> None:
        """Size model of a session, from the one-block warm-up session (device thread).

        Bytes = fixed + bytes per cached latent frame x the frames a session's cache holds: a
        full cache every frame of the stream, a rolling one at most its window (and sink). On
        CUDA the fixed part is what the session took besides its cache (decoder state, a
        step's workspace); elsewhere 0.
        """
        r = session.rollout
        cache = r.cache
        frames = cache.capacity_frames if cache is not None else 0
        cache_bytes = tensor_bytes(cache)
        self.frame_bytes = cache_bytes / frames if frames else 0.0
        self.cache_rolls = bool(cache is not None and cache.rolls)
        self.cache_sizer = cache.sizer() if cache is not None else None  # holds no buffers
        self.prefix_frames = int(getattr(r, "frame_offset", 0))  # an I2V image frame
        self.schedule = r.schedule  # latent frames of each block
        after = self.memory_bytes()
        used = cache_bytes if before is None or after is None else max(after - before, cache_bytes)
        if self.device.type == "cuda":
            used = max(used, torch.cuda.max_memory_allocated(self.device) - (before or 0))
        self.session_fixed_bytes = max(0, used - cache_bytes)

    def cache_frames(self, total_blocks: int | None) -> int:
        """Latent frames the KV cache of a session of ``total_blocks`` (None: endless) holds."""
        if not self.frame_bytes:
            return 0
        frames = (
            None if total_blocks is None else self.prefix_frames + self.schedule.total(total_blocks)
        )
        if self.cache_rolls:  # the policy's own capacity (a window, a reconstituted context)
            return self.cache_sizer.capacity_for(frames)
        return frames or 0  # a full cache cannot stream endlessly (the session refuses)

    def session_bytes(self, total_blocks: int | None) -> int:
        """Estimated memory of a session of ``total_blocks`` (None: endless) before building it."""
        return int(self.session_fixed_bytes + self.frame_bytes * self.cache_frames(total_blocks))

    def _session_limit(self) -> int:
        """``serve.max_session_bytes``, or what free memory allows each of ``max_sessions``."""
        limit = self.cfg.serve.get("max_session_bytes")
        if limit is not None:
            return int(limit)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(
                self.device
            )
        else:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return int(0.9 * free / self.max_sessions)

    def check_session_size(self, total_blocks: int | None) -> None:
        """Refuse (``too_large``) a session over ``max_session_bytes``; nothing is allocated."""
        need = self.session_bytes(total_blocks)
        if need > self.max_session_bytes:
            raise ProtocolError(
                "too_large", f"start: total_blocks={total_blocks} needs about {need / 2**20:.0f} "
                f"MiB, over serve.max_session_bytes={self.max_session_bytes} "
                f"({self.max_session_bytes / 2**20:.0f} MiB); ask for fewer blocks",
            )  # fmt: skip

    # ------------------------------------------------------------------ status
    def memory_bytes(self) -> int | None:
        """Device memory allocated by torch (CUDA), else None."""
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return None

    def status(self, collect: bool = True) -> dict:
        """Counters for ``/status``: slots, live session objects (after a garbage collection
        unless ``collect`` is false), device memory."""
        if collect:
            gc.collect()
        return {
            "active_sessions": self._active,
            "max_sessions": self.max_sessions,
            "live_sessions": len(self._live) - (self._spare is not None),  # streams' sessions
            "spare_sessions": int(self._spare is not None),
            "memory_bytes": self.memory_bytes(),
            "baseline_memory_bytes": self.baseline_bytes,
            "max_session_bytes": self.max_session_bytes,
            "device": str(self.device),
        }

    def shutdown(self) -> None:
        """Stop the worker thread (after the running step)."""
        self.executor.shutdown(wait=True, cancel_futures=True)


def tensor_bytes(obj, _seen: set | None = None) -> int:
    """Bytes of the distinct tensors reachable from ``obj`` (attributes, lists, dicts)."""
    seen = set() if _seen is None else _seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        if obj.device.type == "meta":
            return 0
        storage = obj.untyped_storage()
        key = ("storage", obj.device, storage.data_ptr())  # views share their storage
        if key in seen:
            return 0
        seen.add(key)
        return storage.nbytes()
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(x, seen) for x in obj)
    if isinstance(obj, dict):
        return sum(tensor_bytes(x, seen) for x in obj.values())
    if hasattr(obj, "__dict__") and not isinstance(obj, (type, torch.nn.Module)):
        return sum(tensor_bytes(x, seen) for x in vars(obj).values())
    return 0
