"""One ``odeint`` call checked and flattened: the function, the state, the times, the tolerances and options.

``odeint`` takes torchdiffeq's arguments; :class:`Problem` checks them (a clear
:class:`~anode_plan.SolverConfigError` for each mistake), flattens a tuple state into one
vector, runs time forwards whatever the order of ``t`` (a decreasing ``t`` is negated, as
torchdiffeq does), and finds the tensors the function trains (:mod:`anode_plan.ode.closure`),
so the solver (:mod:`anode_plan.ode.solve`) and the checkpoint budget
(:mod:`anode_plan.ode.checkpoints`) see one plain problem.
"""

from __future__ import annotations

import inspect
import math
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch

from anode_plan.budget import parse_memory_budget
from anode_plan.errors import SolverConfigError
from anode_plan.ode.closure import reachable_parameters
from anode_plan.ode.fixed_grid import FIXED, FixedMethod, fixed_grid
from anode_plan.ode.tableaus import TABLEAUS, Tableau, rms_norm

OPTIONS = ("memory_budget", "checkpoints", "max_num_steps", "first_step", "safety", "ifactor", "dfactor",
           "min_step", "max_step", "step_t", "jump_t", "norm", "dtype", "step_size", "grid_constructor", "interp",
           "perturb")
"""The options ``odeint`` takes: torchdiffeq's for its adaptive and fixed-grid methods, and the budget's two."""

ADAPTIVE_ONLY = ("first_step", "safety", "ifactor", "dfactor", "min_step", "max_step", "step_t", "jump_t")
FIXED_ONLY = ("step_size", "grid_constructor", "interp", "perturb")

PERTURB_NONE, PERTURB_PREV, PERTURB_NEXT = 0, 1, 2
"""How a time is nudged at a discontinuity: not, to the float before, to the float after (torchdiffeq's ``Perturb``)."""


@dataclass(frozen=True)
class Problem:
    func: Callable  # func(time, flat y, perturb=PERTURB_NONE) on the flat state, in increasing time
    flat_y0: torch.Tensor
    times: torch.Tensor  # float64, increasing (t, negated if it decreases)
    sign: float  # -1.0 when t decreases
    rtol: torch.Tensor
    atol: torch.Tensor
    tableau: Tableau | None  # the adaptive method, or None
    fixed: FixedMethod | None  # the fixed-grid method, or None
    grid: torch.Tensor | None  # a fixed-grid method's step boundaries, float64, increasing
    grid_anchors: tuple[int | None, ...]  # the entry of times each grid point moves with (None: none)
    interp: str
    norm: Callable[[torch.Tensor], torch.Tensor]
    params: tuple[torch.Tensor, ...]
    budget_bytes: int | None
    checkpoints: int | None
    max_num_steps: int
    first_step: float | None
    safety: float
    ifactor: float
    dfactor: float
    min_step: float
    max_step: float
    step_t: tuple[float, ...]  # increasing internal times a step must end on
    jump_t: tuple[float, ...]  # increasing internal times of discontinuities: steps end on them, f is re-evaluated
    perturb: bool  # a fixed-grid method's stages nudge their times off the grid (torchdiffeq's ``perturb``)
    unflatten: Callable[[torch.Tensor], Any]
    callback: Callable[[str, torch.Tensor, torch.Tensor, torch.Tensor], None]
    key: tuple
    source: Callable  # the user's func

    @property
    def method(self) -> str:
        return self.tableau.name if self.tableau is not None else self.fixed.name

    def user_time(self, time: torch.Tensor) -> torch.Tensor:
        return time if self.sign > 0 else -time

    @classmethod
    def make(cls, func, y0, t, rtol, atol, method, options, params) -> "Problem":
        options = dict(options or {})
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise SolverConfigError(f"odeint: unknown options {unknown}; the options are {list(OPTIONS)}")
        if method not in TABLEAUS and method not in FIXED:
            raise SolverConfigError(f"odeint(method={method!r}): the adaptive methods are {sorted(TABLEAUS)} and the "
                                    f"fixed-grid ones {sorted(FIXED)}; for a compiled network, anode_plan.ODEBlock")
        tableau, fixed = TABLEAUS.get(method), FIXED.get(method)
        wrong = sorted(set(options) & set(FIXED_ONLY if tableau is not None else ADAPTIVE_ONLY))
        if wrong:
            raise SolverConfigError(f"odeint(method={method!r}): options {wrong} are for "
                                    f"{'fixed-grid' if tableau is not None else 'adaptive'} methods")
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or not t.is_floating_point() or len(t) < 1:
            raise SolverConfigError(f"odeint: t must be a 1-d floating-point tensor of times, got "
                                    f"{type(t).__name__} {tuple(getattr(t, 'shape', ()))}")
        times = t.detach().to(torch.float64).clone()  # its own copy: an event writes its time into it
        sign = 1.0
        if len(times) > 1 and bool((times[1:] < times[:-1]).all()):
            sign, times = -1.0, -times
        elif len(times) > 1 and not bool((times[1:] > times[:-1]).all()):
            raise SolverConfigError(f"odeint: t must be strictly increasing or decreasing, got {t.tolist()}")
        parts = tuple(y0) if isinstance(y0, (tuple, list)) else (y0,)
        if not parts or not all(isinstance(p, torch.Tensor) and p.is_floating_point() for p in parts):
            raise SolverConfigError("odeint: y0 must be a floating-point tensor or a tuple of them")
        shapes = [p.shape for p in parts]
        sizes = [p.numel() for p in parts]
        tuple_state = isinstance(y0, (tuple, list))
        flat_y0 = torch.cat([p.reshape(-1) for p in parts]) if tuple_state else y0

        def split(flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
            lead = tuple(flat.shape[:-1]) if tuple_state else ()
            pieces, at = [], 0
            for shape, size in zip(shapes, sizes):
                pieces.append(flat[..., at:at + size].reshape(lead + tuple(shape)))
                at += size
            return tuple(pieces)

        takes_perturb = _takes_perturb(func)

        def inner(time: torch.Tensor, y: torch.Tensor, perturb: int = PERTURB_NONE) -> torch.Tensor:
            user_t = time if sign > 0 else -time
            if takes_perturb:
                out = func(user_t, split(y) if tuple_state else y, perturb=_perturb_value(perturb, sign))
            else:
                if perturb != PERTURB_NONE:  # the float just before or after, in the solve's direction
                    towards = time + (1.0 if perturb == PERTURB_NEXT else -1.0)
                    nudged = torch.nextafter(time.detach(), towards.detach())
                    user_t = (time + (nudged - time.detach())) if sign > 0 else -(time + (nudged - time.detach()))
                out = func(user_t, split(y) if tuple_state else y)
            if tuple_state:
                out = torch.cat([o.reshape(-1) for o in out])
            return out if sign > 0 else -out

        user_norm = options.get("norm")
        if user_norm is not None and not callable(user_norm):
            raise SolverConfigError(f"odeint: options['norm'] must be a function of the state, got {user_norm!r}")

        def norm(x: torch.Tensor) -> torch.Tensor:
            if user_norm is not None:
                return user_norm(split(x) if tuple_state else x)
            return max(rms_norm(piece) for piece in split(x)) if tuple_state else rms_norm(x)

        if params is None:
            params = reachable_parameters(func)
        params = tuple(p for p in params if isinstance(p, torch.Tensor) and p.requires_grad)
        budget = options.get("memory_budget")
        first = options.get("first_step")
        dtype = torch.promote_types(torch.float64, flat_y0.dtype)
        _check_time_dtype(options.get("dtype"))
        min_step, max_step = _positive(options, "min_step", 0.0), _positive(options, "max_step", math.inf)
        if min_step > max_step:
            raise SolverConfigError(f"odeint: options min_step={min_step} exceeds max_step={max_step}")
        step_t = _marks(options.get("step_t"), sign, times, "step_t")
        jump_t = _marks(options.get("jump_t"), sign, times, "jump_t")
        if set(step_t) & set(jump_t):
            raise SolverConfigError(f"odeint: step_t and jump_t share times {sorted(set(step_t) & set(jump_t))}; "
                                    "a time is one or the other")
        interp = options.get("interp", "linear")
        if interp not in ("linear", "cubic"):
            raise SolverConfigError(f"odeint: options['interp']={interp!r}; it is 'linear' or 'cubic'")
        grid, grid_anchors = None, ()
        if fixed is not None:
            if hasattr(func, "callback_accept_step") or hasattr(func, "callback_reject_step"):
                warnings.warn(f"odeint(method={method!r}): a fixed-grid method accepts every step, so func's "
                              "callback_accept_step / callback_reject_step are never called", stacklevel=3)
            grid, grid_anchors = fixed_grid(func, y0, t, times, sign, options.get("step_size"),
                                            options.get("grid_constructor"))
        key = (id(func), method, tuple(flat_y0.shape), flat_y0.dtype, flat_y0.device, len(times),
               tuple(tuple(p.shape) for p in params))
        return cls(inner, flat_y0, times, sign, torch.as_tensor(rtol, dtype=dtype, device=flat_y0.device),
                   torch.as_tensor(atol, dtype=dtype, device=flat_y0.device), tableau, fixed, grid, grid_anchors,
                   interp, norm, params, None if budget is None else parse_memory_budget(budget),
                   _checkpoints(options.get("checkpoints"), budget), int(options.get("max_num_steps", 2**31 - 1)),
                   None if first is None else float(first), float(options.get("safety", 0.9)),
                   float(options.get("ifactor", 10.0)), float(options.get("dfactor", 0.2)), min_step, max_step,
                   step_t, jump_t, bool(options.get("perturb", False)), split if tuple_state else (lambda out: out),
                   _callbacks(func, split if tuple_state else (lambda y: y), sign), key, func)


def _takes_perturb(func: Callable) -> bool:
    try:
        signature = inspect.signature(func.forward if hasattr(func, "forward") else func)
    except (TypeError, ValueError):
        return False
    return "perturb" in signature.parameters


def _perturb_value(perturb: int, sign: float):
    """torchdiffeq's ``Perturb`` member for ``perturb`` (if torchdiffeq is imported; else the int), in user time."""
    if sign < 0 and perturb != PERTURB_NONE:  # time runs backwards: the float after is the one below
        perturb = PERTURB_PREV if perturb == PERTURB_NEXT else PERTURB_NEXT
    misc = sys.modules.get("torchdiffeq._impl.misc")  # a func written for torchdiffeq compares with its enum
    return misc.Perturb(perturb) if misc is not None else perturb


def _check_time_dtype(dtype: Any) -> None:
    if dtype is not None and dtype not in (torch.float32, torch.float64):
        raise SolverConfigError(f"odeint: options['dtype']={dtype!r}; the time dtype is torch.float32 or "
                                "torch.float64 (anode_plan keeps times in float64 either way)")


def _positive(options: dict, name: str, default: float) -> float:
    value = options.get(name, default)
    value = float(value.item() if isinstance(value, torch.Tensor) else value)
    if not value >= 0:
        raise SolverConfigError(f"odeint: options['{name}']={value} must be at least 0")
    return value


def _marks(values: Any, sign: float, times: torch.Tensor, name: str) -> tuple[float, ...]:
    """step_t / jump_t as increasing internal times after the start (earlier ones never matter)."""
    if values is None:
        return ()
    flat = torch.as_tensor(values, dtype=torch.float64).reshape(-1) * sign
    if not bool(torch.isfinite(flat).all()):
        raise SolverConfigError(f"odeint: options['{name}'] must be finite times, got {values}")
    if len(set(flat.tolist())) != len(flat):
        raise SolverConfigError(f"odeint: options['{name}'] repeats a time: {values}")
    return tuple(sorted(v for v in flat.tolist() if v > float(times[0])))


def _callbacks(func: Callable, unflatten: Callable, sign: float):
    """``callback(name, t, y, dt)`` calls ``func.<name>(t, y, dt)`` when func has it (torchdiffeq's step callbacks)."""
    names = ("callback_step", "callback_accept_step", "callback_reject_step", "callback_step_adjoint",
             "callback_accept_step_adjoint", "callback_reject_step_adjoint")
    present = {name: getattr(func, name) for name in names if callable(getattr(func, name, None))}

    def callback(name: str, time: torch.Tensor, y: torch.Tensor, dt: torch.Tensor) -> None:
        hook = present.get(name)
        if hook is not None:
            hook(time if sign > 0 else -time, unflatten(y), dt)
    return callback


def _checkpoints(count: Any, budget: Any) -> int | None:
    if count is None:
        return None
    if budget is not None:
        raise SolverConfigError("odeint: give options['memory_budget'] or options['checkpoints'], not both")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise SolverConfigError(f"odeint: options['checkpoints']={count!r} must be a positive int (slot 0 holds the "
                                "initial state)")
    return count
