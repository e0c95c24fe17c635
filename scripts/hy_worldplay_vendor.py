"""HY-WorldPlay's own Wan2.2-TI2V-5B runner, run in this process next to ours (the bench's peer).

``scripts/bench_hy_worldplay.py --vendor PATH`` imports the release's code from ``PATH`` (a copy
of ``Tencent-Hunyuan/HY-WorldPlay``'s ``wan/`` and ``hyvideo/`` files: ``wan/inference/
pipeline_wan_w_mem_relative_rope.py`` (``WanPipeline``), ``wan/inference/helper.py`` (``MyVAE``),
``wan/models/dits/arwan_w_action_w_mem_relative_rope.py`` (``WanTransformer3DModel``),
``wan/models/utils.py`` (``select_mem_frames_wan``), ``hyvideo/prope/camera_rope.py``,
``hyvideo/utils/retrieval_context.py``), builds the release's transformer and VAE classes with
random weights and runs the release's per-chunk call (``WanPipeline.__call__`` with
``few_step=True``, ``first_chunk_size=4``, ``use_memory=True``, ``context_window_length=16``,
``guidance_scale=1``, as ``wan/generate.py`` calls it): its memory selection, its memory re-run
into its K/V lists, its 4 Euler steps and its VAE decode of the chunk.

What this machine lacks is substituted at import time (each listed in ``SUBSTITUTIONS`` and in
the bench's JSON); the release's files are not edited:

* ``sageattention.sageattn`` (INT8 attention kernel): ``F.scaled_dot_product_attention`` on the
  same layout, under the SDPA backend the bench gives (cuDNN for ``attention=sdpa_cudnn``);
* the release's ``distributed`` package (xDiT-style sequence parallel, started by ``torchrun``):
  single-process stand-ins (world size 1, rank 0; the collectives raise if ever reached), with
  ``WORLD_SIZE`` unset so the release takes its own non-parallel branches;
* ``models.par_vae.tools`` (the multi-GPU VAE ``DistWrapper``'s halo exchange): not imported;
  the chunk is decoded by the pipeline's single-GPU branch (``MyVAE.decode`` frame by frame,
  ``par_vae_decode=False``); ``--vendor-compile`` compiles ``vae.decoder`` as the wrapper does;
* the UMT5 text encoder: the prompt embeddings our run used (random, precomputed);
* ``hyvideo.generate.pose_to_input``: the viewmats / intrinsics / action labels our pose
  control produced (the same trajectory, ``pose='w-31'``);
* ``scipy.spatial.transform.Rotation`` and ``einops.rearrange`` when not installed (imported by
  the release's files, used only off this path: a use raises);
* without CUDA (the CPU smoke run): ``torch.cuda.synchronize`` and ``torch.cuda.nvtx`` ranges,
  which the release calls unconditionally, become no-ops.

The release hard-codes 880 tokens per latent frame (704x1280 through the 16x VAE and the 2x2
patch: RoPE offsets ``* 880``, PRoPE ``patches_x=40, patches_y=22``): the vendor run needs a
44x80 latent.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import io
import math
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F

CHUNK = 4  # the release's CHUNK_SIZE
TOKENS_PER_FRAME = 880  # hard-coded in the release's pipeline and attention processor
SUBSTITUTIONS = [
    "sageattention.sageattn -> torch SDPA (same HND layout, non-causal)",
    "distributed (sequence parallel, torchrun) -> world size 1 stand-ins, WORLD_SIZE unset",
    "models.par_vae.tools (multi-GPU VAE) -> pipeline's single-GPU decode branch (MyVAE)",
    "UMT5 text encoder -> the prompt embeddings of our run (random)",
    "hyvideo.generate.pose_to_input -> the viewmats/intrinsics/actions of our pose control",
    "scipy Rotation / einops rearrange -> stand-ins that raise (unused on this path)",
    "CPU only: torch.cuda.synchronize / nvtx ranges -> no-ops",
]
REQUIRED = (
    "wan/inference/pipeline_wan_w_mem_relative_rope.py",
    "wan/inference/helper.py",
    "wan/models/dits/arwan_w_action_w_mem_relative_rope.py",
    "wan/models/utils.py",
    "hyvideo/prope/camera_rope.py",
    "hyvideo/utils/retrieval_context.py",
)
# Wan2.2-TI2V-5B's VAE (diffusers AutoencoderKLWan config of Wan-AI/Wan2.2-TI2V-5B-Diffusers)
WAN22_VAE = dict(base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4],
                 num_res_blocks=2, temperal_downsample=[False, True, True], is_residual=True,
                 in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16,
                 scale_factor_temporal=4)  # fmt: skip


def _unused(name: str):
    def fail(*args, **kwargs):
        raise RuntimeError(f"{name} is a stand-in of the vendor bench (not on its path)")

    return fail


def _module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
    mod.__dict__.update(attrs)
    return mod


def install_stubs(backends: list | None) -> list[str]:
    """The substitutions above, as ``sys.modules`` entries (before the release is imported);
    returns the stand-ins of missing packages (scipy, einops), to drop once it is imported."""

    def sageattn(q, k, v, tensor_layout="HND", is_causal=False, **kw):
        if tensor_layout != "HND":
            raise ValueError(f"sageattn stand-in: tensor_layout={tensor_layout!r} (HND only)")
        if backends:
            from torch.nn.attention import sdpa_kernel

            with sdpa_kernel(backends):
                return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)

    stubs = {
        "sageattention": _module("sageattention", sageattn=sageattn),
        "distributed": _module("distributed", __path__=[]),
        "distributed.parallel_state": _module(
            "distributed.parallel_state", get_sp_world_size=lambda: 1,
            get_sp_parallel_rank=lambda: 0, get_sp_parallel_local_rank=lambda: 0),
        "distributed.communication_op": _module(
            "distributed.communication_op", all_to_all_sp=_unused("all_to_all_sp"),
            sequence_model_parallel_all_gather=_unused("sequence_model_parallel_all_gather")),
        "models.par_vae": _module("models.par_vae", __path__=[]),
        "models.par_vae.tools": _module(
            "models.par_vae.tools", distribute_data_to_gpus=_unused("distribute_data_to_gpus"),
            gather_results=_unused("gather_results")),
    }  # fmt: skip
    for name in ("scipy", "einops"):
        try:
            importlib.import_module(name)
        except ImportError:
            if name == "scipy":
                rotation = type("Rotation", (), {"from_matrix": _unused("Rotation.from_matrix")})
                stubs["scipy"] = _module("scipy", __path__=[])
                stubs["scipy.spatial"] = _module("scipy.spatial", __path__=[])
                stubs["scipy.spatial.transform"] = _module("scipy.spatial.transform",
                                                           Rotation=rotation)  # fmt: skip
            else:
                stubs["einops"] = _module("einops", rearrange=_unused("einops.rearrange"))
    sys.modules.update(stubs)
    return [n for n in stubs if n.split(".")[0] in ("scipy", "einops")]


def import_vendor(path: Path, backends: list | None, compile_dit: bool) -> types.SimpleNamespace:
    """The release's classes, imported from ``path`` the way ``wan/generate.py`` finds them
    (``wan/`` and the repository root on ``sys.path``)."""
    path = Path(path).resolve()
    missing = [f for f in REQUIRED if not (path / f).is_file()]
    if missing:
        raise SystemExit(f"--vendor {path}: not a HY-WorldPlay copy (missing {missing[0]})")
    import os

    os.environ.pop("WORLD_SIZE", None)  # the release's non-parallel branches
    # what the release imports from transformers / diffusers, imported before the stand-ins
    # exist (their optional-dependency probes must not see a stand-in scipy)
    importlib.import_module("transformers").UMT5EncoderModel  # noqa: B018 (lazy import)
    for name in (
        "diffusers.pipelines.wan.pipeline_output",
        "diffusers.loaders",
        "diffusers.models.autoencoders.autoencoder_kl_wan",
        "diffusers.video_processor",
    ):
        importlib.import_module(name)  # fmt: skip
    dropped = install_stubs(backends)
    if not torch.cuda.is_available():  # CPU smoke run: the release syncs / marks CUDA freely
        torch.cuda.synchronize = lambda *a, **k: None
        torch.cuda.nvtx.range_push = lambda *a, **k: None
        torch.cuda.nvtx.range_pop = lambda *a, **k: None
    for p in (str(path), str(path / "wan")):
        if p not in sys.path:
            sys.path.insert(0, p)
    pipe_mod = importlib.import_module("inference.pipeline_wan_w_mem_relative_rope")
    helper = importlib.import_module("inference.helper")
    dit_mod = importlib.import_module("models.dits.arwan_w_action_w_mem_relative_rope")
    for name in dropped:
        del sys.modules[name]
    # the release's hyvideo/__init__.py (imported for PRoPE) sets WORLD_SIZE=1 when it is unset,
    # which sends its attention through the sequence-parallel all-to-all: unset it again
    os.environ.pop("WORLD_SIZE", None)
    ns = types.SimpleNamespace(WanPipeline=pipe_mod.WanPipeline, MyVAE=helper.MyVAE,
                               Transformer=dit_mod.WanTransformer3DModel,
                               Block=dit_mod.WanTransformerBlock,
                               compiled_forward=dit_mod.WanTransformerBlock.forward)  # fmt: skip
    set_dit_compile(ns, compile_dit)
    return ns


def set_dit_compile(ns, compiled: bool) -> None:
    """The release's block forward as it ships (``@torch.compile``, torch's default arguments:
    shapes turn dynamic after the first recompile) or the undecorated function (eager)."""
    forward = ns.compiled_forward
    ns.Block.forward = forward if compiled else getattr(forward, "_torchdynamo_orig_callable",
                                                        forward)  # fmt: skip


def build_transformer(ns, m, device, dtype, seed: int = 0):
    """The release's transformer at our config ``m`` (cfg.model) with random weights: built as
    ``wan/generate.py`` builds it (``add_discrete_action_parameters``), then every tensor redrawn
    (the release's zero-initialised action / PRoPE output layers too, so they count)."""
    head_dim = m.dim // m.num_heads
    with torch.device(device):
        model = ns.Transformer(patch_size=tuple(m.patch_size), num_attention_heads=m.num_heads,
                               attention_head_dim=head_dim, in_channels=m.in_dim,
                               out_channels=m.out_dim, text_dim=m.text_dim, freq_dim=m.freq_dim,
                               ffn_dim=m.ffn_dim, num_layers=m.num_layers,
                               cross_attn_norm=m.cross_attn_norm, eps=m.eps,
                               rope_max_seq_len=m.rope_max_pos)  # fmt: skip
        model.add_discrete_action_parameters()
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                fan_in = math.prod(p.shape[1:])
                p.copy_(torch.randn(p.shape, generator=gen, device=device) / fan_in**0.5)
            elif "norm" in name and "weight" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen, device=device))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen, device=device))
    return model.to(dtype).eval().requires_grad_(False)


def release_checkpoint(model, directory: str) -> str:
    """The transformer's weights as the release ships them (``model.pt``: a ``generator``
    envelope, ``model.``-prefixed diffusers names), for our checkpoint conversion."""
    path = str(Path(directory) / "model.pt")
    state = {f"model.{k}": v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"generator": state}, path)
    return path


def build_vae(ns, vae_cfg, tiny: bool, device, dtype):
    """The release's ``MyVAE`` (diffusers AutoencoderKLWan) with random weights: Wan 2.2's
    config, or our tiny VAE's sizes for the CPU smoke run."""
    cfg = dict(WAN22_VAE)
    if tiny:
        cfg.update(base_dim=vae_cfg.base_dim, decoder_base_dim=vae_cfg.base_dim,
                   dim_mult=list(vae_cfg.dim_mult), num_res_blocks=vae_cfg.num_res_blocks,
                   temperal_downsample=list(vae_cfg.temperal_downsample),
                   scale_factor_spatial=2 ** len(vae_cfg.temperal_downsample) * 2)  # fmt: skip
    z = cfg["z_dim"]
    with torch.device(device):
        vae = ns.MyVAE(**cfg, latents_mean=[0.0] * z, latents_std=[1.0] * z)
    return vae.to(dtype).eval().requires_grad_(False)


class VendorRun:
    """The release's pipeline over one clip: ``chunk(i)`` runs its call for chunk ``i`` and
    returns (dit_ms, decode_ms, latents of the chunk, memory frames it selected)."""

    def __init__(self, ns, transformer, vae, prompt_embeds, inputs, noise, compile_vae: bool):
        from diffusers import FlowMatchEulerDiscreteScheduler

        if compile_vae:  # what the release's DistWrapper does to the decoder
            vae.decoder = torch.compile(vae.decoder)
        self.pipe = ns.WanPipeline(tokenizer=None, text_encoder=None, vae=vae,
                                   scheduler=FlowMatchEulerDiscreteScheduler(),
                                   transformer=transformer)  # fmt: skip
        self.pipe.set_progress_bar_config(disable=True)
        self.prompt_embeds, self.inputs, self.noise = prompt_embeds, inputs, noise
        self.device = noise.device
        self.selected: list[int] | None = None
        self._wrap()

    def _wrap(self) -> None:
        """Events around the VAE decode inside the call (DiT = call start -> decode start), and
        the memory frames the release selects (its ``select_mem_frames_wan``, recorded)."""
        vae, run = self.pipe.vae, self
        decode = vae.decode

        def timed_decode(*args, **kwargs):
            run._mark("decode")
            return decode(*args, **kwargs)

        vae.decode = timed_decode
        module = sys.modules[type(self.pipe).__module__]
        select = module.select_mem_frames_wan

        def recorded(*args, **kwargs):
            run.selected = select(*args, **kwargs)
            return run.selected

        module.select_mem_frames_wan = recorded

    def _mark(self, name: str) -> None:
        if self.device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._events[name] = ev
        else:
            import time

            self._events[name] = time.perf_counter()

    def _ms(self, a: str, b: str) -> float:
        ea, eb = self._events[a], self._events[b]
        return ea.elapsed_time(eb) if self.device.type == "cuda" else (eb - ea) * 1e3

    def chunk(self, i: int, num_frames: int):
        s = slice(i * CHUNK, (i + 1) * CHUNK)
        self._events = {}
        start = i * CHUNK
        self.selected = list(range(start)) if start < 16 else None  # the release's own rule
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self._mark("start")
        with contextlib.redirect_stdout(io.StringIO()):  # its per-chunk "Vae decode time" line
            video, latents = self.pipe(
                prompt=None, prompt_embeds=self.prompt_embeds, negative_prompt=None,
                height=self.noise.shape[3] * 16, width=self.noise.shape[4] * 16,
                num_frames=num_frames, num_inference_steps=4, guidance_scale=1.0, few_step=True,
                first_chunk_size=CHUNK, return_dict=False, image_path=None, use_memory=True,
                context_window_length=16, chunk_i=i, latents=self.noise.clone() if i == 0 else None,
                viewmats=self.inputs["viewmats"][:, s], Ks=self.inputs["intrinsics"][:, s],
                action=self.inputs["action"][:, s], output_type="pt",
            )  # fmt: skip
        self._mark("end")
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return (self._ms("start", "decode"), self._ms("decode", "end"),
                latents[:, :, s].float(), self.selected, video)  # fmt: skip
