"""Schedulers: the warped Self-Forcing timesteps and exact x0 recovery on a synthetic flow."""

import pytest
import torch

from flashdreams import ConfigError
from flashdreams.scheduler.flow import FewStepFlowScheduler, warp_timesteps
from flashdreams.scheduler.solver import DiffusersFlowScheduler


def test_self_forcing_warp():
    got = warp_timesteps([1000, 750, 500, 250], shift=5.0)
    assert got == pytest.approx([1000.0, 937.5, 833.3333, 625.0], abs=1e-3)


def test_one_step_x0_recovery_is_exact_and_renoise_uses_fresh_noise():
    sched = FewStepFlowScheduler([1000, 750, 500, 250], shift=5.0)
    x0 = torch.randn(1, 4, 2, 3, 3)
    eps = torch.randn_like(x0)
    ts = sched.begin_block(torch.device("cpu"))
    sigma = float(ts[1]) / 1000
    x_t = (1 - sigma) * x0 + sigma * eps
    fresh = torch.randn_like(x0)
    out = sched.step(eps - x0, x_t, 1, lambda shape: fresh)  # the exact flow
    s2 = float(ts[2]) / 1000
    torch.testing.assert_close(out, (1 - s2) * x0 + s2 * fresh, rtol=0, atol=1e-6)
    last = sched.step(eps - x0, (1 - 0.625) * x0 + 0.625 * eps, 3, None)  # final: pure x0
    torch.testing.assert_close(last, x0, rtol=0, atol=1e-6)


def test_bad_timesteps_are_clear_errors():
    with pytest.raises(ConfigError, match="scheduler.timesteps"):
        FewStepFlowScheduler([250, 500])


@pytest.mark.parametrize("solver", ["euler", "unipc"])
def test_diffusers_solvers_integrate_a_constant_flow_exactly(solver):
    sched = DiffusersFlowScheduler(solver=solver, num_steps=8, shift=3.0)
    x0 = torch.randn(1, 4, 1, 4, 4)
    eps = torch.randn_like(x0)
    x = eps.clone()
    sched.begin_block(torch.device("cpu"))
    for i in range(sched.num_steps):
        x = sched.step(eps - x0, x, i, None)
    torch.testing.assert_close(x, x0, rtol=0, atol=1e-4)
