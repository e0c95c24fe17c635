"""Checkpoint resolution, reading and loading into meta-built models.

Formats read (DESIGN.md section 5): the Wan original release (``diffusion_pytorch_model*``
safetensors, optionally sharded with an index json), a diffusers ``WanTransformer3DModel``
folder (converted to Wan names), and Self-Forcing / CausVid training ``.pt`` files.
Models are built on the meta device and filled by assignment, so weights are allocated once.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from flashdreams import ConfigError
from flashdreams.io.keymap import (
    diffusers_to_wan,
    generator_entries,
    lingbot_to_flashdreams,
    looks_like_diffusers,
    strip_wrapper_prefixes,
    unwrap_training_checkpoint,
)

log = logging.getLogger(__name__)

HF_SCHEME = "hf://"
# Files of a DiT inside a model repository; the text encoder and VAE files are left out.
DIT_PATTERNS = ("diffusion_pytorch_model*", "config.json", "transformer/*")
_FILE_SUFFIXES = {".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".json", ".model", ".txt"}
_TORCH_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt"}
_MAX_LISTED = 8
# diffusers DiT classes whose folders (or ``transformer/`` subfolders) are read
_DIFFUSERS_DIT_CLASSES = ("WanTransformer3DModel", "CosmosTransformer3DModel")


class CheckpointError(ConfigError):
    """A checkpoint cannot be found, read, or does not match the model it is loaded into."""


def _describe(err: BaseException) -> str:
    """``TypeName: first line of the message`` of an exception."""
    lines = str(err).splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def _parse_hf_spec(spec: str) -> tuple[str, str | None, str]:
    """Split ``hf://org/repo[@revision]/path/in/repo`` into (repo_id, revision, path)."""
    parts = spec[len(HF_SCHEME) :].strip("/").split("/")
    if len(parts) < 2 or not all(parts[:2]):
        raise CheckpointError(f"checkpoint spec {spec!r} is not of the form hf://org/repo[/path]")
    name, _, revision = parts[1].partition("@")
    return f"{parts[0]}/{name}", revision or None, "/".join(parts[2:])


def _hf_offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return bool(constants.HF_HUB_OFFLINE) or env in {"1", "true", "yes", "on"}


def resolve_path(spec: str | os.PathLike, allow_patterns: Iterable[str] | None = None) -> Path:
    """Turn a checkpoint spec into a local path, downloading from the Hugging Face Hub if needed.

    Args:
        spec: a local file or folder, or ``hf://org/repo[@revision][/path/in/repo]``. A path
            whose last part has a file suffix is fetched as one file, otherwise as a folder.
        allow_patterns: for a whole-repository spec, glob patterns of the files to fetch.

    Returns:
        The local file or folder.

    Raises:
        CheckpointError: the path does not exist, or the Hub file is neither cached nor
            downloadable (e.g. ``HF_HUB_OFFLINE=1`` and not in the cache).
    """
    spec = str(spec)
    if not spec.startswith(HF_SCHEME):
        path = Path(spec).expanduser()
        if not path.exists():
            raise CheckpointError(f"checkpoint {spec!r} does not exist")
        return path
    repo_id, revision, sub = _parse_hf_spec(spec)
    import huggingface_hub as hub

    offline = _hf_offline()
    try:
        if sub and Path(sub).suffix in _FILE_SUFFIXES:
            return Path(
                hub.hf_hub_download(repo_id, sub, revision=revision, local_files_only=offline)
            )
        patterns = [f"{sub}/*"] if sub else (list(allow_patterns) if allow_patterns else None)
        root = hub.snapshot_download(
            repo_id, revision=revision, allow_patterns=patterns, local_files_only=offline
        )
    except Exception as err:  # the hub raises many types (offline, 404, gated, network)
        hint = " (HF_HUB_OFFLINE is set and it is not in the cache)" if offline else ""
        raise CheckpointError(f"cannot fetch checkpoint {spec!r}{hint}: {_describe(err)}") from err
    path = Path(root) / sub if sub else Path(root)
    if not path.exists():
        raise CheckpointError(f"checkpoint {spec!r}: {sub!r} not found in {repo_id}")
    return path


def load_torch_file(path: str | os.PathLike) -> dict:
    """``torch.load`` a checkpoint on CPU with ``weights_only=True``, memory-mapped if possible.

    Raises:
        CheckpointError: the file holds objects that a weights-only load refuses.
    """
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):  # legacy (non-zip) files cannot be memory-mapped
                raise
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not weights-only: {_describe(err)}"
        ) from err


def _shards(index: Path) -> list[Path]:
    """The shard files named by a ``*.safetensors.index.json``."""
    weight_map = json.loads(index.read_text())["weight_map"]
    return [index.parent / name for name in sorted(set(weight_map.values()))]


def _safetensors_files(folder: Path) -> list[Path]:
    """The ``diffusion_pytorch_model*`` safetensors of a folder, via its index when sharded."""
    indexes = sorted(folder.glob("diffusion_pytorch_model*.safetensors.index.json"))
    if indexes:
        return _shards(indexes[0])
    single = folder / "diffusion_pytorch_model.safetensors"
    if single.exists():
        return [single]
    return sorted(folder.glob("diffusion_pytorch_model*.safetensors"))


def _read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in files:
        if not file.exists():
            raise CheckpointError(f"checkpoint shard {str(file)!r} is missing")
        state.update(load_file(file, device="cpu"))
    return state


def _is_diffusers_folder(folder: Path) -> bool:
    config = folder / "config.json"
    if not config.exists():
        return False
    try:
        return json.loads(config.read_text()).get("_class_name") in _DIFFUSERS_DIT_CLASSES
    except (json.JSONDecodeError, AttributeError):
        return False


def _read_folder(folder: Path) -> dict[str, torch.Tensor]:
    if not _is_diffusers_folder(folder) and _is_diffusers_folder(folder / "transformer"):
        folder = folder / "transformer"
    files = _safetensors_files(folder)
    if not files:
        raise CheckpointError(
            f"no diffusion_pytorch_model*.safetensors (or index json) in folder {str(folder)!r}"
        )
    return _read_safetensors(files)


def _unwrap(obj: dict, path: Path, key: str | None) -> dict[str, torch.Tensor]:
    """The generator weights of a training ``.pt`` (``key``: the envelope entry to load)."""
    entries = generator_entries(obj)
    if key is not None and not entries:
        log.warning("model.checkpoint_key=%s is ignored: %s is a plain state dict (no "
                    "generator / generator_ema entries)", key, path)  # fmt: skip
        key = None
    try:
        state, entry = unwrap_training_checkpoint(obj, key)
    except KeyError:
        raise CheckpointError(
            f"model.checkpoint_key={key} but checkpoint {str(path)!r} has no such entry "
            f"(its entries: {', '.join(entries)})"
        ) from None
    if entry is not None:
        how = "model.checkpoint_key" if key is not None else "default preference"
        log.info("checkpoint %s: loading entry %r (%s; entries: %s)", path, entry, how,
                 ", ".join(entries))  # fmt: skip
    return state


def _read_file(path: Path, key: str | None = None) -> dict[str, torch.Tensor]:
    if path.suffix in _TORCH_SUFFIXES:
        obj = load_torch_file(path)
        if not isinstance(obj, dict):
            raise CheckpointError(f"checkpoint {str(path)!r} holds a {type(obj).__name__}")
        return _unwrap(obj, path, key)
    if key is not None:
        log.warning("model.checkpoint_key=%s is ignored: %s is not a training .pt", key, path)
    if path.name.endswith(".safetensors.index.json"):
        return _read_safetensors(_shards(path))
    if path.suffix == ".safetensors":
        return _read_safetensors([path])
    raise CheckpointError(f"checkpoint {str(path)!r} has an unknown format (suffix)")


def read_state_dict(
    path: str | os.PathLike,
    convert: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
    key: str | None = None,
) -> dict[str, torch.Tensor]:
    """Read a DiT checkpoint in any supported format, keyed by the model's names.

    Args:
        path: a local Wan original / diffusers folder (or its ``transformer/`` parent), a
            ``.safetensors`` file or shard index, or a ``.pt`` / ``.pth`` training checkpoint.
        convert: the model's renaming of the read tensors (a model class's
            ``convert_checkpoint``, e.g. Cosmos' native / diffusers names); None: Wan's (Wan
            original, diffusers and LingBot-World names).
        key: which entry of a training ``.pt`` envelope to load (``generator``,
            ``generator_ema``, ...; ``model.checkpoint_key``); None prefers ``generator_ema``.
            Ignored, with a warning, for files without an envelope.

    Returns:
        CPU tensors in their stored dtype, keyed like ``blocks.0.self_attn.q.weight``.
    """
    path = Path(path)
    try:
        if path.is_dir():
            if key is not None:
                log.warning("model.checkpoint_key=%s is ignored for the folder %s", key, path)
            state = _read_folder(path)
        else:
            state = _read_file(path, key)
    except CheckpointError:
        raise
    except Exception as err:  # corrupt or truncated files: safetensors / zip / json errors
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {_describe(err)}") from err
    state = strip_wrapper_prefixes(state)
    if convert is not None:
        return convert(state)
    if looks_like_diffusers(state):
        state = diffusers_to_wan(state)
    return lingbot_to_flashdreams(state)  # camera modules of LingBot-World; others unchanged


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """``torch.bfloat16`` from ``"bfloat16"`` / ``"bf16"`` / ``torch.bfloat16``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32"}
    name = aliases.get(str(dtype).removeprefix("torch."), str(dtype).removeprefix("torch."))
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise ConfigError(f"unknown dtype {dtype!r}")
    return value


def target_dtype(
    name: str, tensor: torch.Tensor, dtype: torch.dtype, keep_fp32: tuple
) -> torch.dtype:
    """Dtype a tensor gets under the policy: fp32 where its name contains a ``keep_fp32`` part.

    Integer and bool tensors keep their dtype.
    """
    if not tensor.is_floating_point():
        return tensor.dtype
    return torch.float32 if any(part in name for part in keep_fp32) else dtype


def _listing(title: str, items: list[str]) -> list[str]:
    if not items:
        return []
    lines = [f"  {title} ({len(items)}):"]
    lines += [f"    {item}" for item in items[:_MAX_LISTED]]
    if len(items) > _MAX_LISTED:
        lines.append(f"    ... and {len(items) - _MAX_LISTED} more")
    return lines


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Compare a state dict with the keys and shapes a model expects.

    Args:
        model: the (meta) model.
        state: the checkpoint's tensors.
        source: the checkpoint spec, named in the error.

    Raises:
        CheckpointError: listing missing, unexpected and wrongly shaped keys in one block.
    """
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{name}: checkpoint {tuple(state[name].shape)} vs model {shape}"
        for name, shape in sorted(expected.items())
        if name in state and tuple(state[name].shape) != shape
    ]
    if not (missing or unexpected or wrong):
        return
    lines = [
        f"checkpoint {source!r} does not match {type(model).__name__} "
        f"({len(state)} tensors found, {len(expected)} expected):"
    ]
    lines += _listing("missing", missing)
    lines += _listing("unexpected", unexpected)
    lines += _listing("wrong shape", wrong)
    raise CheckpointError("\n".join(lines))


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace parameter or buffer ``name`` of ``model`` by ``value`` (no copy)."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    old = module._parameters.get(attr)
    if old is not None:
        module._parameters[attr] = nn.Parameter(value, requires_grad=old.requires_grad)
    else:
        module._buffers[attr] = value


def _check_materialized(model: nn.Module) -> None:
    """Fill non-persistent buffers left on meta (via ``init_buffers``) or fail naming them."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    left = [name for name, t in tensors if t.is_meta]
    init_buffers = getattr(model, "init_buffers", None)
    if left and callable(init_buffers):
        init_buffers()
        left = [
            name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta
        ]
    if left:
        raise CheckpointError(
            f"{type(model).__name__} still has meta tensors after loading: {', '.join(left[:8])}"
        )


def _init_random(model: nn.Module, device: torch.device, dtype: torch.dtype, seed: int) -> None:
    """Allocate every tensor once, in its final dtype, then fill it from a seeded generator.

    ``init_weights`` draws each tensor in fp32 and ``copy_`` casts it into place, so the device
    never holds an fp32 copy of the model (a 14B model: 28 GB in bf16, not 56 GB). The generator
    lives on the target device: on CUDA the draws take a fraction of a second where a CPU
    generator needs about a minute per 14B model of held GPU time; weights are then identical on
    GPUs of one kind (and across CP ranks), not between CPU and GPU.
    """
    keep = tuple(getattr(model, "_keep_fp32", ()))
    for name, tensor in model.state_dict(keep_vars=True).items():
        wanted = target_dtype(name, tensor, dtype, keep)
        _set_tensor(model, name, torch.empty(tensor.shape, dtype=wanted, device=device))
    on = device if device.type == "cuda" else torch.device("cpu")
    generator = torch.Generator(on).manual_seed(seed)
    with torch.no_grad():
        model.init_weights(generator)


def _draw_device(model: nn.Module, device: torch.device, draw_on, dtype) -> torch.device:
    """Where random weights are drawn: ``draw_on`` (a CUDA device) when they fit there."""
    draw_on = None if draw_on is None else torch.device(draw_on)
    if draw_on is None or draw_on == device or draw_on.type != "cuda":
        return device
    need = sum(t.numel() for t in model.state_dict(keep_vars=True).values()) * dtype.itemsize
    free, _ = torch.cuda.mem_get_info(draw_on)
    if need <= 0.9 * free:
        return draw_on
    log.warning("random weights drawn on the CPU (%.1f GiB do not fit in %.1f GiB free on %s): "
                "they differ from the weights of a run resident on the GPU", need / 2**30,
                free / 2**30, draw_on)  # fmt: skip
    return device


def _assign(model: nn.Module, state: dict[str, torch.Tensor], device, dtype) -> None:
    """Move checkpoint tensors into the model one by one, freeing each source as it goes."""
    keep = tuple(getattr(model, "_keep_fp32", ()))
    for name in list(state):
        tensor = state.pop(name)
        wanted = target_dtype(name, tensor, dtype, keep)
        _set_tensor(model, name, tensor.to(device=device, dtype=wanted).contiguous())


def materialize(
    model_on_meta: nn.Module,
    checkpoint: str | os.PathLike | None,
    device: torch.device | str,
    dtype: torch.dtype | str,
    seed: int = 0,
    draw_on: torch.device | str | None = None,
    checkpoint_key: str | None = None,
) -> nn.Module:
    """Give a model built under ``torch.device("meta")`` real weights, allocated once.

    With no checkpoint, weights are seeded random (``model.init_weights(generator)``, drawn on
    the target device), for benchmarks and tests. Either way,
    floating tensors are cast to ``dtype`` except those whose name contains a part of the
    model's ``_keep_fp32`` class attribute, which stay fp32.

    Args:
        model_on_meta: the model, its parameters on the meta device.
        checkpoint: a checkpoint spec for :func:`resolve_path` (Wan original, diffusers or
            Self-Forcing format), or None for random weights.
        device: where the weights live.
        dtype: compute dtype of the weights, e.g. ``torch.bfloat16`` or ``"bfloat16"``.
        seed: seed of the random weights (ignored with a checkpoint).
        draw_on: the compute device when ``device`` is the CPU only as a staging place
            (``offload=blocks``, an idle expert): random weights are drawn there, so they equal
            a run resident on it, then moved to ``device``. When they do not fit in its free
            memory they are drawn on ``device`` instead, with a log line saying so.
        checkpoint_key: the entry of a training ``.pt`` envelope to load
            (``model.checkpoint_key``; see :func:`read_state_dict`).

    Returns:
        The same module, materialized on ``device``.

    Raises:
        CheckpointError: the checkpoint is missing, unreadable or does not match the model.
    """
    device, dtype = torch.device(device), as_dtype(dtype)
    if checkpoint is None:
        where = _draw_device(model_on_meta, device, draw_on, dtype)
        _init_random(model_on_meta, where, dtype, seed)
        if where != device:
            model_on_meta.to(device)
    else:
        convert = model_on_meta.convert_checkpoint  # the DiT contract; None: Wan's names
        state = read_state_dict(resolve_path(checkpoint, DIT_PATTERNS), convert, checkpoint_key)
        check_state_dict(model_on_meta, state, source=str(checkpoint))
        _assign(model_on_meta, state, device, dtype)
        log.info("loaded %s into %s", checkpoint, type(model_on_meta).__name__)
    _check_materialized(model_on_meta)
    return model_on_meta
