"""Structured-config schemas registered in Hydra's ConfigStore.

The primary config and each YAML option extend a schema here through their defaults list
(``base_run``, ``base_rolling``, ...), so a misspelled key or a wrong type fails at
composition with Hydra's own message. This module must not import torch (``--help`` is fast).
"""

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class RolloutConfig:
    height: int | None = 128  # video height in pixels (null: from the input, see run_size)
    width: int | None = 128  # video width in pixels (null: from the input)
    frames_per_block: int = 3  # latent frames generated per AR step (every step after the first)
    first_block_frames: int | None = None  # latent frames of AR step 0 (None: frames_per_block)
    total_blocks: int | None = 7  # AR steps (null: as many as the input fills, or endless)
    context_noise: float = 0.0  # timestep of the commit forward
    batch_size: int = 1  # videos generated together
    overlap_decode: bool = False  # CUDA: decode on a side stream, concurrent with the commit
    pipeline_decode: bool = False  # CUDA: decode block n beside block n + 1; frames 1 step late
    prefetch_control: bool = False  # the control encodes block n + 1 beside block n's DiT


@dataclass
class RunConfig:
    run_name: str = "demo"
    seed: int = 0
    prompt: str = "A red fox running through fresh snow at dawn, cinematic."
    prompt_file: str | None = None
    negative_prompt: str = ""
    image: str | None = None
    text_recipe: str | None = None  # image-conditioned recipes: the text-only recipe to suggest
    input: str | None = None  # a video to process (super-resolution recipes)
    hdmap: str | None = None  # the rendered HD-map video of HDMap-driven recipes (OmniDreams)
    poses: str | None = None
    pose: str | None = None
    intrinsics: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    profile: bool = False
    fps: int = 16
    save_embeddings: str | None = None
    debug: bool = False
    tags: list[str] = field(default_factory=list)
    offload: str = "none"  # none | blocks (block weights in pinned host memory, streamed in)
    quality: bool = False  # also run a precision=bf16 reference; cosine / PSNR into stats.json
    quality_mode: str = "free"  # free (both trajectories run on) | forced (reference on the run's)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    paths: Any = MISSING
    model: Any = MISSING
    scheduler: Any = MISSING
    cache: Any = MISSING
    attention: Any = MISSING
    parallel: Any = MISSING
    graph: Any = MISSING
    vae: Any = MISSING
    text_encoder: Any = MISSING
    guidance: Any = MISSING
    image_encoder: Any = MISSING
    conditioner: Any = MISSING
    control: Any = MISSING
    logger: Any = MISSING
    precision: Any = MISSING
    step_cache: Any = None  # training-free step caching (conf/step_cache); null = none
    vsr: Any = None  # super-resolution settings of FlashVSR recipes (scale, color_fix, ...)
    postprocess: Any = None  # a recipe run on this run's frames as they come (conf/postprocess)
    recipe: Any = None
    bench: Any = None
    serve: Any = None  # flashdreams-serve's block (flashdreams/serve/config.py)


@dataclass
class WanModelConfig:
    _target_: str = "flashdreams.model.wan.WanDiT"
    checkpoint: str | None = None  # consumed by the loader, not the constructor
    checkpoint_key: str | None = None  # entry of a training .pt to load (generator / _ema)
    dim: int = 1536
    num_heads: int = 12
    num_layers: int = 30
    ffn_dim: int = 8960
    in_dim: int = 16
    out_dim: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    patch_size: list[int] = field(default_factory=lambda: [1, 2, 2])
    eps: float = 1e-6
    cross_attn_norm: bool = True
    image_dim: int | None = None
    text_len: int = 512
    rope_max_pos: int = 1024  # RoPE table rows of the height/width axes (frames are unbounded)
    camera_channels: int | None = None


@dataclass
class WanMoEModelConfig(WanModelConfig):
    _target_: str = "flashdreams.model.moe.WanMoE"
    low_noise_checkpoint: str | None = None  # the low-noise expert's weights (loader)
    boundary: float = 0.875  # high-noise expert where t >= boundary * 1000
    offload_idle_expert: bool = False  # keep only the expert in use on the device
    shared_cross_attn: bool = False  # both experts use the high-noise expert's text K/V


@dataclass
class CosmosModelConfig:
    _target_: str = "flashdreams.model.cosmos.dit.CosmosDiT"
    checkpoint: str | None = None  # consumed by the loader, not the constructor
    dim: int = 2048
    num_heads: int = 16
    num_layers: int = 28
    ffn_dim: int = 8192  # GELU MLP hidden width (4 x dim)
    in_dim: int = 16
    out_dim: int = 16
    text_dim: int = 100352  # Cosmos-Reason1-7B: 28 layers x 3584, all concatenated
    context_dim: int = 1024  # crossattn_proj output
    use_crossattn_projection: bool = True
    adaln_lora_dim: int = 256
    patch_size: list[int] = field(default_factory=lambda: [1, 2, 2])
    condition_mask_channel: bool = True
    concat_padding_mask: bool = True
    rope_scale: list[float] = field(default_factory=lambda: [1.0, 3.0, 3.0])
    rope_fps_modulation: bool = False
    fps: float = 24.0
    base_fps: float = 24.0
    timestep_scale: float = 0.001
    eps: float = 1e-6
    qk_eps: float = 1e-6
    text_len: int = 512


@dataclass
class FewStepFlowConfig:
    _target_: str = "flashdreams.scheduler.flow.FewStepFlowScheduler"
    timesteps: list[float] = field(default_factory=lambda: [1000.0, 750.0, 500.0, 250.0])
    shift: float = 5.0
    warp: bool = True
    integer_timesteps: bool = False
    boundary: float | None = None  # MoE: high-noise steps bridge to this sigma (FastVideo)
    renoise: str = "fresh"  # fresh | initial: re-noise with the block's starting noise (Cosmos)
    grid: str | None = None  # null (exact warped sigmas) | wan_unipc | self_forcing (vendor grid)
    latent_dtype: str | None = None  # null | bfloat16: latents rounded after every step


@dataclass
class SolverConfig:
    _target_: str = "flashdreams.scheduler.solver.DiffusersFlowScheduler"
    solver: str = "unipc"
    num_steps: int = 50
    shift: float = 5.0
    num_train_timesteps: int = 1000
    exact_timesteps: bool = False  # model timesteps sigma * 1000 unrounded (Cosmos pipelines)
    karras_sigmas: list[float] | None = None  # UniPC: [sigma_min, sigma_max] EDM karras schedule
    device_steps: bool = True  # UniPC: steps from a precomputed coefficient table (no host syncs)


@dataclass
class CfgGuidanceConfig:
    _target_: str = "flashdreams.guidance.cfg.ClassifierFreeGuidance"
    scale: float = 5.0
    batched: bool = False
    low_noise_scale: float | None = None  # MoE: scale while the low-noise expert runs
    anchor: str = "uncond"  # uncond + s (cond - uncond) | "cond": cond + s (cond - uncond)


@dataclass
class _CacheConfig:
    _partial_: bool = True


@dataclass
class FullCacheConfig(_CacheConfig):
    _target_: str = "flashdreams.cache.full.FullKVCache"


@dataclass
class RollingCacheConfig(_CacheConfig):
    _target_: str = "flashdreams.cache.rolling.RollingKVCache"
    window_frames: int = 21
    sink_frames: int = 0


def register() -> None:
    """Store the schemas (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="base_run", node=RunConfig)
    cs.store(group="model", name="base_wan", node=WanModelConfig)
    cs.store(group="model", name="base_wan_moe", node=WanMoEModelConfig)
    cs.store(group="model", name="base_cosmos", node=CosmosModelConfig)
    cs.store(group="scheduler", name="base_few_step", node=FewStepFlowConfig)
    cs.store(group="scheduler", name="base_solver", node=SolverConfig)
    cs.store(group="cache", name="base_full", node=FullCacheConfig)
    cs.store(group="cache", name="base_rolling", node=RollingCacheConfig)
    cs.store(group="guidance", name="base_cfg", node=CfgGuidanceConfig)


register()
