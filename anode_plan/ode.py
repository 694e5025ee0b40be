"""``ODEBlock``: a residual block written as a fixed-step ODE solve, the unit anode-plan plans.

A ResNet block ``z + f(z)`` is one forward-Euler step of dz/dt = f(t, z). An
``ODEBlock`` integrates ``func`` over ``t_span`` with ``nt`` fixed steps of Euler,
RK2 (explicit midpoint) or RK4 (classical), as in ANODE (Gholami, Keutzer and Biros,
IJCAI 2019, arXiv 1902.10298). Without the compiler it is an ordinary module whose
backward is plain autograd through every step. ``anode_plan.compile`` sees each block
as ``nt`` stages and runs them one at a time through :meth:`ODEBlock.step`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from anode_plan.errors import ODEBlockConfigError, ODEFunctionError

METHODS = {"euler": 1, "rk2": 2, "rk4": 4}


class ODEBlock(nn.Module):
    """Integrate dz/dt = func(t, z) with ``nt`` fixed steps of ``method``.

    Use it wherever a residual block would go: ``ODEBlock(f, nt=1, method="euler")``
    computes exactly ``z + f(0, z)``. Larger ``nt`` gives a finer discretisation of the
    same ODE. For adaptive solvers use torchdiffeq instead; anode-plan plans fixed steps.

    Args:
        func: an ``nn.Module`` called as ``func(t, z)`` (the torchdiffeq convention), where
            ``t`` is a 0-dim tensor of ``z``'s dtype and device. It must return a tensor of
            ``z``'s shape.
        nt: the number of time steps, a positive int.
        method: ``"euler"``, ``"rk2"`` (explicit midpoint) or ``"rk4"`` (classical).
        t_span: the integration interval ``(t0, t1)``; the step is ``(t1 - t0) / nt``.
    """

    def __init__(self, func: nn.Module, nt: int, method: str = "euler",
                 t_span: tuple[float, float] = (0.0, 1.0)) -> None:
        super().__init__()
        if not isinstance(func, nn.Module):
            raise ODEBlockConfigError(f"ODEBlock(func=...) must be an nn.Module called as func(t, z), got "
                                      f"{type(func).__name__}. Wrap a function in a small nn.Module.")
        if isinstance(nt, bool) or not isinstance(nt, int) or nt < 1:
            raise ODEBlockConfigError(f"ODEBlock(nt={nt!r}): nt is the number of fixed time steps and must be "
                                      "a positive int, e.g. nt=8")
        if method not in METHODS:
            raise ODEBlockConfigError(f"ODEBlock(method={method!r}) is not a known method; use one of "
                                      f"{sorted(METHODS)}")
        t0, t1 = (float(t) for t in t_span)
        if not (math.isfinite(t0) and math.isfinite(t1)) or t0 == t1:
            raise ODEBlockConfigError(f"ODEBlock(t_span={t_span!r}) must be two different finite times")
        self.func = func
        self.nt = nt
        self.method = method
        self.t_span = (t0, t1)

    @property
    def dt(self) -> float:
        return (self.t_span[1] - self.t_span[0]) / self.nt

    @property
    def stages_per_step(self) -> int:
        """Evaluations of ``func`` per step: 1 (Euler), 2 (RK2) or 4 (RK4)."""
        return METHODS[self.method]

    def time(self, step_idx: int) -> float:
        return self.t_span[0] + step_idx * self.dt

    def _f(self, t: float, z: torch.Tensor) -> torch.Tensor:
        out = self.func(torch.full((), t, dtype=z.dtype, device=z.device), z)
        if not isinstance(out, torch.Tensor) or out.shape != z.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ODEFunctionError(
                f"{type(self.func).__name__}.forward(t, z) returned {got} for z of shape {tuple(z.shape)}; an ODE "
                "function must return dz/dt with the same shape as z (check strides, padding and channel counts)")
        return out

    def step(self, step_idx: int, z: torch.Tensor) -> torch.Tensor:
        """Advance ``z`` by time step ``step_idx`` (0-based): one stage of the compiled chain."""
        if not 0 <= step_idx < self.nt:
            raise IndexError(f"step_idx {step_idx} is outside [0, {self.nt}) for this ODEBlock")
        t, dt = self.time(step_idx), self.dt
        if self.method == "euler":
            return z + dt * self._f(t, z)
        if self.method == "rk2":
            k1 = self._f(t, z)
            return z + dt * self._f(t + dt / 2, z + (dt / 2) * k1)
        k1 = self._f(t, z)
        k2 = self._f(t + dt / 2, z + (dt / 2) * k1)
        k3 = self._f(t + dt / 2, z + (dt / 2) * k2)
        k4 = self._f(t + dt, z + dt * k3)
        return z + (dt / 6) * (k1 + 2 * k2 + 2 * k3 + k4)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if not isinstance(z, torch.Tensor) or not z.is_floating_point():
            raise ODEFunctionError(f"ODEBlock input must be a floating-point tensor, got "
                                   f"{getattr(z, 'dtype', type(z).__name__)}")
        for step_idx in range(self.nt):
            z = self.step(step_idx, z)
        return z

    def extra_repr(self) -> str:
        return f"nt={self.nt}, method={self.method!r}, t_span={self.t_span}"
