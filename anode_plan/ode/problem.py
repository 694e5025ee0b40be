"""One ``odeint`` call checked and flattened: the function, the state, the times, the tolerances and options.

``odeint`` takes torchdiffeq's arguments; :class:`Problem` checks them (a clear
:class:`~anode_plan.SolverConfigError` for each mistake), flattens a tuple state into one
vector, and finds the parameters the function trains, so the solver (:mod:`anode_plan.ode.solve`)
and the checkpoint budget (:mod:`anode_plan.ode.checkpoints`) see one plain problem.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from anode_plan.budget import parse_memory_budget
from anode_plan.errors import SolverConfigError
from anode_plan.ode.tableaus import Tableau, rms_norm

OPTIONS = ("memory_budget", "max_num_steps", "first_step", "checkpoints")


@dataclass(frozen=True)
class Problem:
    func: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # on the flat state, in increasing time
    flat_y0: torch.Tensor
    times: torch.Tensor  # float64, increasing
    rtol: torch.Tensor
    atol: torch.Tensor
    tableau: Tableau
    norm: Callable[[torch.Tensor], torch.Tensor]
    params: tuple[torch.Tensor, ...]
    budget_bytes: int | None
    checkpoints: int | None
    max_num_steps: int
    first_step: float | None
    unflatten: Callable[[torch.Tensor], Any]
    key: tuple
    source: Callable  # the user's func

    @classmethod
    def make(cls, func, y0, t, rtol, atol, tableau, options, params) -> "Problem":
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or not t.is_floating_point() or len(t) < 1:
            raise SolverConfigError(f"odeint: t must be a 1-d floating-point tensor of times, got "
                                    f"{type(t).__name__} {tuple(getattr(t, 'shape', ()))}")
        if t.requires_grad:
            raise SolverConfigError("odeint: gradients with respect to t are not computed (the accepted steps are "
                                    "constants); pass t.detach()")
        times = t.detach().to(torch.float64)
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
            lead = flat.shape[:-1] if tuple_state else ()
            pieces, at = [], 0
            for shape, size in zip(shapes, sizes):
                pieces.append(flat[..., at:at + size].view(*lead, *shape))
                at += size
            return tuple(pieces)

        def inner(time: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            out = func(sign * time, split(y) if tuple_state else y)
            if tuple_state:
                out = torch.cat([o.reshape(-1) for o in out])
            return out if sign > 0 else -out

        def norm(x: torch.Tensor) -> torch.Tensor:
            return max(rms_norm(piece) for piece in split(x)) if tuple_state else rms_norm(x)

        if params is None:
            if isinstance(func, nn.Module):
                params = [p for p in func.parameters() if p.requires_grad]
            else:
                _refuse_hidden_tensors(func)
                params = []
        params = tuple(p for p in params if isinstance(p, torch.Tensor) and p.requires_grad)
        budget = options.get("memory_budget")
        first = options.get("first_step")
        dtype = torch.promote_types(torch.float64, flat_y0.dtype)
        key = (id(func), tableau.name, tuple(flat_y0.shape), flat_y0.dtype, flat_y0.device, len(times),
               tuple(tuple(p.shape) for p in params))
        return cls(inner, flat_y0, times, torch.as_tensor(rtol, dtype=dtype), torch.as_tensor(atol, dtype=dtype),
                   tableau, norm, params, None if budget is None else parse_memory_budget(budget),
                   _checkpoints(options.get("checkpoints"), budget), int(options.get("max_num_steps", 2**31 - 1)),
                   None if first is None else float(first), split if tuple_state else (lambda out: out), key, func)


def _checkpoints(count: Any, budget: Any) -> int | None:
    if count is None:
        return None
    if budget is not None:
        raise SolverConfigError("odeint: give options['memory_budget'] or options['checkpoints'], not both")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise SolverConfigError(f"odeint: options['checkpoints']={count!r} must be a positive int (slot 0 holds the "
                                "initial state)")
    return count


def _refuse_hidden_tensors(func: Callable) -> None:
    """A plain function closing over tensors that need gradients would lose them silently: refuse it."""
    cells = [cell.cell_contents for cell in (getattr(func, "__closure__", None) or ()) if cell.cell_contents is not None]
    code, scope = getattr(func, "__code__", None), getattr(func, "__globals__", {})
    named = [scope[name] for name in (code.co_names if code is not None else ()) if name in scope]
    owner = getattr(func, "__self__", None)
    held = list(vars(owner).values()) if owner is not None and hasattr(owner, "__dict__") else []
    found = [c for c in cells + named + held + ([owner] if owner is not None else [])
             if (isinstance(c, torch.Tensor) and c.requires_grad)
             or (isinstance(c, nn.Module) and any(p.requires_grad for p in c.parameters()))]
    if found:
        raise SolverConfigError(
            "odeint: func is a plain function that uses tensors needing gradients (a module or tensor it closes "
            "over, reads as a global or holds on its object); pass them as odeint(..., params=[...]) (e.g. "
            "params=list(module.parameters())) or make func an nn.Module, so their gradients are computed rather than "
            "silently dropped")
