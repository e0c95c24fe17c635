"""``quality=true``: measure a run against a ``precision=bf16`` reference of the same config.

The reference is built from the same config with ``precision=bf16`` (no FP8 GEMMs, no FP8 KV
cache), bf16 attention (``attention=cudnn_fp8`` becomes its SDPA fallback) and
``offload=none``, so it has the same seeded weights, the same prompt embeddings and the same
noise draws (one generator seeded alike, drawn in the same order). After each AR step
of the run, the reference runs the same step and we compare:

* ``dit_cosine``: cosine similarity of each denoising step's DiT output (the flow the scheduler
  receives, after guidance) with the reference's, one value per denoising step;
* ``latent_cosine``: cosine of the block's clean latents;
* ``psnr_db``: PSNR of the decoded frames (in [0, 1]) against the reference's frames; capped at
  ``PSNR_CAP_DB`` (identical frames), ``None`` without a decoder.

With ``quality_mode=free`` both trajectories run free (the run is not re-fed the reference's
latents), so later steps include the drift accumulated through the KV cache: the numbers are end
to end. With ``quality_mode=forced`` the reference is teacher-forced onto the run: its scheduler
still steps (the noise draws stay aligned) but hands on the run's latents, so every reference
DiT call sees the run's input and the reference commits the run's clean latents into its own
(bf16) KV cache. ``dit_cosine`` then measures each call's own error against bf16 given the
same inputs and latent history; ``latent_cosine`` and ``psnr_db`` are not reported (the
latents are the run's by construction).

The reference doubles the model's memory; it is a quality check, not a benchmark setting
(the run's stage times are unaffected: the reference runs between the run's steps).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from omegaconf import DictConfig, open_dict

from flashdreams import ConfigError

PSNR_CAP_DB = 100.0  # reported for identical frames (MSE 0)
REFERENCE_PRECISION = {"_target_": "flashdreams.precision.base.Precision", "kv_cache": None}


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two tensors over all their elements, in float64."""
    a, b = a.detach().flatten().double(), b.detach().flatten().double()
    denom = math.sqrt(float(a.dot(a)) * float(b.dot(b)))
    if denom == 0.0:
        return 1.0 if torch.equal(a, b) else 0.0
    return max(-1.0, min(1.0, float(a.dot(b)) / denom))


def psnr_db(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR (dB) of frames in [0, 1] (clamped), capped at ``PSNR_CAP_DB``."""
    mse = float((a.double().clamp(0, 1) - b.double().clamp(0, 1)).pow(2).mean())
    return PSNR_CAP_DB if mse <= 10 ** (-PSNR_CAP_DB / 10) else -10.0 * math.log10(mse)


FP8_ATTENTION = "flashdreams.attention.cudnn_fp8.CudnnFp8Attention"
MODES = ("free", "forced")  # quality_mode


def check_mode(mode: str) -> str:
    """``mode`` if it is a ``quality_mode``, else a one-line ConfigError."""
    if mode not in MODES:
        raise ConfigError(f"quality_mode={mode!r} is not {' | '.join(MODES)}")
    return mode


def reference_config(cfg: DictConfig) -> DictConfig:
    """``cfg`` with ``precision=bf16`` (and its KV cache in the run's dtype), no offload, no
    step cache, and FP8 attention replaced by the bf16 SDPA kernel it falls back to."""
    ref = copy.deepcopy(cfg)
    with open_dict(ref):
        attention = ref.get("attention")
        if attention is not None and attention.get("_target_") == FP8_ATTENTION:
            ref.attention = {"_target_": "flashdreams.attention.sdpa.SdpaAttention",
                             "backend": attention.get("fallback", "cudnn")}  # fmt: skip
        ref.precision = dict(REFERENCE_PRECISION)
        ref.offload = "none"
        ref.quality = False
        ref.step_cache = None  # a step-cached run is measured against the uncached one
    return ref


class _RecordingScheduler:
    """A scheduler that keeps a copy of each flow (DiT output) it is given; else delegates.

    ``keep_outputs``: also keep each step's result (the run's latents, for a forced reference).
    ``forced``: a list the reference's steps take their results from (teacher forcing); the
    inner step still runs so that its noise draws stay in the run's order.
    """

    def __init__(self, inner, keep_outputs: bool = False) -> None:
        self.inner = inner
        self.flows: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] | None = [] if keep_outputs else None
        self.forced: list[torch.Tensor] | None = None

    def step(self, flow: torch.Tensor, x: torch.Tensor, j: int, noise) -> torch.Tensor:
        self.flows.append(flow.detach().float().clone())  # a captured graph reuses its output
        out = self.inner.step(flow, x, j, noise)
        if self.outputs is not None:
            self.outputs.append(out.detach().clone())
        if self.forced is not None:
            out = self.forced.pop(0).to(out.dtype)
        return out

    def take(self) -> list[torch.Tensor]:
        flows, self.flows = self.flows, []
        return flows

    def take_outputs(self) -> list[torch.Tensor]:
        outputs, self.outputs = self.outputs, []
        return outputs

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class QualityReport:
    """Runs ``reference`` in lockstep with ``rollout`` and collects per-step metrics.

    Args:
        rollout: the run's rollout (any precision / offload).
        reference: a rollout of :func:`reference_config` of the same config.
        mode: ``free`` or ``forced`` (see the module docstring).
    """

    def __init__(self, rollout, reference, mode: str = "free") -> None:
        self.rollout, self.reference, self.mode = rollout, reference, check_mode(mode)
        forced = mode == "forced"
        rollout.scheduler = _RecordingScheduler(rollout.scheduler, keep_outputs=forced)
        reference.scheduler = _RecordingScheduler(reference.scheduler)
        self.steps: list[dict[str, Any]] = []
        self.last_reference = None  # the reference's StepOutput of the last compared step

    def compare(self, out, clip: int = 0) -> dict[str, Any]:
        """Run the reference's step matching the run's step ``out`` and compare them."""
        flows = self.rollout.scheduler.take()
        forced = self.mode == "forced"
        if forced:
            self.reference.scheduler.forced = self.rollout.scheduler.take_outputs()
        if out.step == 0:
            r = self.rollout
            self.reference.start(list(r.prompts), seed=r.seed, images=r.images)
            self.reference.precapture()
        ref = self.last_reference = self.reference.step()
        ref_flows = self.reference.scheduler.take()
        dit = [cosine(a, b) for a, b in zip(flows, ref_flows, strict=True)]
        row = {
            "clip": clip,
            "step": out.step,
            "dit_cosine": dit,
            "min_dit_cosine": min(dit) if dit else None,
            "latent_cosine": None if forced else cosine(out.latents, ref.latents),
            "psnr_db": None if forced or out.frames is None else psnr_db(out.frames, ref.frames),
        }
        self.steps.append(row)
        return row

    def summary(self) -> dict[str, Any]:
        """Worst values over all steps (``quality_*`` keys of the stats summary)."""

        def worst(key: str) -> float | None:
            values = [s[key] for s in self.steps if s[key] is not None]
            return min(values) if values else None

        return {
            "quality_reference": "precision=bf16"
            + (" step_cache=none" if self.rollout.model.step_cache.enabled else "")
            + (" (teacher-forced)" if self.mode == "forced" else ""),
            "quality_min_cosine": worst("min_dit_cosine"),
            "quality_min_latent_cosine": worst("latent_cosine"),
            "quality_min_psnr_db": worst("psnr_db"),
        }


def build_quality(cfg: DictConfig, rollout) -> QualityReport:
    """The reference rollout of ``cfg`` wired to ``rollout``."""
    from flashdreams.build import build_rollout

    mode = check_mode(cfg.get("quality_mode", "free"))  # before building the reference
    if rollout.parallel.world_size > 1:
        raise ConfigError("quality=true needs parallel=single (the reference is a second "
                          "model in the same process)")  # fmt: skip
    return QualityReport(rollout, build_rollout(reference_config(cfg)), mode)
