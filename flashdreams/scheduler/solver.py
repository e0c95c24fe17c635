"""Many-step flow-matching solvers from diffusers (Euler, UniPC) for bidirectional recipes.

UniPC runs as a table of per-step coefficients (``UniPCPlan``): every scalar of diffusers'
``UniPCMultistepScheduler.step`` depends on the sigma schedule only, never on the latents, so
the table is computed once per schedule on the host, with diffusers' own float32 operations in
its order, and each step is then a few fused multiply-adds on the latents. diffusers' step, which
copies its sigmas to the latents' device several times per step (each a blocking copy that waits
for the queued forwards) and builds its coefficients as tiny device kernels, stays available as
``scheduler.device_steps=false``: the parity reference (``tests/unit/test_scheduler.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flashdreams import ConfigError
from flashdreams.scheduler.base import NoiseFn, Scheduler


class DiffusersFlowScheduler(Scheduler):
    """Wraps diffusers' flow-matching solvers behind the loop's scheduler protocol.

    Args:
        solver: ``euler`` (FlowMatchEulerDiscreteScheduler) or ``unipc``
            (UniPCMultistepScheduler with flow sigmas, as Wan's reference pipeline uses).
        num_steps: solver steps (model forwards per block).
        shift: flow shift of the sigma schedule.
        num_train_timesteps: training timesteps of the model (1000 for Wan).
        exact_timesteps: the model sees ``sigma * num_train_timesteps`` unrounded (Cosmos'
            pipelines pass sigma itself) instead of diffusers' int64 timesteps; the solver
            steps the same sigmas either way.
        karras_sigmas: UniPC only: ``[sigma_min, sigma_max]`` of an EDM Karras schedule mapped
            to flow sigmas ``s / (1 + s)`` (diffusers' Cosmos-Predict2.5 scheduler: [0.01, 200]),
            instead of the shifted linear one (``shift`` is then unused); None: shifted.
        device_steps: UniPC only: step from the precomputed coefficient table (no host syncs,
            no scalar kernels); False: diffusers' own ``step`` (same values to float32
            rounding; the reference).
    """

    def __init__(
        self, solver: str = "unipc", num_steps: int = 50, shift: float = 5.0,
        num_train_timesteps: int = 1000, exact_timesteps: bool = False,
        karras_sigmas: list[float] | None = None, device_steps: bool = True,
    ) -> None:  # fmt: skip
        if num_steps < 1:
            raise ConfigError(f"scheduler.num_steps={num_steps} must be >= 1")
        from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

        if solver == "euler":
            self.solver = FlowMatchEulerDiscreteScheduler(
                num_train_timesteps=num_train_timesteps, shift=shift
            )
        elif solver == "unipc":
            karras = {}
            if karras_sigmas is not None:
                if len(karras_sigmas) != 2 or not 0 < karras_sigmas[0] < karras_sigmas[1]:
                    raise ConfigError(f"scheduler.karras_sigmas={list(karras_sigmas)} must be "
                                      "[sigma_min, sigma_max] with 0 < sigma_min < sigma_max")  # fmt: skip
                karras = dict(use_karras_sigmas=True, sigma_min=float(karras_sigmas[0]),
                              sigma_max=float(karras_sigmas[1]))  # fmt: skip
            self.solver = UniPCMultistepScheduler(
                num_train_timesteps=num_train_timesteps, prediction_type="flow_prediction",
                use_flow_sigmas=True, flow_shift=shift, **karras,
            )  # fmt: skip
        else:
            raise ConfigError(f"scheduler.solver={solver!r} is not one of ['euler', 'unipc']")
        if karras_sigmas is not None and solver != "unipc":
            raise ConfigError("scheduler.karras_sigmas needs scheduler.solver=unipc")
        self.num_steps = num_steps
        self.exact_timesteps = exact_timesteps
        self.num_train_timesteps = num_train_timesteps
        self._timesteps: torch.Tensor | None = None
        self.device_steps = bool(device_steps) and solver == "unipc"
        self._plan: UniPCPlan | None = None
        self._history: list[torch.Tensor | None] = []
        self._last: torch.Tensor | None = None

    def begin_block(self, device: torch.device) -> torch.Tensor:
        self.solver.set_timesteps(self.num_steps, device=device)
        self._timesteps = self.solver.timesteps
        if self.device_steps:
            sigmas = self.solver.sigmas
            if self._plan is None or not torch.equal(self._plan.sigmas, sigmas):
                self._plan = UniPCPlan(self.solver.config, sigmas)
            self._history = [None] * self._plan.order
            self._last = None
        if self.exact_timesteps:
            sigmas = self.solver.sigmas[: len(self._timesteps)].to(device)
            return sigmas.float() * self.num_train_timesteps
        return self._timesteps.float()

    def step(self, flow, x, index, noise_fn: NoiseFn):
        if self._plan is not None and self.device_steps:
            return self._plan_step(flow.float(), x.float(), index)
        t = self._timesteps[index]
        return self.solver.step(flow.float(), t, x.float(), return_dict=False)[0]

    def _plan_step(self, flow: torch.Tensor, x: torch.Tensor, index: int) -> torch.Tensor:
        """diffusers' ``UniPCMultistepScheduler.step`` from the table: x0 from the flow, the
        UniC corrector on the previous predictor's output, then the UniP predictor."""
        step = self._plan.steps[index]
        model = x - step.sigma * flow  # flow prediction -> x0
        if step.corrector is not None:
            x = step.corrector.apply(self._last, self._history, model)
        self._history = [*self._history[1:], model]
        self._last = x
        return step.predictor.apply(x, self._history, None)


@dataclass(frozen=True)
class _Update:
    """One UniP / UniC update: ``cx * x - cm * m0 - cb * (sum_k rho_k D1_k + rho_t D1_t)`` with
    ``D1_k = (m_{-(k+2)} - m0) / rk_k`` over the history of x0 predictions (oldest first)."""

    cx: float  # sigma_t / sigma_s0
    cm: float  # alpha_t * h_phi_1
    cb: float  # alpha_t * B(h)
    rks: tuple[float, ...]  # one per older model output used
    rhos: tuple[float, ...]  # their weights
    rho_t: float | None  # corrector: weight of (model_t - m0)

    def apply(self, x, history, model_t):
        m0 = history[-1]
        out = self.cx * x - self.cm * m0
        res = None
        for k, (rk, rho) in enumerate(zip(self.rks, self.rhos, strict=True)):
            term = rho * ((history[-(k + 2)] - m0) / rk)
            res = term if res is None else res + term
        if model_t is not None:
            term = self.rho_t * (model_t - m0)
            res = term if res is None else res + term
        return out if res is None else out - self.cb * res


@dataclass(frozen=True)
class _Step:
    sigma: float
    corrector: _Update | None
    predictor: _Update


class UniPCPlan:
    """The coefficients of every step of diffusers' UniPC (B(h) variants, x0 prediction, flow
    sigmas) for one sigma schedule, computed as its ``step`` computes them: float32 scalar
    tensors, the same operations in the same order, on the host."""

    def __init__(self, config, sigmas: torch.Tensor) -> None:
        if not (config.use_flow_sigmas and config.prediction_type == "flow_prediction"
                and config.predict_x0 and not config.thresholding
                and config.solver_type in ("bh1", "bh2")):  # fmt: skip
            raise ConfigError("scheduler.device_steps=true covers UniPC with flow sigmas, "
                              "x0 prediction and B(h); set scheduler.device_steps=false")  # fmt: skip
        self.sigmas = sigmas.detach().to("cpu", torch.float32).clone()
        self.order = int(config.solver_order)
        self._bh2 = config.solver_type == "bh2"
        n = len(self.sigmas) - 1  # the schedule ends with the final sigma
        disabled = set(config.disable_corrector or ())
        steps, lower, this_order = [], 0, None
        for s in range(n):
            corrector = None
            if s > 0 and s - 1 not in disabled:
                corrector = self._update(s, s - 1, this_order, corrector=True)
            this_order = min(self.order, n - s) if config.lower_order_final else self.order
            this_order = min(this_order, lower + 1)
            predictor = self._update(s + 1, s, this_order, corrector=False)
            lower += lower < self.order  # diffusers' lower_order_nums: multistep warm-up
            steps.append(_Step(float(self.sigmas[s]), corrector, predictor))
        self.steps = steps

    def _lambda(self, index: int) -> torch.Tensor:
        sigma = self.sigmas[index]
        return torch.log(1 - sigma) - torch.log(sigma)  # flow sigmas: alpha = 1 - sigma

    def _update(self, t: int, s0: int, order: int, corrector: bool) -> _Update:
        sigma_t, sigma_s0 = self.sigmas[t], self.sigmas[s0]
        alpha_t = 1 - sigma_t
        lambda_s0 = self._lambda(s0)
        h = self._lambda(t) - lambda_s0
        rks = [(self._lambda(s0 - i) - lambda_s0) / h for i in range(1, order)]
        hh = -h  # x0 prediction
        h_phi_1 = torch.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        b_h = torch.expm1(hh) if self._bh2 else hh
        rk_all = torch.stack([*rks, torch.ones(())])
        rows, b, factorial = [], [], 1
        for i in range(1, order + 1):
            rows.append(torch.pow(rk_all, i - 1))
            b.append(h_phi_k * factorial / b_h)
            factorial *= i + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        r, b = torch.stack(rows), torch.stack(b)
        rho_t = None
        if corrector:
            rhos = torch.full((1,), 0.5) if order == 1 else torch.linalg.solve(r, b)
            rho_t, rhos = float(rhos[-1]), rhos[:-1]
        elif order == 1:
            rhos = torch.zeros(0)
        else:
            rhos = torch.full((1,), 0.5) if order == 2 else torch.linalg.solve(r[:-1, :-1], b[:-1])
        return _Update(cx=float(sigma_t / sigma_s0), cm=float(alpha_t * h_phi_1),
                       cb=float(alpha_t * b_h), rks=tuple(float(v) for v in rks),
                       rhos=tuple(float(v) for v in rhos), rho_t=rho_t)  # fmt: skip
