"""Loading the two experts of a Wan 2.2 A14B model (``WanMoE``), each from its own checkpoint.

Layouts: the Wan original release (``high_noise_model/`` + ``low_noise_model/`` folders of
sharded safetensors) and diffusers / FastVideo (``transformer/`` + ``transformer_2/``). The
recipe names both folders (``model.checkpoint`` = high noise, ``model.low_noise_checkpoint`` =
low noise); a local root folder holding either pair may be given as ``model.checkpoint`` alone.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from flashdreams import ConfigError
from flashdreams.io.checkpoint import materialize

log = logging.getLogger(__name__)

LAYOUTS = (("high_noise_model", "low_noise_model"), ("transformer", "transformer_2"))


def expert_checkpoints(checkpoint, low_noise_checkpoint) -> tuple:
    """(high-noise spec, low-noise spec) from the two settings; (None, None) = random weights.

    ``model.checkpoint=null`` gives both experts random weights (as for every recipe, so the
    usual random-weight overrides work unchanged); the low-noise setting is then ignored.

    Raises:
        ConfigError: the high-noise expert has a checkpoint and the low-noise one cannot be
            derived.
    """
    if checkpoint is None:
        if low_noise_checkpoint is not None:
            log.warning("model.checkpoint=null: both experts get random weights; "
                        "model.low_noise_checkpoint=%s is ignored", low_noise_checkpoint)  # fmt: skip
        return None, None
    if low_noise_checkpoint is None and not str(checkpoint).startswith("hf://"):
        root = Path(os.fspath(checkpoint)).expanduser()
        for high, low in LAYOUTS:
            if (root / high).is_dir() and (root / low).is_dir():
                return str(root / high), str(root / low)
    if low_noise_checkpoint is None:
        raise ConfigError(
            f"model.low_noise_checkpoint=null with model.checkpoint={checkpoint}: name the "
            "low-noise expert's folder (low_noise_model/ or transformer_2/), or set "
            "model.checkpoint to a local folder holding both experts' folders"
        )
    return checkpoint, low_noise_checkpoint


def materialize_experts(model, checkpoint, low_noise_checkpoint, device: torch.device,
                        dtype: torch.dtype, seed: int):  # fmt: skip
    """Fill both experts of a meta-built ``WanMoE`` and place them (see ``WanMoE.place``).

    With ``model.offload_idle_expert`` the low-noise expert is loaded straight into CPU memory,
    so the device never holds both checkpoints. Random weights use ``seed`` and ``seed + 1``,
    drawn on ``device`` for both experts when they fit (the weights of a resident run).
    """
    specs = expert_checkpoints(checkpoint, low_noise_checkpoint)
    for i, (expert, spec) in enumerate(zip(model.experts, specs, strict=True)):
        where = torch.device("cpu") if model.offload_idle_expert and i > 0 else device
        materialize(expert, spec, device=where, dtype=dtype, seed=seed + i, draw_on=device)
    model.place(device)
    return model
