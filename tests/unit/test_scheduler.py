"""Schedulers: the warped Self-Forcing timesteps and exact x0 recovery on a synthetic flow."""

import pytest
import torch

from flashdreams import ConfigError
from flashdreams.scheduler.euler_list import EulerListScheduler
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


@pytest.mark.parametrize("make", [lambda: FewStepFlowScheduler([1000, 750, 500], shift=5.0),
                                  lambda: EulerListScheduler([1000, 750, 500], shift=8.0,
                                                             warp=True)])  # fmt: skip
def test_fixed_timesteps_reach_the_device_once(make, monkeypatch):
    """A fixed list is copied to the device on the first block only: a host list copied per
    block is a blocking copy that waits for the GPU's queue (the step could not run ahead)."""
    sched = make()
    first = sched.begin_block(torch.device("cpu"))
    made = []
    tensor = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: made.append(a) or tensor(*a, **k))
    again = sched.begin_block(torch.device("cpu"))
    assert again is first and not made
    assert again.dtype == torch.float32 and again.tolist() == pytest.approx(sched.timesteps)


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


# ---------------------------------------------------------------- vendor grids (issue 30)
def _wan_unipc_reference(shift: float):
    """cshang-rbx/lingbot-world's lookups, written out from its semantics (not its code):
    FlowUniPCMultistepScheduler(shift=1).set_timesteps(1000, shift) gives float32 sigmas and
    int64 timesteps; x0 takes argmin |t_i - t| (the first tie), add_noise the second tie."""
    import numpy as np

    sigma_max = float(np.float32(1.0 - 0.001))
    raw = np.linspace(sigma_max, 0.0, 1001)[:-1]
    warped = shift * raw / (1 + (shift - 1) * raw)
    steps = torch.from_numpy(warped * 1000).to(torch.int64)
    levels = torch.from_numpy(warped.astype(np.float32))

    def x0_level(t):
        return float(levels[int(torch.argmin((steps - t).abs()))])

    def renoise_level(t):
        ties = (steps == t).nonzero().flatten()
        return float(levels[int(ties[1] if len(ties) > 1 else ties[0])])

    return steps, x0_level, renoise_level


LINGBOT_STEPS = [999.0, 820.179, 641.358, 320.679]  # conf/scheduler/lingbot_fast.yaml


def test_lingbot_levels_are_the_vendors_first_and_second_grid_ties():
    sched = FewStepFlowScheduler(LINGBOT_STEPS, shift=10.0, grid="wan_unipc")
    steps, x0_level, renoise_level = _wan_unipc_reference(10.0)
    assert sched.timesteps == [float(steps[i]) for i in (0, 179, 358, 679)]
    assert sched.timesteps == [999.0, 978.0, 947.0, 825.0]
    # x0: the first grid entry of each integer timestep (pinned: a change here changes the
    # model the checkpoint was distilled as)
    assert sched.sigmas == [x0_level(t) for t in sched.timesteps]
    assert sched.sigmas == pytest.approx([0.99989992, 0.97897100, 0.94790888, 0.82585257], abs=1e-8)
    # re-noising: the second entry of the next step's integer timestep
    assert sched.renoise_sigmas[1:] == [renoise_level(t) for t in sched.timesteps[1:]]
    assert sched.renoise_sigmas[1:] == pytest.approx([0.97882956, 0.94769305, 0.82519257],
                                                     abs=1e-8)  # fmt: skip
    exact = FewStepFlowScheduler(LINGBOT_STEPS, shift=10.0, integer_timesteps=True)
    assert exact.timesteps == sched.timesteps  # same model timesteps, other levels
    assert max(abs(a - b) for a, b in zip(exact.sigmas, sched.sigmas, strict=True)) > 8e-4


def test_lingbot_step_converts_with_the_first_tie_and_renoises_with_the_second():
    sched = FewStepFlowScheduler(LINGBOT_STEPS, shift=10.0, grid="wan_unipc")
    gen = torch.Generator().manual_seed(0)
    x, flow, fresh = (torch.randn(1, 16, 3, 4, 4, generator=gen) for _ in range(3))
    for i in range(sched.num_steps):
        out = sched.step(flow, x, i, lambda shape: fresh)
        x0 = (x.double() - sched.sigmas[i] * flow.double()).float()  # the vendor's float64
        if i + 1 == sched.num_steps:
            torch.testing.assert_close(out, x0, rtol=0, atol=0)
            continue
        s = torch.tensor(sched.renoise_sigmas[i + 1], dtype=torch.float32)
        torch.testing.assert_close(out, (1 - s) * x0 + s * fresh, rtol=0, atol=0)
        # the exact-sigma sampler differs measurably on the same inputs
        other = FewStepFlowScheduler(LINGBOT_STEPS, shift=10.0).step(flow, x, i, lambda s_: fresh)
        assert (other - out).abs().max() > 1e-4


def test_lingbot_recipe_uses_the_vendor_grid():
    from tests.unit.test_config import compose_run

    for recipe in ("lingbot_world_fast", "lingbot_world_fast_taehv_window15_sink3"):
        cfg = compose_run([f"recipe={recipe}"])
        assert cfg.scheduler.grid == "wan_unipc" and cfg.scheduler.shift == 10.0


def test_grid_rejects_timesteps_off_the_grid_and_unwarped_lists():
    with pytest.raises(ConfigError, match="scheduler.timesteps holds 820.5"):
        FewStepFlowScheduler([999.0, 820.5], shift=10.0, grid="wan_unipc")
    with pytest.raises(ConfigError, match="scheduler.grid=wan_unipc needs scheduler.warp=true"):
        FewStepFlowScheduler(LINGBOT_STEPS, shift=10.0, warp=False, grid="wan_unipc")
    with pytest.raises(ConfigError, match="scheduler.grid='unipc'"):
        FewStepFlowScheduler(LINGBOT_STEPS, grid="unipc")
    with pytest.raises(ConfigError, match="scheduler.latent_dtype='fp8'"):
        FewStepFlowScheduler(LINGBOT_STEPS, latent_dtype="fp8")


DMD_STEPS = [1000, 850, 700, 550, 350, 275, 200, 125]  # FastVideo's dmd_denoising_steps


def _self_forcing_reference(shift: float):
    """FastVideo's causal DMD stage on SelfForcingFlowMatchScheduler(num_inference_steps=1000,
    shift, sigma_min=0, extra_one_step=True), written out from its semantics: float32 grid,
    timesteps = cat(grid timesteps, [0])[1000 - step], every level from the nearest entry."""
    sig = torch.linspace(1.0, 0.0, 1001)[:-1]
    sig = shift * sig / (1 + (shift - 1) * sig)
    grid_t = sig * 1000
    steps = torch.cat([grid_t, torch.tensor([0.0])])[1000 - torch.tensor(DMD_STEPS)]

    def level(t):  # (B, 1, 1, 1)-shaped in the stage: it promotes bf16 samples to float32
        return sig[torch.argmin((grid_t - t).abs())].reshape(1, 1, 1, 1, 1)

    return steps, level


def test_causal_wan22_timesteps_and_levels_come_from_the_checkpoint_grid():
    sched = FewStepFlowScheduler(DMD_STEPS, shift=5.0, boundary=0.875, grid="self_forcing")
    steps, level = _self_forcing_reference(5.0)
    assert sched.timesteps == steps.tolist()
    assert sched.timesteps == pytest.approx([1000, 965.909, 921.053, 859.375, 729.167, 654.762,
                                             555.556, 416.667], abs=1e-3)  # fmt: skip
    assert sched.sigmas == [level(t).item() for t in steps]
    assert sched.renoise_sigmas == sched.sigmas  # nearest entry for both conversions
    assert sched.boundary_sigma == level(875.0).item() == pytest.approx(0.874850, abs=1e-6)
    assert sched.boundary_sigma != 0.875  # the nearest grid entry, not the ratio


def _fastvideo_step(x, flow, i, steps, level, noise):
    """One step of FastVideo's stage with a bf16 DiT output (x0 / x_bound keep its dtype)."""
    s, b = level(steps[i]), level(875.0)
    high = steps[i] >= 875.0
    pred = (x.double() - (s - (b if high else 0)).double() * flow.double()).bfloat16()
    if i + 1 == len(steps) or (high and steps[i + 1] < 875.0):
        return pred.float()
    nxt = level(steps[i + 1])
    if high:  # add_noise_high
        a = (1 - nxt) / (1 - b)
        return (a * pred + torch.sqrt(nxt**2 - (a * b) ** 2) * noise).bfloat16().float()
    return ((1 - nxt) * pred + nxt * noise).bfloat16().float()  # add_noise


def test_causal_wan22_steps_round_to_bf16_like_fastvideo():
    sched = FewStepFlowScheduler(DMD_STEPS, shift=5.0, boundary=0.875, grid="self_forcing",
                                 latent_dtype="bfloat16")  # fmt: skip
    steps, level = _self_forcing_reference(5.0)
    gen = torch.Generator().manual_seed(1)
    x, flow, fresh = (torch.randn(1, 16, 3, 4, 4, generator=gen) for _ in range(3))
    noise = fresh.bfloat16()  # FastVideo draws bf16 noise (the prediction's dtype)
    for i in range(sched.num_steps):  # 3 bridge steps, the hand-over, 4 re-noised low steps
        out = sched.step(flow, x, i, lambda shape: fresh)
        ref = _fastvideo_step(x, flow, i, steps, level, noise)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
        assert torch.equal(out, out.bfloat16().float())
        unrounded = FewStepFlowScheduler(DMD_STEPS, shift=5.0, boundary=0.875, grid="self_forcing")
        assert not torch.equal(unrounded.step(flow, x, i, lambda shape: fresh), out)


# ------------------------------------------------ UniPC from its coefficient table (issue 26)
def _integrate(sched, x, flow_fn):
    sched.begin_block(torch.device("cpu"))
    out = []
    for i in range(sched.num_steps):
        x = sched.step(flow_fn(x, i), x, i, None)
        out.append(x)
    return out


@pytest.mark.parametrize(
    "steps, kwargs",
    [(50, {"shift": 5.0}), (35, {"karras_sigmas": [0.01, 200], "exact_timesteps": True}),
     (40, {"shift": 12.0}), (1, {}), (2, {}), (3, {"shift": 3.0})],
)  # fmt: skip
def test_unipc_table_steps_equal_diffusers_step(steps, kwargs):
    """The table (``device_steps=true``, the default) against diffusers' own ``step`` on a flow
    that depends on the latent (so the corrector and the multistep history matter): every
    intermediate latent equal to float32 rounding, on Wan's 50-step, Cosmos' Karras 35-step and
    the one- to three-step schedules (the lower-order start and end)."""
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 3, 8, 8, generator=gen), torch.randn(2, 4, 3, 8, 8, generator=gen)

    def flow(x, i):  # a latent-dependent "model": pulls toward x0 with a step-dependent twist
        return (noise - x0) + 0.3 * torch.tanh(x) * (1 + 0.05 * i)

    ours = _integrate(DiffusersFlowScheduler("unipc", steps, **kwargs), noise.clone(), flow)
    ref = _integrate(DiffusersFlowScheduler("unipc", steps, device_steps=False, **kwargs),
                     noise.clone(), flow)  # fmt: skip
    for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"step {i}")


def test_unipc_table_steps_make_no_device_copies(monkeypatch):
    """A step is elementwise math on the latents with host floats: it never copies a tensor
    between devices (on a GPU each such copy waits for the queued forwards)."""
    sched = DiffusersFlowScheduler("unipc", 6)
    x = torch.randn(1, 4, 1, 4, 4)
    sched.begin_block(torch.device("cpu"))
    moved = []
    to = torch.Tensor.to
    monkeypatch.setattr(
        torch.Tensor, "to", lambda self, *a, **k: moved.append(a) or to(self, *a, **k)
    )
    for i in range(6):
        x = sched.step(x * 0.1, x, i, None)
    assert not moved
    assert sched.device_steps and not DiffusersFlowScheduler("euler", 6).device_steps
