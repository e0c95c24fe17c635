"""Cosmos-Predict2.5 schedules: the distilled 4-step student (TrigFlow times, re-noised with the
initial noise) against the TrigFlow formulation it was trained in; the 35-step solver's exact
timesteps and diffusers' Karras schedule."""

from __future__ import annotations

import math

import pytest
import torch

from flashdreams import ConfigError
from flashdreams.scheduler.flow import FewStepFlowScheduler
from flashdreams.scheduler.solver import DiffusersFlowScheduler

TRIGFLOW_TIMES = [math.pi / 2, math.atan(15), math.atan(5), math.atan(5 / 3)]  # the student's


def _velocity(x, sigma):
    """A stand-in flow model: any smooth function of (x, sigma)."""
    return torch.tanh(x) * (1 + sigma) - 0.3 * x


def test_distilled_schedule_equals_trigflow_sampler():
    noise = torch.randn(2, 4, 3, 5, 5, dtype=torch.float64)
    # reference, in TrigFlow space: x_t = cos t x0 + sin t n; the RF model sees x / (cos + sin)
    # at sigma = sin / (cos + sin) and x0 = x_rf - sigma v; re-noise with the same n
    x = noise.clone()
    times = [*TRIGFLOW_TIMES, 0.0]
    for t, t_next in zip(times[:-1], times[1:], strict=True):
        c, s = math.cos(t), math.sin(t)
        sigma = s / (c + s)
        x_rf = x / (c + s)
        x0 = x_rf - sigma * _velocity(x_rf, sigma)
        x = math.cos(t_next) * x0 + math.sin(t_next) * noise if t_next > 0 else x0
    # ours: Self-Forcing's list warped by shift 5, renoise=initial
    sched = FewStepFlowScheduler([1000, 750, 500, 250], shift=5.0, renoise="initial")
    ts = sched.begin_block(torch.device("cpu"))
    torch.testing.assert_close(ts.double() / 1000, torch.tensor(
        [math.sin(t) / (math.cos(t) + math.sin(t)) for t in TRIGFLOW_TIMES], dtype=torch.float64))  # fmt: skip
    ours = noise.float()
    for i, t in enumerate(ts):
        ours = sched.step(_velocity(ours, float(t) / 1000), ours, i, lambda shape: 1 / 0)
    torch.testing.assert_close(ours.double(), x, rtol=0, atol=1e-5)


def test_renoise_errors():
    with pytest.raises(ConfigError, match="scheduler.renoise='x'"):
        FewStepFlowScheduler([1000, 500], renoise="x")


def test_exact_timesteps_and_karras():
    from diffusers import UniPCMultistepScheduler

    ref = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                  use_karras_sigmas=True, sigma_min=0.01, sigma_max=200.0)  # fmt: skip
    ref.set_timesteps(35)
    sched = DiffusersFlowScheduler("unipc", 35, exact_timesteps=True, karras_sigmas=[0.01, 200])
    ts = sched.begin_block(torch.device("cpu"))
    torch.testing.assert_close(ts, ref.sigmas[:35].float() * 1000)
    assert ts[0] == pytest.approx(1000 * 200 / 201, rel=1e-6)  # not rounded to an integer
    with pytest.raises(ConfigError, match="karras_sigmas"):
        DiffusersFlowScheduler("unipc", 35, karras_sigmas=[200, 0.01])
