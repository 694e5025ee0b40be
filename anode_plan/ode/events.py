"""Terminating a solve at an event: where ``event_fn(t, y(t))`` changes sign, and gradients through that time.

``odeint(func, y0, t, event_fn=g)`` solves from ``t[0]`` (in the direction of ``t``) until
``g(t, y)`` changes sign, and returns ``(event_t, solution)``, ``solution`` the states at
``t[0]`` and at ``event_t``, as torchdiffeq does (``torchdiffeq/_impl/event_handling.py``).
The sign is checked after each accepted step; inside the step that crosses, the event
time is found by bisection on the step's dense output to the last bit of float64.

The event time depends on ``y0``, the parameters and ``t[0]`` implicitly, through
``g(t*, y(t*)) = 0``; :class:`EventGradient` gives it the gradient of the implicit function
theorem, as torchdiffeq's ``odeint_event`` does (Chen, Amos and Nickel, "Learning Neural
Event Functions for Ordinary Differential Equations", ICLR 2021): with ``f = func(t*, y*)``,
``dt*/dθ = −(∂g/∂y · dy*/dθ) / (∂g/∂t + ∂g/∂y · f)``, and the loss's gradient with respect to
the final state gains ``−∂g/∂y · (∂L/∂t* + ∂L/∂y* · f) / (∂g/∂t + ∂g/∂y · f)``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch


def find_event(state_at: Callable[[torch.Tensor], torch.Tensor], event: Callable, sign0: torch.Tensor,
               t0: torch.Tensor, t1: torch.Tensor, max_halvings: int = 200) -> torch.Tensor:
    """The time in ``[t0, t1]`` where ``event(t, state_at(t))`` leaves ``sign0``, by bisection to adjacent floats."""
    with torch.no_grad():
        low, high = t0.clone(), t1.clone()
        for _ in range(max_halvings):
            middle = (low + high) / 2
            if not bool(low < middle < high):
                break
            if bool(torch.sign(event(middle, state_at(middle))) == sign0):
                low = middle
            else:
                high = middle
        return (low + high) / 2


class EventGradient(torch.autograd.Function):
    """Identity on ``(event_t, state_t)`` whose backward adds the implicit function theorem's terms.

    ``func(t, y)`` and ``event_fn(t, y)`` take the flat state in the user's time. Use it on
    the state at a fixed (detached) event time, whose own graph gives ``dy*/dθ``.
    """

    @staticmethod
    def forward(ctx: Any, func: Callable, event_fn: Callable, event_t: torch.Tensor,
                state_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.func, ctx.event_fn = func, event_fn
        ctx.save_for_backward(event_t, state_t)
        return event_t.detach().clone(), state_t.detach().clone()

    @staticmethod
    def backward(ctx: Any, grad_t: torch.Tensor, grad_state: torch.Tensor) -> tuple:
        event_t, state_t = ctx.saved_tensors
        with torch.enable_grad():
            time = event_t.detach().clone().requires_grad_()
            state = state_t.detach().clone().requires_grad_()
            value = ctx.event_fn(time, state)
            par_t, par_y = torch.autograd.grad(value, (time, state), allow_unused=True)
        with torch.no_grad():
            f_val = ctx.func(event_t.detach(), state_t.detach())
        par_t = torch.zeros_like(time) if par_t is None else par_t
        par_y = torch.zeros_like(state) if par_y is None else par_y
        slope = par_t + torch.sum(par_y * f_val)  # dg/dt along the solution
        total_t = torch.sum(grad_state * f_val) + (grad_t if grad_t is not None else 0)
        grad_state = grad_state + par_y * (-total_t / (slope + 1e-12)).to(par_y.dtype)
        return None, None, None, grad_state
