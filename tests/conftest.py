"""Shared fixtures: tiny Wan DiT with seeded random weights, Hydra compose helpers."""

from __future__ import annotations

import pytest
import torch

from flashdreams.model.wan import WanDiT

TINY = dict(dim=64, num_heads=4, num_layers=2, ffn_dim=128, text_dim=32, text_len=16)


def make_tiny_model(seed: int = 0, **overrides) -> WanDiT:
    """A tiny WanDiT in fp32 with seeded random weights."""
    model = WanDiT(**{**TINY, **overrides})
    model.init_weights(torch.Generator().manual_seed(seed))
    return model.eval().requires_grad_(False)


@pytest.fixture
def tiny_model() -> WanDiT:
    return make_tiny_model()


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
