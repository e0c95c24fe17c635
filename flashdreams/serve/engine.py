"""The server's generation engine: model weights loaded once, sessions that share them.

All device work (building a session's buffers, AR steps, freeing) runs on one worker thread,
so the steps of concurrent sessions interleave (round-robin, in arrival order) and never race
on the shared model. ``max_sessions`` bounds how many sessions hold device memory at once.
"""

from __future__ import annotations

import gc
import logging
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

import torch
from omegaconf import DictConfig

from flashdreams.build import SharedParts, assemble_rollout, build_shared
from flashdreams.rollout import Rollout
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
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="flashdreams-device")
        self._lock = threading.Lock()
        self._active = 0
        self._live: weakref.WeakSet[Session] = weakref.WeakSet()
        self.images = None
        if cfg.get("image"):
            from flashdreams.io.image import load_image

            self.images = [load_image(cfg.image)] * int(cfg.rollout.batch_size)
        self.executor.submit(self._warm_up).result()
        self.baseline_bytes = self.memory_bytes()

    # ------------------------------------------------------------------ slots
    def try_acquire(self) -> bool:
        """Reserve a session slot; False when ``max_sessions`` are in use."""
        with self._lock:
            if self._active >= self.max_sessions:
                return False
            self._active += 1
            return True

    def release(self) -> None:
        """Give a slot back."""
        with self._lock:
            self._active = max(0, self._active - 1)

    @property
    def active(self) -> int:
        """Sessions holding a slot."""
        return self._active

    # ------------------------------------------------------------------ on the worker thread
    def new_session(self, prompt: str, seed: int, total_blocks) -> Session:
        """Build a session (device buffers allocated here)."""
        rollout = spawn_rollout(self.shared, self.cfg, total_blocks)
        session = Session(rollout=rollout, prompt=prompt, seed=seed, total_blocks=total_blocks,
                          images=self.images)  # fmt: skip
        self._live.add(session)
        return session

    def _warm_up(self) -> None:
        """Run one step of a throw-away session on the device thread.

        This checks the recipe at startup and makes the one-time allocations (cuBLAS
        workspaces: 32 MiB per thread and stream on Hopper) before the memory baseline is read.
        """
        session = self.new_session(self.cfg.prompt, self.cfg.seed, 1)
        session.step()
        self.free(session)

    def free(self, session: Session) -> None:
        """Drop a session's buffers and return its device memory to the allocator's pool."""
        session.close()
        del session
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ status
    def memory_bytes(self) -> int | None:
        """Device memory allocated by torch (CUDA), else None."""
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return None

    def status(self) -> dict:
        """Counters for ``/status``: slots, live session objects, device memory."""
        gc.collect()
        return {
            "active_sessions": self._active,
            "max_sessions": self.max_sessions,
            "live_sessions": len(self._live),
            "memory_bytes": self.memory_bytes(),
            "baseline_memory_bytes": self.baseline_bytes,
            "device": str(self.device),
        }

    def shutdown(self) -> None:
        """Stop the worker thread (after the running step)."""
        self.executor.shutdown(wait=True, cancel_futures=True)
