"""DBCache (dual-block cache) and TaylorSeer: reuse the middle blocks' residual across steps.

Per forward of a denoising step (cache-dit's DBCache): the first ``front_blocks`` blocks always
run; the change of their residual (output - input) against the last step that computed the
middle blocks is measured as a relative L1 distance, ``mean|r - r_prev| / mean|r_prev|``. While
it stays under ``threshold`` (and the warm-up, the limits and the mask allow) the middle blocks
are skipped and the residual they added at that step is added instead; otherwise they run and
their residual is stored. The last ``back_blocks`` blocks always run. With
``taylorseer_order > 0`` the reused residual is extrapolated from the computed steps by a Taylor
expansion whose derivatives are finite differences over computed steps (TaylorSeer).

Each guidance branch (conditional / unconditional with two CFG forwards) and each expert keeps
its own state, so a branch is compared only with itself. The decision reads one device scalar
on the host per cached-eligible forward; under context parallelism that scalar is the ratio of
sums over every rank's tokens (one all-reduce each), so all ranks skip the same blocks.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from flashdreams import ConfigError
from flashdreams.step_cache.base import Segment, StepCache, Total


class TaylorSeer:
    """Order-``order`` Taylor extrapolation of a tensor sequence known at computed steps.

    ``update(y, step)`` sets the factors ``d[0] = y`` and ``d[i + 1] = (d[i] - d_prev[i]) / w``
    (``w``: steps since the previous update; ``d_prev`` the previous factors, as many orders as
    were available; as cache-dit's, an update at step 0 or 1 sets ``d[0]`` only);
    ``approximate(step) = sum_i d[i] * k**i / i!`` with ``k`` the steps since the last update.
    Exact for sequences linear in the step (order >= 1) once two updates from step 2 on exist.
    """

    def __init__(self, order: int) -> None:
        self.order = order
        self.factors: list[torch.Tensor] = []
        self.last_step: int | None = None

    def update(self, y: torch.Tensor, step: int) -> None:
        new = [y]
        if self.last_step is not None and step > 1:  # as cache-dit: none from steps 0 and 1
            window = step - self.last_step
            for i in range(min(self.order, len(self.factors))):
                new.append((new[i] - self.factors[i]) / window)
        self.factors, self.last_step = new, step

    def approximate(self, step: int) -> torch.Tensor:
        k = step - self.last_step
        out = self.factors[0]
        for i, d in enumerate(self.factors[1:], start=1):
            out = out + d * (k**i / math.factorial(i))
        return out


@dataclass
class _State:
    """What one (expert, branch) keeps between the steps of a block."""

    front: torch.Tensor | None = None  # the first blocks' residual at the last computed step
    middle: torch.Tensor | None = None  # the middle blocks' residual at the last computed step
    taylor: TaylorSeer | None = None
    seen: int = 0  # forwards of this state so far (warm-up counts them)
    cached: int = 0  # cached forwards in the block
    in_a_row: int = 0  # cached forwards since the last computed one
    records: list[dict] = field(default_factory=list)


def relative_l1(current: torch.Tensor, previous: torch.Tensor,
                total: Total | None = None) -> torch.Tensor:  # fmt: skip
    """``mean|current - previous| / mean|previous|`` in fp32 (a device scalar); with ``total``
    (context parallelism) the ratio of the two sums over every rank's tokens, equal up to
    rounding and the same on every rank."""
    prev = previous.float()
    if total is not None:
        return total((current.float() - prev).abs()) / total(prev.abs()).clamp_min(1e-12)
    return (current.float() - prev).abs().mean() / prev.abs().mean().clamp_min(1e-12)


class DBCache(StepCache):
    """Dual-block cache of the middle blocks' residual (see the module doc).

    Args:
        front_blocks: blocks computed every forward at the start (F >= 1: their residual
            drives the decision).
        back_blocks: blocks computed every forward at the end (B >= 0).
        threshold: relative L1 change of the first blocks' residual under which the middle
            blocks are reused (0: never reuse, the run equals ``step_cache=none`` exactly;
            >= 1: reuse whenever the warm-up, mask and limits allow, nothing measured).
        warmup_steps: the first forwards of each branch (and expert) always compute, whatever
            the mask says.
        max_cached_steps: cached forwards per branch and block at most (None: no limit).
        max_continuous_cached_steps: cached forwards in a row at most (None: no limit).
        mask: per denoising step, 1 = compute, 0 = may reuse (None: no mask); as long as the
            schedule.
        mask_policy: ``"static"``: after the warm-up the mask alone decides (0 always reuses,
            so with ``warmup_steps=0`` the run computes exactly the masked steps; its first
            entry must be 1); ``"dynamic"``: masked steps compute, the others follow the
            limits and the threshold.
        taylorseer_order: 0: reuse the residual as stored; k > 0: extrapolate it (TaylorSeer).
    """

    name = "dbcache"
    enabled = True

    def __init__(self, front_blocks: int = 8, back_blocks: int = 0, threshold: float = 0.08,
                 warmup_steps: int = 8, max_cached_steps: int | None = None,
                 max_continuous_cached_steps: int | None = None,
                 mask: Sequence[int] | None = None, mask_policy: str = "dynamic",
                 taylorseer_order: int = 0) -> None:  # fmt: skip
        if front_blocks < 1:
            raise ConfigError(f"step_cache.front_blocks={front_blocks} must be >= 1 (the first "
                              "blocks' residual decides when to reuse)")  # fmt: skip
        if back_blocks < 0:
            raise ConfigError(f"step_cache.back_blocks={back_blocks} must be >= 0")
        if threshold < 0:
            raise ConfigError(f"step_cache.threshold={threshold} must be >= 0")
        if warmup_steps < 0:
            raise ConfigError(f"step_cache.warmup_steps={warmup_steps} must be >= 0")
        for key, value in (("max_cached_steps", max_cached_steps),
                           ("max_continuous_cached_steps", max_continuous_cached_steps)):  # fmt: skip
            if value is not None and value < 1:
                raise ConfigError(f"step_cache.{key}={value} must be >= 1 (or null: no limit)")
        if mask_policy not in ("static", "dynamic"):
            raise ConfigError(f"step_cache.mask_policy={mask_policy!r} is not one of "
                              "['static', 'dynamic']")  # fmt: skip
        if mask is not None:
            mask = [int(m) for m in mask]
            if any(m not in (0, 1) for m in mask):
                raise ConfigError(f"step_cache.mask={mask} must hold only 0 and 1")
            if mask_policy == "static" and (not mask or mask[0] != 1):
                raise ConfigError(f"step_cache.mask={mask} must start with 1 under "
                                  "mask_policy=static (nothing is cached before step 0)")  # fmt: skip
        if taylorseer_order < 0:
            raise ConfigError(f"step_cache.taylorseer_order={taylorseer_order} must be >= 0")
        self.front, self.back, self.threshold = int(front_blocks), int(back_blocks), threshold
        self.warmup_steps = int(warmup_steps)
        self.max_cached, self.max_in_a_row = max_cached_steps, max_continuous_cached_steps
        self.mask, self.mask_policy = mask, mask_policy
        self.taylorseer_order = int(taylorseer_order)
        self.middle_passes = 0  # middle-block passes computed since construction (tests, stats)
        self._states: dict[tuple[int, int], _State] = {}
        self._active: tuple[int, tuple[int, int]] | None = None

    # ------------------------------------------------------------------ build-time check
    def check(self, *, num_layers: int, num_steps: int, kv_cache: bool, graph_captures: bool,
              world_size: int) -> None:  # fmt: skip
        if self.front + self.back >= num_layers:
            raise ConfigError(f"step_cache.front_blocks={self.front} + back_blocks={self.back} "
                              f"leave no middle block of model.num_layers={num_layers}")  # fmt: skip
        if kv_cache:
            raise ConfigError(f"step_cache={self.name} needs a bidirectional many-step recipe "
                              "(cache=none): a streaming block's few steps leave nothing to "
                              "reuse and skipped blocks would not write their K/V")  # fmt: skip
        if graph_captures:
            raise ConfigError(f"step_cache={self.name} decides on the host inside a forward, "
                              "which a whole-forward CUDA graph cannot replay: use graph=eager "
                              "or graph=compile")  # fmt: skip
        if self.mask is not None and len(self.mask) != num_steps:
            raise ConfigError(f"step_cache.mask has {len(self.mask)} entries, the schedule "
                              f"scheduler.num_steps={num_steps}")  # fmt: skip
        if self.mask is None and self.warmup_steps >= num_steps:
            raise ConfigError(f"step_cache.warmup_steps={self.warmup_steps} leaves no step of "
                              f"scheduler.num_steps={num_steps} to reuse")  # fmt: skip

    # ------------------------------------------------------------------ per block / step
    def begin_block(self, num_steps: int) -> None:
        self._states.clear()
        self._active = None

    @contextlib.contextmanager
    def step(self, index: int, branch: int = 0, expert: int = 0) -> Iterator[None]:
        self._active = (int(index), (int(expert), int(branch)))
        try:
            yield
        finally:
            self._active = None

    def records(self) -> list[dict]:
        out = [r for s in self._states.values() for r in s.records]
        return sorted(out, key=lambda r: (r["step"], r["expert"], r["branch"]))

    # ------------------------------------------------------------------ a forward
    def run(self, tokens: torch.Tensor, segment: Segment, num_layers: int,
            total: Total | None = None) -> torch.Tensor:  # fmt: skip
        if self._active is None:  # a commit, a pre-capture, a replay: every block
            return segment(tokens, 0, num_layers)
        index, key = self._active
        state = self._states.get(key)
        if state is None:
            state = self._states[key] = _State()
        stop = num_layers - self.back
        x = segment(tokens, 0, self.front)
        front = x - tokens
        reuse, diff = self._decide(state, index, front, total)
        state.seen += 1
        if reuse:
            state.cached += 1
            state.in_a_row += 1
            middle = state.middle if state.taylor is None else state.taylor.approximate(index)
            x = x + middle.to(x.dtype)
        else:
            state.in_a_row = 0
            mid_in = x
            x = segment(x, self.front, stop)
            self.middle_passes += 1
            state.front, state.middle = front, x - mid_in
            if self.taylorseer_order:
                if state.taylor is None:
                    state.taylor = TaylorSeer(self.taylorseer_order)
                state.taylor.update(state.middle, index)
        expert, branch = key
        state.records.append({"step": index, "branch": branch, "expert": expert,
                              "computed": not reuse, "diff": diff})  # fmt: skip
        return segment(x, stop, num_layers) if self.back else x

    def _decide(self, state: _State, index: int, front: torch.Tensor,
                total: Total | None) -> tuple[bool, float | None]:  # fmt: skip
        """(reuse the middle residual, the residual diff when it was measured), checked in
        cache-dit's order: warm-up, mask, limits, threshold (0: never; >= 1: always)."""
        if state.middle is None or state.seen < self.warmup_steps:
            return False, None  # nothing stored yet / warm-up
        forced = self.mask[index] if self.mask is not None and index < len(self.mask) else None
        if forced == 1:
            return False, None
        if forced == 0 and self.mask_policy == "static":
            return True, None
        if self.max_cached is not None and state.cached >= self.max_cached:
            return False, None
        if self.max_in_a_row is not None and state.in_a_row >= self.max_in_a_row:
            return False, None
        if self.threshold <= 0.0 or self.threshold >= 1.0:
            return self.threshold >= 1.0, None
        diff = float(relative_l1(front, state.front, total))
        return diff < self.threshold, diff
