"""Assemble the parts named by a composed config into a ready ``Rollout``.

Shared by ``flashdreams-run``, the benchmark harness and the streaming server.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from flashdreams import ConfigError
from flashdreams.rollout import NoiseFn, Rollout

log = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but CUDA is not available; use device=cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"device={name!r} is not a torch device (auto | cpu | cuda:N)") from err


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` is bfloat16 on CUDA and float32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ConfigError(f"dtype={name!r} is not one of {['auto', *_DTYPES]}")
    return _DTYPES[name]


def build_model(model_cfg: DictConfig, device: torch.device, dtype: torch.dtype, seed: int,
                draw_on: torch.device | None = None):  # fmt: skip
    """Construct the DiT on the meta device and fill it (checkpoint or seeded random weights).

    ``draw_on``: the compute device when ``device`` is the CPU for offloading; random weights are
    drawn there (the same weights as a resident run) when they fit (see ``materialize``).
    """
    from flashdreams.io.checkpoint import materialize

    spec = OmegaConf.to_container(model_cfg, resolve=True)
    checkpoint = spec.pop("checkpoint", None)
    low_noise_checkpoint = spec.pop("low_noise_checkpoint", None)  # two-expert models only
    with torch.device("meta"):
        model = instantiate(spec)
    if checkpoint is None:
        log.warning(
            "model.checkpoint=null: RANDOM WEIGHTS (seed %d). The output demonstrates the "
            "pipeline, not a trained model.", seed,
        )  # fmt: skip
    if hasattr(model, "experts"):  # Wan 2.2 A14B: one checkpoint per expert
        from flashdreams.io.experts import materialize_experts

        model = materialize_experts(model, checkpoint, low_noise_checkpoint, device, dtype, seed)
    else:
        model = materialize(model, checkpoint, device=device, dtype=dtype, seed=seed,
                            draw_on=draw_on)  # fmt: skip
    return model.eval().requires_grad_(False)


def read_prompts(cfg: DictConfig) -> list[str]:
    """The run's prompts: one per line of ``prompt_file``, else ``prompt``."""
    if cfg.prompt_file:
        path = Path(cfg.prompt_file)
        if not path.is_file():
            raise ConfigError(f"prompt_file={cfg.prompt_file!r} does not exist")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise ConfigError(f"prompt_file={cfg.prompt_file!r} holds no prompt")
        return prompts
    return [cfg.prompt]


def build_conditioning(cfg: DictConfig, device: torch.device) -> tuple:
    """Guidance, image encoder and conditioner of ``cfg``, checked against the model config.

    Runs before the DiT is built, so a missing ``image=`` fails before minutes of loading.
    """
    guidance, image_encoder = instantiate(cfg.guidance), instantiate(cfg.image_encoder)
    conditioner = instantiate(cfg.conditioner).to(device)
    m = cfg.model
    if m.image_dim != image_encoder.image_dim:
        raise ConfigError(
            f"model.image_dim={m.image_dim} but the image encoder gives tokens of width "
            f"{image_encoder.image_dim}: I2V models need image_encoder=clip, others none"
        )
    if m.in_dim != m.out_dim + conditioner.num_channels:
        raise ConfigError(
            f"model.in_dim={m.in_dim} must be model.out_dim={m.out_dim} + the conditioner's "
            f"{conditioner.num_channels} channels (Wan I2V models: conditioner=concat)"
        )
    camera = m.get("camera_channels")
    if (camera or 0) != conditioner.control_channels:
        raise ConfigError(
            f"model.camera_channels={camera} but the conditioner gives "
            f"{conditioner.control_channels} camera channels: camera-controlled models "
            f"(model=lingbot_world_14b) need conditioner=camera, other models another conditioner"
        )
    if (cfg.get("poses") or cfg.get("intrinsics")) and not conditioner.control_channels:
        log.warning("poses=/intrinsics= are ignored: this recipe has no camera control")
    needs_image = conditioner.needs_image or image_encoder.image_dim is not None
    if needs_image and not cfg.image:
        raise ConfigError("image=null: this recipe conditions on an input image; "
                          "pass image=path/to/first_frame.png (PNG or JPEG)")  # fmt: skip
    r = cfg.rollout  # the clip prepare() will see: prefix + every block (one if endless)
    conditioner.check_frames(conditioner.num_prefix_frames
                             + r.frames_per_block * (r.total_blocks or 1))  # fmt: skip
    if cfg.image and not (needs_image or conditioner.optional_image):
        log.warning("image=%s is ignored: this recipe does not condition on an image", cfg.image)
    return guidance, image_encoder, conditioner


def build_rollout(cfg: DictConfig, noise_fn: NoiseFn | None = None) -> Rollout:
    """Instantiate every part of ``cfg`` and wire them into a ``Rollout``."""
    from flashdreams.offload import BlockOffloader, check_offload
    from flashdreams.precision.base import Precision

    parallel = instantiate(cfg.parallel)
    device = parallel.setup(resolve_device(cfg.device))  # joins torchrun's job: cuda:LOCAL_RANK
    dtype = resolve_dtype(cfg.dtype, device)
    guidance, image_encoder, conditioner = build_conditioning(cfg, device)
    graph = instantiate(cfg.graph)
    offload = cfg.get("offload", "none")
    check_offload(offload, graph.name, idle_expert=bool(cfg.model.get("offload_idle_expert")))
    precision = instantiate(cfg.precision) if "precision" in cfg else Precision()
    # offload=blocks loads on the CPU, so the full model never sits on the device
    model = build_model(cfg.model, torch.device("cpu") if offload == "blocks" else device,
                        dtype, cfg.seed, draw_on=device)  # fmt: skip
    model = precision.apply(model, device)
    parallel.parallelize(model, instantiate(cfg.attention))
    if parallel.world_size > 1 and graph.name == "eager" and device.type == "cuda":
        log.warning("parallel=%s with graph=eager is launch-bound on GPUs (no speed-up measured); "
                    "use graph=cuda_graph or graph=compile_cuda_graph", parallel.name)  # fmt: skip
    model = graph.prepare(model)
    offloader = BlockOffloader(model, device) if offload == "blocks" else None
    text_encoder = instantiate(cfg.text_encoder)
    if getattr(text_encoder, "text_dim", model.text_dim) != model.text_dim:
        raise ConfigError(
            f"text_encoder.text_dim={text_encoder.text_dim} does not match "
            f"model.text_dim={model.text_dim}"
        )
    shared = SharedParts(model=model, text_encoder=text_encoder, guidance=guidance,
                         image_encoder=image_encoder, parallel=parallel, precision=precision,
                         offloader=offloader, device=device, dtype=dtype)  # fmt: skip
    return assemble_rollout(cfg, shared, conditioner=conditioner, graph=graph, noise_fn=noise_fn)


@dataclass
class SharedParts:
    """What rollouts of one recipe can share: the loaded weights and the run-wide policies."""

    model: torch.nn.Module
    text_encoder: object
    guidance: object
    image_encoder: object
    parallel: object
    precision: object
    offloader: object
    device: torch.device
    dtype: torch.dtype


def assemble_rollout(cfg: DictConfig, shared: SharedParts, *, conditioner=None, graph=None,
                     noise_fn: NoiseFn | None = None, total_blocks: int | None = None) -> Rollout:  # fmt: skip
    """A ``Rollout`` around ``shared`` weights with its own cache, decoder, scheduler and state.

    ``build_rollout`` calls it once; the server calls it per session (sharing one loaded model).
    ``graph`` defaults to a fresh policy (the model was already prepared by the first one), and
    ``total_blocks`` to the recipe's.
    """
    device, dtype, precision = shared.device, shared.dtype, shared.precision
    if conditioner is None:
        conditioner = instantiate(cfg.conditioner).to(device)
    vae = instantiate(cfg.vae).to(device=device, dtype=dtype).eval().requires_grad_(False)
    r = cfg.rollout
    cache = instantiate(cfg.cache)
    if precision.kv_dtype is not None:
        cache = partial(cache, kv_dtype=precision.kv_dtype)
    attention = getattr(shared.model, "attention", None)
    if getattr(attention, "wants_kv_amax", False):
        cache = partial(cache, track_amax=True)  # FP8 attention reads the running |K|, |V| bound
    rollout = Rollout(
        model=shared.model, scheduler=instantiate(cfg.scheduler), vae=vae,
        text_encoder=shared.text_encoder,
        cache_factory=shared.parallel.cache_factory(cache),  # this rank's share
        graph=graph if graph is not None else instantiate(cfg.graph), height=r.height,
        width=r.width, frames_per_block=r.frames_per_block,
        total_blocks=total_blocks or r.total_blocks, context_noise=r.context_noise,
        batch_size=r.batch_size, device=device, dtype=dtype, seed=cfg.seed, noise_fn=noise_fn,
        guidance=shared.guidance, image_encoder=shared.image_encoder, conditioner=conditioner,
        negative_prompt=cfg.negative_prompt, overlap_decode=r.get("overlap_decode", False),
    )  # fmt: skip
    rollout.parallel, rollout.shared = shared.parallel, shared
    rollout.precision, rollout.offloader = precision, shared.offloader
    return rollout
