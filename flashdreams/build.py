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
from flashdreams.model.base import DiT
from flashdreams.rollout import NoiseFn, Rollout
from flashdreams.rollout.schedule import BlockSchedule

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


def construct_model(model_cfg: DictConfig):
    """The DiT of ``model_cfg`` on the meta device: its contract (inputs, layout) is readable,
    no weights are allocated (cheap at any size)."""
    spec = OmegaConf.to_container(model_cfg, resolve=True)
    for loader_key in ("checkpoint", "low_noise_checkpoint", "checkpoint_key"):
        spec.pop(loader_key, None)  # consumed by the loader, not the constructor
    with torch.device("meta"):
        model = instantiate(spec)
    if not isinstance(model, DiT):
        raise ConfigError(f"model._target_={model_cfg._target_!r} is not a "
                          "flashdreams.model.base.DiT")  # fmt: skip
    return model


def build_model(model_cfg: DictConfig, device: torch.device, dtype: torch.dtype, seed: int,
                draw_on: torch.device | None = None, model: DiT | None = None):  # fmt: skip
    """Construct the DiT on the meta device and fill it (checkpoint or seeded random weights).

    ``draw_on``: the compute device when ``device`` is the CPU for offloading; random weights are
    drawn there (the same weights as a resident run) when they fit (see ``materialize``).
    ``model``: the meta-device model of ``model_cfg`` when the caller already constructed it.
    """
    from flashdreams.io.checkpoint import materialize

    checkpoint = model_cfg.get("checkpoint")
    model = construct_model(model_cfg) if model is None else model
    if checkpoint is None:
        log.warning(
            "model.checkpoint=null: RANDOM WEIGHTS (seed %d). The output demonstrates the "
            "pipeline, not a trained model.", seed,
        )  # fmt: skip
    if model.num_experts > 1:  # Wan 2.2 A14B: one checkpoint per expert
        from flashdreams.io.experts import materialize_experts

        low = model_cfg.get("low_noise_checkpoint")
        model = materialize_experts(model, checkpoint, low, device, dtype, seed)
    else:
        model = materialize(model, checkpoint, device=device, dtype=dtype, seed=seed,
                            draw_on=draw_on, checkpoint_key=model_cfg.get("checkpoint_key"))  # fmt: skip
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


@dataclass
class Conditioning:
    """The conditioning parts of a recipe, checked against its model."""

    guidance: object
    image_encoder: object
    conditioner: object
    control: object


def build_conditioning(cfg: DictConfig, device: torch.device, model: DiT | None = None):
    """Guidance, image encoder, conditioner and control of ``cfg``, checked against the model.

    Runs before the DiT's weights load (``model`` is the meta-device one, constructed here when
    not given), so a missing ``image=``, a pose file too short or a conditioning input the model
    does not accept fails before minutes of loading, in one line.
    """
    model = construct_model(cfg.model) if model is None else model
    guidance, image_encoder = instantiate(cfg.guidance), instantiate(cfg.image_encoder)
    conditioner = instantiate(cfg.conditioner).to(device)
    control = instantiate(cfg.control).to(device)
    image_dim = cfg.model.get("image_dim")
    if image_dim != image_encoder.image_dim:
        raise ConfigError(
            f"model.image_dim={image_dim} but the image encoder gives tokens of width "
            f"{image_encoder.image_dim}: I2V models need image_encoder=clip, others none"
        )
    given = {}
    for group, part in (("conditioner", conditioner), ("control", control)):
        for name, spec in part.provides().items():
            if name in given:
                raise ConfigError(f"{group}={_option(cfg, group)} and {given[name][1]} both give "
                                  f"the conditioning input {name!r}")  # fmt: skip
            given[name] = (spec, f"{group}={_option(cfg, group)}")
    model.check_inputs({name: source for name, (_, source) in given.items()})
    accepted = model.inputs()
    for name, (spec, source) in given.items():
        want, got = accepted[name].shape(1, 1, (2, 2)), spec.shape(1, 1, (2, 2))
        if want != got:
            raise ConfigError(f"{source} gives {name!r} shaped like {list(got)}, the model "
                              f"({type(model).__name__}) takes {list(want)} (per frame of a "
                              "2 x 2 latent)")  # fmt: skip
    resolve_run_size(cfg, control)
    if (cfg.get("poses") or cfg.get("intrinsics")) and "camera" not in given:
        log.warning("poses=/intrinsics= are ignored: this recipe has no camera control")
    needs_image = conditioner.needs_image or image_encoder.image_dim is not None
    if needs_image and not cfg.image:
        text = cfg.get("text_recipe")
        hint = f", or run recipe={text} for text-to-video" if text else ""
        raise ConfigError("image=null: this recipe conditions on an input image; "
                          f"pass image=path/to/first_frame.png (PNG or JPEG){hint}")  # fmt: skip
    r = cfg.rollout  # the clip prepare() will see: prefix + every block (one if endless)
    schedule = BlockSchedule(r.frames_per_block, r.get("first_block_frames"))
    frames = conditioner.num_prefix_frames + schedule.total(r.total_blocks or 1)
    conditioner.check_frames(frames)
    control.check_frames(frames)
    if cfg.get("input") and control.run_size() is None:
        log.warning("input=%s is ignored: this recipe reads no input video", cfg.input)
    if cfg.image and not (needs_image or conditioner.optional_image):
        log.warning("image=%s is ignored: this recipe does not condition on an image", cfg.image)
    return Conditioning(guidance, image_encoder, conditioner, control)


def resolve_run_size(cfg: DictConfig, control) -> None:
    """``rollout.height`` / ``width`` / ``total_blocks`` left null take the size the control's
    input proposes (``ControlEncoder.run_size``: a video to upscale); set in ``cfg``."""
    r = cfg.rollout
    open_keys = [k for k in ("height", "width", "total_blocks") if r[k] is None]
    if not open_keys:
        return
    size = control.run_size()
    if size is None:
        if "height" in open_keys or "width" in open_keys:
            key = "height" if "height" in open_keys else "width"
            raise ConfigError(f"rollout.{key}=null: this recipe has no input to size the run "
                              f"from; set rollout.{key}")  # fmt: skip
        return  # total_blocks null: an endless stream
    if r.height is None:
        r.height = size.height
    if r.width is None:
        r.width = size.width
    if r.total_blocks is None and size.latent_frames is not None:
        blocks = blocks_for_frames(r, size.latent_frames)
        if blocks < 1:
            first = BlockSchedule(r.frames_per_block, r.get("first_block_frames")).first
            raise ConfigError(f"the input fills {size.latent_frames} latent frames, fewer than "
                              f"the first block's {first} (rollout.frames_per_block, "
                              "rollout.first_block_frames; too short)")  # fmt: skip
        r.total_blocks = blocks
    log.info("run size from the input: %dx%d, %s blocks", r.height, r.width, r.total_blocks)


def blocks_for_frames(rollout_cfg: DictConfig, latent_frames: int) -> int:
    """AR blocks of the block schedule whose latent frames fit in ``latent_frames`` (whole
    blocks only)."""
    r = rollout_cfg
    schedule = BlockSchedule(r.frames_per_block, r.get("first_block_frames"))
    if latent_frames < schedule.first:
        return 0
    return 1 + (latent_frames - schedule.first) // schedule.steady


def feed_decoder(vae, control, decoder_name: str = "vae"):
    """``vae`` itself, or a ``FedDecoder`` giving it its named inputs from ``control``; a
    decoder input no control gives is a one-line error."""
    from flashdreams.vae.base import FedDecoder

    wanted = vae.inputs()
    if not wanted:
        return vae
    given = control.decoder_provides()
    missing = [name for name in wanted if name not in given]
    if missing:
        raise ConfigError(f"{decoder_name} ({type(vae).__name__}) takes the decoder input "
                          f"{missing[0]!r}, which the recipe's control does not give "
                          "(e.g. control=lr_video)")  # fmt: skip
    return FedDecoder(vae, control.decoder_inputs)


def _option(cfg: DictConfig, group: str) -> str:
    """The option name of a config group, for messages (its target's class otherwise)."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        choice = HydraConfig.get().runtime.choices.get(group)
        if choice:
            return str(choice)
    target = str(cfg[group].get("_target_", "?"))
    return target.rsplit(".", 1)[-1]


def build_shared(cfg: DictConfig) -> SharedParts:
    """Everything rollouts of one recipe share: the loaded weights and the run-wide policies.

    Order: parallel layout, conditioning (checked against the meta model, before any weights
    load), the weights, precision, the attention composed with the parallel layout
    (``DiT.set_attention``, the one place attention is wired), the graph policy's preparation,
    the offloader, the text encoder.
    """
    from flashdreams.offload import BlockOffloader
    from flashdreams.precision.base import Precision

    parallel = instantiate(cfg.parallel)
    device = parallel.setup(resolve_device(cfg.device))  # joins torchrun's job: cuda:LOCAL_RANK
    dtype = resolve_dtype(cfg.dtype, device)
    meta_model = construct_model(cfg.model)  # once: checked against, then filled
    conditioning = build_conditioning(cfg, device, meta_model)
    graph = instantiate(cfg.graph)
    offload = str(cfg.get("offload", "none"))
    check_graph_options(cfg, graph)
    step_cache = build_step_cache(cfg)
    check_step_cache(cfg, step_cache, graph, parallel)
    precision = instantiate(cfg.precision) if "precision" in cfg else Precision()
    # offload=blocks loads on the CPU, so the full model never sits on the device
    model = build_model(cfg.model, torch.device("cpu") if offload == "blocks" else device,
                        dtype, cfg.seed, draw_on=device, model=meta_model)  # fmt: skip
    model = precision.apply(model, device)
    model.set_attention(parallel.attention(instantiate(cfg.attention)))
    model.set_step_cache(step_cache)
    if parallel.world_size > 1 and graph.name == "eager" and device.type == "cuda":
        log.warning("parallel=%s with graph=eager is launch-bound on GPUs (no speed-up measured); "
                    "use graph=cuda_graph or graph=compile_cuda_graph", parallel.name)  # fmt: skip
    model = graph.prepare(model)
    offloader = BlockOffloader(model, device) if offload == "blocks" else None
    text_encoder = instantiate(cfg.text_encoder)
    if text_encoder.text_dim is not None and text_encoder.text_dim != model.text_dim:
        raise ConfigError(
            f"text_encoder.text_dim={text_encoder.text_dim} does not match "
            f"model.text_dim={model.text_dim}"
        )
    return SharedParts(model=model, text_encoder=text_encoder, conditioning=conditioning,
                       parallel=parallel, precision=precision, offloader=offloader,
                       device=device, dtype=dtype, graph=graph)  # fmt: skip


def check_graph_options(cfg: DictConfig, graph) -> None:
    """Options that exclude each other, in one line before anything loads: weights that move
    between forwards (``offload=blocks``, ``model.offload_idle_expert``) against a graph policy
    that cannot follow them."""
    from flashdreams.offload import check_offload

    check_offload(str(cfg.get("offload", "none")), graph,
                  idle_expert=bool(cfg.model.get("offload_idle_expert")))  # fmt: skip


def build_rollout(cfg: DictConfig, noise_fn: NoiseFn | None = None) -> Rollout:
    """Instantiate every part of ``cfg`` and wire them into a ``Rollout``."""
    shared = build_shared(cfg)
    return assemble_rollout(cfg, shared, graph=shared.graph, noise_fn=noise_fn,
                            conditioning=shared.conditioning)  # fmt: skip


@dataclass
class SharedParts:
    """What rollouts of one recipe can share: the loaded weights and the run-wide policies."""

    model: DiT
    text_encoder: object
    conditioning: Conditioning  # the first rollout's (later ones instantiate their own)
    parallel: object
    precision: object
    offloader: object
    device: torch.device
    dtype: torch.dtype
    graph: object  # the policy that prepared the model


def assemble_rollout(cfg: DictConfig, shared: SharedParts, *, graph=None,
                     noise_fn: NoiseFn | None = None, total_blocks: int | None = None,
                     conditioning: Conditioning | None = None) -> Rollout:  # fmt: skip
    """A ``Rollout`` around ``shared`` weights with its own cache, decoder, scheduler and state.

    ``build_rollout`` calls it once; the server calls it per session (sharing one loaded model).
    ``graph`` defaults to a fresh policy (the model was already prepared by the first one),
    ``conditioning`` to freshly instantiated parts (their state is per clip) and
    ``total_blocks`` to the recipe's.
    """
    device, dtype, precision = shared.device, shared.dtype, shared.precision
    if conditioning is None:
        conditioning = Conditioning(
            shared.conditioning.guidance, shared.conditioning.image_encoder,
            instantiate(cfg.conditioner).to(device), instantiate(cfg.control).to(device),
        )  # fmt: skip
    conditioning.control.set_graph(instantiate(cfg.graph))  # its encoder's own policy
    vae = instantiate(cfg.vae).to(device=device, dtype=dtype).eval().requires_grad_(False)
    vae.set_graph(instantiate(cfg.graph))  # the decoder's own policy (vae.graph=eager: ignored)
    vae = feed_decoder(vae, conditioning.control, f"vae={_option(cfg, 'vae')}")
    r = cfg.rollout
    cache = instantiate(cfg.cache)
    if precision.kv_dtype is not None:
        cache = partial(cache, kv_dtype=precision.kv_dtype)
    if shared.model.attention.wants_kv_amax:
        cache = partial(cache, track_amax=True)  # FP8 attention reads the running |K|, |V| bound
    return Rollout(
        model=shared.model, scheduler=instantiate(cfg.scheduler), vae=vae,
        text_encoder=shared.text_encoder,
        cache_factory=shared.parallel.cache_factory(cache),  # this rank's share
        graph=graph if graph is not None else instantiate(cfg.graph), height=r.height,
        width=r.width, frames_per_block=r.frames_per_block,
        first_block_frames=r.get("first_block_frames"),
        total_blocks=total_blocks or r.total_blocks, context_noise=r.context_noise,
        batch_size=r.batch_size, device=device, dtype=dtype, seed=cfg.seed, noise_fn=noise_fn,
        guidance=conditioning.guidance, image_encoder=conditioning.image_encoder,
        conditioner=conditioning.conditioner, control=conditioning.control,
        negative_prompt=cfg.negative_prompt, overlap_decode=r.get("overlap_decode", False),
        pipeline_decode=r.get("pipeline_decode", False),
        prefetch_control=r.get("prefetch_control", False),
        parallel=shared.parallel, precision=precision, offloader=shared.offloader,
    )  # fmt: skip


def build_step_cache(cfg: DictConfig):
    """The recipe's step cache (``step_cache`` group; none when the config has no group)."""
    from flashdreams.step_cache.base import StepCache

    return instantiate(cfg.step_cache) if cfg.get("step_cache") is not None else StepCache()


def check_step_cache(cfg: DictConfig, step_cache, graph, parallel) -> None:
    """One-line ``ConfigError`` before any weights load when the recipe cannot use its step
    cache: a model whose forward does not run its blocks through ``DiT.run_blocks``, too few
    layers or steps, a KV cache (streaming recipes), a capturing graph policy."""
    if not step_cache.enabled:
        return
    model = construct_model(cfg.model)  # meta device: no weights
    model.set_step_cache(step_cache)
    r = cfg.rollout  # a meta-device cache of the run's frames tells AR from bidirectional
    schedule = BlockSchedule(r.frames_per_block, r.get("first_block_frames"))
    cache = model.build_cache(instantiate(cfg.cache), tokens_per_frame=1,  # whole, not a share
                              frames_per_block=schedule.max_frames,
                              total_frames=schedule.total(r.total_blocks or 1),
                              batch_size=1, device=torch.device("meta"), dtype=torch.float32)  # fmt: skip
    step_cache.check(num_layers=model.num_layers, num_steps=instantiate(cfg.scheduler).num_steps,
                     kv_cache=cache is not None, graph_captures=bool(graph.captures),
                     world_size=parallel.world_size)  # fmt: skip
