"""A recipe run on another run's frames as they come (``postprocess=flashvsr_v1_1_tiny``).

``flashdreams-run recipe=self_forcing_wan21_t2v_1_3b_taehv postprocess=flashvsr_v1_1_tiny``
generates a stream and upscales every AR step's frames as they arrive: the post-processing
recipe is composed like a run of its own (``postprocess.recipe`` + ``postprocess.overrides``),
its control set to take pushed frames (``control.stream=true``, sized from the source run) and
its rollout built on ``postprocess.device`` (the run's, or a second GPU). After each source
step the frames go to the control (quantized to uint8, as a video file holds them) and the
post-processing rollout runs every block whose input frames have all arrived; when a finite
source ends, the stream is padded (the release's 4 copies of the last frame) and the blocks
left run. So the chained output equals upscaling a lossless file of the generated frames
(``tests/unit/test_flashvsr_chain.py``).

Its rollout is endless (its cache rolls): it stops when the frames stop.
"""

from __future__ import annotations

import logging

import torch
from omegaconf import DictConfig

from flashdreams import ConfigError
from flashdreams.rollout import Rollout, StepOutput

log = logging.getLogger(__name__)


def compose_run(overrides: list[str]) -> DictConfig:
    """The ``run`` config of ``overrides`` (inside a running Hydra app, or on its own)."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return compose("run", overrides=overrides)
    with initialize_config_module("flashdreams.conf", version_base="1.3"):
        return compose("run", overrides=overrides)


class Postprocess:
    """A streaming rollout fed another rollout's frames (its control must take pushed frames:
    ``push_frames``, ``end_stream``, ``available``, ``frames_needed``).

    Args:
        rollout: the post-processing rollout (endless: ``total_blocks`` None).
        cfg: its composed config.
    """

    def __init__(self, rollout: Rollout, cfg: DictConfig) -> None:
        control = rollout.control
        for method in ("push_frames", "end_stream", "frames_needed"):
            if not callable(getattr(type(control), method, None)):
                raise ConfigError(f"postprocess.recipe={cfg.run_name}: its control "
                                  f"({type(control).__name__}) does not take streamed frames")  # fmt: skip
        self.rollout, self.cfg, self.control = rollout, cfg, control
        self.timers: list = []  # every step's StepTimer (resolved by the caller)

    def start(self) -> None:
        """Begin a new stream (a new clip of the source)."""
        self.rollout.start([self.cfg.prompt] * self.rollout.batch_size)
        self.rollout.precapture()

    def _block_end(self) -> int:
        """Latent frame where the next block ends (the loop's frame plan)."""
        return self.rollout._start_frame(self.rollout.step_index + 1)

    def _run_ready(self) -> list[StepOutput]:
        outs = []
        while self.control.available >= self.control.frames_needed(self._block_end()):
            out = self.rollout.step()
            self.timers.append(out.timer)
            outs.append(out)
        return outs

    @torch.no_grad()
    def push(self, frames: torch.Tensor | None) -> torch.Tensor | None:
        """Feed a source step's frames (B, T, 3, H, W) in [0, 1]; returns the frames of every
        block that became ready (B, T', 3, H', W'), or None when none did."""
        if frames is not None:
            self.control.push_frames(frames)
        return self._frames(self._run_ready())

    @torch.no_grad()
    def finish(self) -> torch.Tensor | None:
        """The source ended: pad the stream and run the blocks left; their frames, or None."""
        self.control.end_stream()
        frames = [self._frames(self._run_ready()), self.rollout.flush()]  # + a pipelined decode
        frames = [f for f in frames if f is not None]
        return torch.cat(frames, dim=1) if frames else None

    def take_rows(self) -> list[dict]:
        """Stage times of the steps run since the last call (waits for the device)."""
        if self.rollout.device.type == "cuda":
            torch.cuda.synchronize(self.rollout.device)
        rows = [t.resolve() for t in self.timers]
        self.timers.clear()
        return rows

    @staticmethod
    def _frames(outs: list[StepOutput]) -> torch.Tensor | None:
        frames = [o.frames for o in outs if o.frames is not None and o.frames.shape[1]]
        return torch.cat(frames, dim=1) if frames else None


def chained(cfg: DictConfig) -> str | None:
    """The post-processing recipe ``cfg`` chains after its stream, or None (``postprocess=none``)."""
    pp = cfg.get("postprocess")
    return None if pp is None or not pp.get("recipe") else str(pp.recipe)


def postprocess_config(cfg: DictConfig, height: int, width: int, batch_size: int,
                       device) -> DictConfig | None:  # fmt: skip
    """The composed run config of ``cfg``'s post-processing recipe fed a ``height`` x ``width``
    stream of ``batch_size`` videos (its device: ``postprocess.device``, else ``device``), or
    None (``postprocess=none``)."""
    if chained(cfg) is None:
        return None
    pp = cfg.postprocess
    from flashdreams.config.options import scope_options
    from flashdreams.config.validate import check_run_config

    overrides = [f"recipe={pp.recipe}", *[str(o) for o in pp.get("overrides") or []],
                 "control.stream=true", f"control.stream_size=[{height},{width}]",
                 f"device={pp.get('device') or device}", f"dtype={cfg.dtype}",
                 f"rollout.batch_size={batch_size}", f"seed={cfg.seed}",
                 f"vsr.resize={pp.get('resize', 'torch')}", "rollout.total_blocks=null"]  # fmt: skip
    try:
        sub = compose_run(overrides)
    except Exception as err:  # noqa: BLE001  (Hydra's composition errors, one line)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"postprocess={pp.recipe}: {first}") from None
    scope_options(sub)
    check_run_config(sub)
    return sub


def _checked(rollout: Rollout, sub: DictConfig, recipe: str) -> Postprocess:
    if rollout.cache is not None and not rollout.cache.rolls:
        raise ConfigError(f"postprocess={recipe}: its cache must roll (an endless stream)")
    return Postprocess(rollout, sub)


def build_postprocess(cfg: DictConfig, source: Rollout) -> Postprocess | None:
    """The ``postprocess`` of ``cfg`` fed by ``source``, or None (``postprocess=none``)."""
    from flashdreams.build import build_rollout

    sub = postprocess_config(cfg, source.height, source.width, source.batch_size, source.device)
    if sub is None:
        return None
    post = _checked(build_rollout(sub), sub, cfg.postprocess.recipe)
    r = post.rollout
    log.info("postprocess %s: %dx%d on %s", cfg.postprocess.recipe, r.height, r.width, r.device)
    return post


class PostprocessFactory:
    """The post-processing recipe's weights, loaded once, and a ``Postprocess`` around them for
    every stream (a server's sessions: each its own rollout, cache and decoder state).

    Args:
        cfg: the source run's config (``postprocess`` set).
        height, width, batch_size, device: the source stream's frames and device.
    """

    def __init__(self, cfg: DictConfig, height: int, width: int, batch_size: int,
                 device) -> None:  # fmt: skip
        from flashdreams.build import build_shared

        self.cfg = postprocess_config(cfg, height, width, batch_size, device)
        if self.cfg is None:
            raise ValueError("PostprocessFactory needs a config with postprocess set")
        self.recipe = chained(cfg)
        self.shared = build_shared(self.cfg)
        self.frame_size: tuple[int, int] | None = None  # (H, W) of its frames, once built

    def __call__(self) -> Postprocess:
        from flashdreams.build import assemble_rollout

        post = _checked(assemble_rollout(self.cfg, self.shared), self.cfg, self.recipe)
        self.frame_size = (post.rollout.height, post.rollout.width)
        return post
