"""Cosmos-Predict2.5's guidance form: ``cond + g * (cond - uncond)`` (``guidance.anchor=cond``)."""

from __future__ import annotations

import pytest
import torch

from flashdreams import ConfigError
from flashdreams.guidance.cfg import ClassifierFreeGuidance

COND, UNCOND = [(torch.tensor([2.0]),)], [(torch.tensor([0.5]),)]  # one layer's "K/V": a factor


def _forward(x, t, ctx):
    """A stand-in DiT: the flow is x times the context's factor (per batch row when batched)."""
    return x * ctx[0][0].view(-1, 1, 1, 1, 1)


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("anchor", ["cond", "uncond"])
def test_anchor_gives_its_formula(anchor, batched):
    x = torch.randn(1, 4, 2, 3, 3)
    guide = ClassifierFreeGuidance(scale=7.0, batched=batched, anchor=anchor)
    flow = guide.predict(_forward, x, torch.zeros(1, 2), guide.prepare(COND, UNCOND), 0)
    cond, uncond = 2.0 * x, 0.5 * x
    base = cond if anchor == "cond" else uncond
    torch.testing.assert_close(flow, base + 7.0 * (cond - uncond))


def test_unknown_anchor_is_one_line_config_error():
    with pytest.raises(ConfigError, match="guidance.anchor='x'"):
        ClassifierFreeGuidance(anchor="x")
