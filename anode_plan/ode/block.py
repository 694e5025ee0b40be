"""``ODEBlock``: a residual block written as a fixed-step ODE solve, the unit anode-plan plans.

A ResNet block ``z + f(z)`` is one forward-Euler step of dz/dt = f(t, z). An
``ODEBlock`` integrates ``func`` over ``t_span`` with ``nt`` fixed steps of Euler,
RK2 (explicit midpoint) or RK4 (classical), as in ANODE (Gholami, Keutzer and Biros,
IJCAI 2019, arXiv 1902.10298). Without the compiler it is an ordinary module whose
backward is plain autograd through every step. ``anode_plan.compile`` sees each block
as ``nt`` stages and runs them one at a time through :meth:`ODEBlock.step`.

The state may be one tensor or a tuple of tensors (an augmented state, as in
torchdiffeq), and the block may take extra tensors that stay constant over the solve
(``block(z, context)`` calls ``func(t, z, context)``).

Background, papers and test values: ``docs/algorithms.md`` §1.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch._subclasses.fake_tensor import is_fake_tensor

from anode_plan.errors import NonFiniteStateError, ODEBlockConfigError, ODEFunctionError
from anode_plan.ode.solve import odeint
from anode_plan.ode.tableaus import TABLEAUS

METHODS = {"euler": 1, "rk2": 2, "rk4": 4, "reversible_heun": 1, "alf": 1}
#: Methods whose steps can be inverted: the state before a step is computed from the state
#: after it (to rounding), so backward may rebuild states instead of keeping them.
REVERSIBLE = frozenset({"reversible_heun", "alf"})
#: What a reversible method carries from step to step, in order (the first is the solution).
CARRIED = {"reversible_heun": ("y", "z_hat", "f"), "alf": ("y", "v")}
#: Adaptive methods (:mod:`anode_plan.ode.tableaus`): the block is one stage, solved by :func:`anode_plan.odeint`.
ADAPTIVE = tuple(TABLEAUS)

State = torch.Tensor | tuple[torch.Tensor, ...]


def _map(fn, *states: State) -> State:
    """Apply ``fn`` to a tensor state, or component by component to a tuple state."""
    if isinstance(states[0], torch.Tensor):
        return fn(*states)
    return tuple(fn(*parts) for parts in zip(*states))


def _rk4_slope(k1: torch.Tensor, k2: torch.Tensor, k3: torch.Tensor, k4: torch.Tensor) -> torch.Tensor:
    """``k1 + 2·k2 + 2·k3 + k4``, the weights as ``alpha`` (no wrapped-number tensors)."""
    return torch.add(torch.add(k1, k2, alpha=2), k3, alpha=2) + k4


def _components(z: State) -> tuple[torch.Tensor, ...]:
    return (z,) if isinstance(z, torch.Tensor) else tuple(z)


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return str(tuple(value.shape))
    if isinstance(value, (tuple, list)):
        shapes = [tuple(c.shape) if isinstance(c, torch.Tensor) else type(c).__name__ for c in value]
        return f"a tuple of {len(shapes)}: {shapes}"
    return type(value).__name__


class ODEBlock(nn.Module):
    """Integrate dz/dt = func(t, z) with ``nt`` fixed steps of ``method``.

    Use it wherever a residual block would go: ``ODEBlock(f, nt=1, method="euler")``
    computes exactly ``z + f(0, z)``. Larger ``nt`` gives a finer discretisation of the
    same ODE. ``ODEBlock(f, method="dopri5", rtol=1e-5, atol=1e-7)`` solves adaptively
    instead (no ``nt``; :func:`anode_plan.odeint`): under the compiler the block is one
    stage, given the budget the rest of the plan leaves as checkpoints, and it checkpoints
    online inside them, whatever number of steps it takes.

    Call it as ``block(z)`` with a floating tensor, or with a tuple of floating tensors
    (an augmented state; the Runge-Kutta arithmetic is applied to each component and a
    tuple of the same shapes is returned), optionally followed by tensors that stay
    constant over the solve: ``block(z, c)`` calls ``func(t, z, c)`` at every stage, and
    ``c`` gets gradients like any input.

    Args:
        func: an ``nn.Module`` called as ``func(t, z, *context)`` (the torchdiffeq
            convention), where ``t`` is a 0-dim tensor of ``z``'s dtype and device. It must
            return dz/dt: a tensor of ``z``'s shape, or for a tuple state a tuple of the
            components' shapes. It must not write into ``z`` in place.
        nt: the number of time steps, a positive int.
        method: ``"euler"``, ``"rk2"`` (explicit midpoint), ``"rk4"`` (classical), or
            one of the reversible methods ``"reversible_heun"`` and ``"alf"`` (see the
            module docstring: they carry more than ``z``, and the compiler may rebuild
            their states backwards instead of keeping them).
        t_span: the integration interval ``(t0, t1)``; the step is ``(t1 - t0) / nt``.
        rtol, atol, max_num_steps: for an adaptive method, its tolerances and step limit.
        check_finite: after every step, check that the state has no NaN or infinity and
            raise :class:`~anode_plan.NonFiniteStateError` naming the step if it does.
            Off by default: the check reads a value back from the device once per step,
            which stalls a GPU pipeline. A fixed-step solve never hangs on NaN (it takes
            exactly ``nt`` steps); turn this on to find where a NaN loss comes from.
    """

    def __init__(self, func: nn.Module, nt: int | None = None, method: str = "euler",
                 t_span: tuple[float, float] = (0.0, 1.0), *, check_finite: bool = False, rtol: float = 1e-7,
                 atol: float = 1e-9, max_num_steps: int = 2**31 - 1) -> None:
        super().__init__()
        if not isinstance(func, nn.Module):
            raise ODEBlockConfigError(f"ODEBlock(func=...) must be an nn.Module called as func(t, z), got "
                                      f"{type(func).__name__}. Wrap a function in a small nn.Module.")
        self.rtol, self.atol, self.max_num_steps = float(rtol), float(atol), int(max_num_steps)
        #: With an adaptive method, how many checkpoints a solve keeps (``None``: every state); the compiler sets it.
        self.checkpoints: int | None = None
        if method in ADAPTIVE:
            if nt is not None:
                raise ODEBlockConfigError(f"ODEBlock(nt={nt!r}, method={method!r}): an adaptive method chooses its "
                                          "own steps; leave nt out (or pick a fixed-step method such as 'rk4')")
            nt = 1
        if isinstance(nt, bool) or not isinstance(nt, int) or nt < 1:
            raise ODEBlockConfigError(f"ODEBlock(nt={nt!r}): nt is the number of fixed time steps and must be "
                                      "a positive int, e.g. nt=8")
        if method not in METHODS and method not in ADAPTIVE:
            raise ODEBlockConfigError(f"ODEBlock(method={method!r}) is not a known method; use one of "
                                      f"{list(METHODS)} (fixed steps; the last two are reversible) or "
                                      f"{list(ADAPTIVE)} (adaptive)")
        t0, t1 = (float(t) for t in t_span)
        if not (math.isfinite(t0) and math.isfinite(t1)) or t0 == t1:
            raise ODEBlockConfigError(f"ODEBlock(t_span={t_span!r}) must be two different finite times")
        self.func = func
        self.nt = nt
        self.method = method
        self.t_span = (t0, t1)
        self.check_finite = bool(check_finite)

    @property
    def dt(self) -> float:
        return (self.t_span[1] - self.t_span[0]) / self.nt

    @property
    def adaptive(self) -> bool:
        """Whether the block solves adaptively (one stage, :func:`anode_plan.odeint` inside)."""
        return self.method in ADAPTIVE

    @property
    def reversible(self) -> bool:
        """Whether a step can be inverted (:meth:`inverse_step`)."""
        return self.method in REVERSIBLE

    @property
    def stages_per_step(self) -> int:
        """Evaluations of ``func`` per step: 1 (Euler), 2 (RK2) or 4 (RK4); per accepted step when adaptive (the
        tableau's stages less the one shared with the next step: 6 for dopri5 and tsit5, 3 for bosh3)."""
        return TABLEAUS[self.method].stages - 1 if self.adaptive else METHODS[self.method]

    def time(self, step_idx: int) -> float:
        return self.t_span[0] + step_idx * self.dt

    def _f(self, t: float, z: State, context: tuple[torch.Tensor, ...]) -> State:
        first = _components(z)[0]
        out = self.func(torch.full((), t, dtype=first.dtype, device=first.device), z, *context)
        if isinstance(z, torch.Tensor):
            ok = isinstance(out, torch.Tensor) and out.shape == z.shape
        else:
            out = tuple(out) if isinstance(out, (tuple, list)) else out
            ok = isinstance(out, tuple) and len(out) == len(z) and \
                all(isinstance(o, torch.Tensor) and o.shape == c.shape for o, c in zip(out, z))
        if not ok:
            raise ODEFunctionError(
                f"{type(self.func).__name__}.forward(t, z) returned {_describe(out)} for z of shape {_describe(z)}; "
                "an ODE function must return dz/dt with the same shape as z, component by component for a tuple "
                "state (check strides, padding and channel counts)")
        return out

    def initial_state(self, z: State, *context: torch.Tensor) -> State:
        """What the steps carry at ``t0``: ``z`` itself, or for a reversible method ``(z, z, f0)`` / ``(z, f0)``."""
        if not self.reversible:
            return z
        if not isinstance(z, torch.Tensor):
            raise ODEFunctionError(f"ODEBlock(method={self.method!r}) integrates a tensor state; got a tuple of "
                                   f"{len(z)}. Use method='euler', 'rk2' or 'rk4' for a tuple state, or concatenate it.")
        f0 = self._f(self.t_span[0], z, context)
        return (z, z, f0) if self.method == "reversible_heun" else (z, f0)

    def readout(self, state: State) -> State:
        """The solution in what the steps carry: ``state`` itself, or a reversible method's ``y``."""
        return state[0] if self.reversible else state

    def step(self, step_idx: int, z: State, *context: torch.Tensor) -> State:
        """Advance ``z`` by time step ``step_idx`` (0-based): one stage of the compiled chain.

        For a reversible method ``z`` is the carried state (:meth:`initial_state`), or at the
        first step the tensor itself, whose carried state the step makes first.
        """
        if not 0 <= step_idx < self.nt:
            raise IndexError(f"step_idx {step_idx} is outside [0, {self.nt}) for this ODEBlock")
        if self.adaptive:
            return self._solve(z, context)
        t, dt = self.time(step_idx), self.dt
        if self.reversible:
            carried = self.initial_state(z, *context) if isinstance(z, torch.Tensor) else z
            out = self._reversible_step(t, dt, self._carried(carried), context)
        elif isinstance(z, torch.Tensor):
            out = self._tensor_step(t, dt, z, context)
        elif self.method == "euler":
            out = _map(lambda z, k: torch.add(z, k, alpha=dt), z, self._f(t, z, context))
        elif self.method == "rk2":
            k1 = self._f(t, z, context)
            mid = _map(lambda z, k: torch.add(z, k, alpha=dt / 2), z, k1)
            out = _map(lambda z, k: torch.add(z, k, alpha=dt), z, self._f(t + dt / 2, mid, context))
        else:
            k1 = self._f(t, z, context)
            k2 = self._f(t + dt / 2, _map(lambda z, k: torch.add(z, k, alpha=dt / 2), z, k1), context)
            k3 = self._f(t + dt / 2, _map(lambda z, k: torch.add(z, k, alpha=dt / 2), z, k2), context)
            k4 = self._f(t + dt, _map(lambda z, k: torch.add(z, k, alpha=dt), z, k3), context)
            out = _map(lambda z, a, b, c, d: torch.add(z, _rk4_slope(a, b, c, d), alpha=dt / 6), z, k1, k2, k3, k4)
        if self.check_finite:
            self._check_finite(step_idx, z, out)
        return out

    def _solve(self, z: State, context: tuple[torch.Tensor, ...]) -> State:
        """The adaptive solve over ``t_span`` (:func:`anode_plan.odeint`), keeping :attr:`checkpoints` states."""

        if context:
            raise ODEFunctionError(f"ODEBlock(method={self.method!r}) takes no context tensors; got {len(context)}. "
                                   "Concatenate them into the state, or use a fixed-step method")
        first = _components(z)[0]
        t = torch.tensor(self.t_span, dtype=torch.float64, device=first.device)
        out = odeint(self.func, z, t, rtol=self.rtol, atol=self.atol, method=self.method,
                     options={"max_num_steps": self.max_num_steps, "checkpoints": self.checkpoints})
        # A copy of the end state, so the solution at t0 (out[0]) is freed with the output buffer.
        return out[-1].clone() if isinstance(out, torch.Tensor) else tuple(part[-1].clone() for part in out)

    def _tensor_step(self, t: float, dt: float, z: torch.Tensor, context: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """One step of a tensor state, written inline so every ``func`` output dies as early as it can.

        (Passing a temporary through a helper call keeps it alive until the call returns,
        which costs one extra state of peak memory per step.) The step sizes enter as
        ``alpha`` of ``torch.add``: a Python number times a tensor would wrap the number in
        an 8-byte tensor that autograd keeps even inside a checkpoint region's untaped run.
        """
        if self.method == "euler":
            return torch.add(z, self._f(t, z, context), alpha=dt)
        if self.method == "rk2":
            k1 = self._f(t, z, context)
            return torch.add(z, self._f(t + dt / 2, torch.add(z, k1, alpha=dt / 2), context), alpha=dt)
        k1 = self._f(t, z, context)
        k2 = self._f(t + dt / 2, torch.add(z, k1, alpha=dt / 2), context)
        k3 = self._f(t + dt / 2, torch.add(z, k2, alpha=dt / 2), context)
        k4 = self._f(t + dt, torch.add(z, k3, alpha=dt), context)
        return torch.add(z, _rk4_slope(k1, k2, k3, k4), alpha=dt / 6)

    def _carried(self, state: State) -> tuple[torch.Tensor, ...]:
        parts = len(CARRIED[self.method])
        if isinstance(state, torch.Tensor) or len(state) != parts:
            raise ODEFunctionError(
                f"ODEBlock(method={self.method!r}) steps carry {parts} tensors {CARRIED[self.method]}, got "
                f"{_describe(state)}; make the first state with block.initial_state(z)")
        return tuple(state)

    def _reversible_step(self, t: float, dt: float, state: tuple[torch.Tensor, ...],
                         context: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        if self.method == "reversible_heun":
            y, z_hat, f = state
            z_next = torch.add(torch.add(y, torch.sub(y, z_hat)), f, alpha=dt)  # 2y - ẑ + h·f
            f_next = self._f(t + dt, z_next, context)
            return torch.add(y, torch.add(f, f_next), alpha=dt / 2), z_next, f_next
        y, v = state
        half = torch.add(y, v, alpha=dt / 2)
        u = self._f(t + dt / 2, half, context)
        v_next = torch.add(u, torch.sub(u, v))  # 2u - v
        return torch.add(half, v_next, alpha=dt / 2), v_next

    def inverse_step(self, step_idx: int, state: State, *context: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The carried state before step ``step_idx``, computed from the one after it (reversible methods only).

        Exact in exact arithmetic; in floating point each inverted step adds rounding
        error, which grows with the number of steps inverted in a row (ALF has no region
        of absolute stability beyond the origin, so it may grow fast).
        """
        if not self.reversible:
            raise ODEBlockConfigError(f"ODEBlock(method={self.method!r}) is not reversible; inverse_step needs "
                                      f"one of {sorted(REVERSIBLE)}")
        t, dt = self.time(step_idx), self.dt
        if self.method == "reversible_heun":
            y, z_hat, f = self._carried(state)
            z_prev = torch.sub(torch.add(y, torch.sub(y, z_hat)), f, alpha=dt)  # 2y - ẑ - h·f
            f_prev = self._f(t, z_prev, context)
            return torch.sub(y, torch.add(f_prev, f), alpha=dt / 2), z_prev, f_prev
        y, v = self._carried(state)
        half = torch.sub(y, v, alpha=dt / 2)
        u = self._f(t + dt / 2, half, context)
        v_prev = torch.sub(torch.add(u, u), v)  # 2u - v'
        return torch.sub(half, v_prev, alpha=dt / 2), v_prev

    def _check_finite(self, step_idx: int, z: State, out: State) -> None:
        if any(is_fake_tensor(c) for c in _components(out)):
            return  # the cost model runs steps on fake tensors, which have no values
        bad = [int((~torch.isfinite(c)).sum()) for c in _components(out)]
        if not any(bad):
            return
        where = "" if isinstance(out, torch.Tensor) else f" (per component: {bad})"
        t0, t1 = self.time(step_idx), self.time(step_idx + 1)
        total = sum(c.numel() for c in _components(out))
        before = sum(int((~torch.isfinite(c)).sum()) for c in _components(z))
        cause = (f"its input already had {before} non-finite entries, so look at what comes before this step"
                 if before else "the input of this step was finite, so this step diverged")
        raise NonFiniteStateError(
            f"ODEBlock({type(self.func).__name__}, nt={self.nt}, method={self.method!r}): step {step_idx} "
            f"(t = {t0:g} -> {t1:g}) gave {sum(bad)} NaN or infinite entries of {total}"
            f"{where}; {cause}. Lower the learning rate or clip gradients, use more steps (nt) or method='rk4', "
            "or with float16 autocast use torch.amp.GradScaler. check_finite=False turns this check off.")

    def forward(self, z: State, *context: torch.Tensor) -> State:
        components = _components(z) if isinstance(z, (torch.Tensor, tuple, list)) else (z,)
        if not components or not all(isinstance(c, torch.Tensor) and c.is_floating_point() for c in components):
            raise ODEFunctionError(f"ODEBlock input must be a floating-point tensor or a non-empty tuple of them, got "
                                   f"{[getattr(c, 'dtype', type(c).__name__) for c in components]}")
        if not all(isinstance(c, torch.Tensor) for c in context):
            raise ODEFunctionError(f"ODEBlock(z, *context): the context must be tensors, got "
                                   f"{[type(c).__name__ for c in context]}")
        z = z if isinstance(z, torch.Tensor) else tuple(z)
        state = self.initial_state(z, *context)
        for step_idx in range(self.nt):
            state = self.step(step_idx, state, *context)
        return self.readout(state)

    def extra_repr(self) -> str:
        finite = ", check_finite=True" if self.check_finite else ""
        return f"nt={self.nt}, method={self.method!r}, t_span={self.t_span}{finite}"
