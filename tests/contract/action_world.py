"""A test-only world model with a conditioning input the library has never seen: a per-frame
action vector, embedded and added to the time embedding (as HY-WorldPlay's action labels are).

It reaches the loop, the session and the server through the model contract and YAML only
(``conf/`` beside this file, on Hydra's search path via ``--config-dir`` /
``hydra.searchpath``): nothing in ``flashdreams`` knows about it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from flashdreams import ConfigError
from flashdreams.control.base import ControlEncoder
from flashdreams.model.base import ConditionInput
from flashdreams.model.wan import WanDiT


class ActionWanDiT(WanDiT):
    """A Wan DiT whose time embedding gets ``action_embedder(action)`` per latent frame.

    Args:
        action_dim: width of the per-frame action vector.
        **wan: the ``WanDiT`` arguments.
    """

    def __init__(self, action_dim: int = 4, **wan) -> None:
        super().__init__(**wan)
        self.action_dim = action_dim
        self.action_embedder = nn.Sequential(nn.Linear(action_dim, self.dim), nn.SiLU(),
                                             nn.Linear(self.dim, self.dim))  # fmt: skip

    def inputs(self) -> dict[str, ConditionInput]:
        return {**super().inputs(),
                "action": ConditionInput.per_frame("action", self.action_dim,
                                                   doc="per-frame action: control=action")}  # fmt: skip

    def condition_time(self, e: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        action = inputs["action"]  # (B, F, action_dim)
        emb = self.action_embedder(action.to(self.action_embedder[0].weight.dtype)).float()
        if e.shape[1] != emb.shape[1]:  # per-token timesteps: every token of a frame
            emb = emb.repeat_interleave(e.shape[1] // emb.shape[1], dim=1)
        return e + emb


class ActionControl(ControlEncoder):
    """Per-frame actions from a ``.npy`` [T, action_dim] file, then from live control
    (``{"action": [a0, a1, ...]}`` holds for the frames of the next step; none: zeros).

    Args:
        action_dim: width of the action vector.
        actions: path of the action file, or None.
    """

    def __init__(self, action_dim: int = 4, actions: str | None = None) -> None:
        super().__init__()
        self.action_dim, self.path = action_dim, actions
        self.file = None
        if actions is not None:
            if not Path(actions).is_file():
                raise ConfigError(f"control.actions={actions!r} does not exist")
            arr = np.load(actions)
            if arr.ndim != 2 or arr.shape[1] != action_dim:
                raise ConfigError(f"control.actions={actions!r}: expected [T, {action_dim}], "
                                  f"got {list(arr.shape)}")  # fmt: skip
            self.file = torch.from_numpy(arr.astype(np.float32))
        self.live = torch.zeros(action_dim)

    def provides(self) -> dict[str, ConditionInput]:
        return {"action": ConditionInput.per_frame("action", self.action_dim)}

    def check_frames(self, num_frames: int) -> None:
        if self.file is not None and len(self.file) < num_frames:
            raise ConfigError(f"control.actions={self.path!r} holds {len(self.file)} frames, "
                              f"the run needs {num_frames}")  # fmt: skip

    def prepare(self, batch, *, height, width, num_frames, device) -> None:
        self.batch, self.device = batch, device
        self.frames: list[torch.Tensor] = []
        self.live = torch.zeros(self.action_dim)

    def set_control(self, control: dict[str, Any] | None) -> None:
        value = (control or {}).get("action")
        if value is None:
            self.live = torch.zeros(self.action_dim)
            return
        if not isinstance(value, list) or len(value) != self.action_dim:
            raise ValueError(f"control action must be a list of {self.action_dim} numbers")
        self.live = torch.tensor([float(v) for v in value])

    def inputs(self, start: int, num: int) -> dict[str, torch.Tensor]:
        while len(self.frames) < start + num:  # frames keep the action they were made with
            f = len(self.frames)
            use_file = self.file is not None and f < len(self.file)
            self.frames.append(self.file[f] if use_file else self.live)
        rows = torch.stack(self.frames[start : start + num])  # (num, action_dim)
        return {"action": rows[None].expand(self.batch, -1, -1).to(self.device)}

    def state(self) -> dict[str, Any] | None:
        return {"action": [round(float(v), 4) for v in self.live]}
