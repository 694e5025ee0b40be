"""``anode_plan.odeint`` as a drop-in for torchdiffeq's: each behaviour torchdiffeq's own test suite checks
(``tools/torchdiffeq_suite.py`` runs that suite itself), on its problems and tolerances, in float64.

torchdiffeq (a test dependency) is the reference for values; finite differences and closed forms
for the gradients it computes differently (the adjoint's).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torchdiffeq
from torch import nn

import anode_plan
from anode_plan.ode.checkpoints import checkpoint_budget

F64 = torch.float64


class ConstantODE(nn.Module):
    """torchdiffeq's ``tests/problems.py`` ConstantODE: ``y = a·t + b`` exactly."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.2, dtype=F64))
        self.b = nn.Parameter(torch.tensor(3.0, dtype=F64))
        self.nfe = 0

    def forward(self, t, y):
        self.nfe += 1
        return self.a + (y - (self.a * t + self.b)) ** 5


class Rotating(nn.Module):
    """A small nonlinear field with parameters, depending on time."""

    def __init__(self):
        super().__init__()
        self.A = nn.Parameter(torch.tensor([[-0.1, 2.0], [-2.0, -0.1]], dtype=F64))
        self.nfe = 0

    def forward(self, t, y):
        self.nfe += 1
        return torch.tanh(y @ self.A) * (1 + 0.3 * torch.sin(2 * t))


def _times(grad=False, reverse=False):
    t = torch.tensor([0.0, 0.43, 1.17, 2.0], dtype=F64)  # off the fixed grids below: no kink at an output
    t = t.flip(0) if reverse else t
    return t.requires_grad_(grad)


def _y0():
    return torch.tensor([[0.7, -0.3]], dtype=F64, requires_grad=True)


# ------------------------------------------------------------------------------------------ gradients in t


@pytest.mark.parametrize("method", ["dopri5", "rk4"])
@pytest.mark.parametrize("reverse", [False, True])
def test_the_gradient_in_t_is_the_discretisations_and_gradcheck_passes(method, reverse):
    func = Rotating()
    options = {"step_size": 0.05} if method == "rk4" else {}
    t = _times(grad=True, reverse=reverse)
    y0 = _y0()
    assert torch.autograd.gradcheck(lambda a, b: anode_plan.odeint(func, a, b, method=method, options=options),
                                    (y0, t), atol=1e-6, rtol=1e-4)
    out = anode_plan.odeint(func, y0, t, rtol=1e-10, atol=1e-12, method=method, options=options)
    weights = torch.linspace(0.5, 1.5, out.numel(), dtype=F64).view(out.shape)
    (g_t,) = torch.autograd.grad((out * weights).sum(), t)
    # At the last time, the gradient is f(t_N, y_N)·grad_N, to the accuracy of the dense output's derivative
    # (dopri5) or of the step's (rk4, h = 0.05: h⁴ ≈ 6e-6).
    with torch.no_grad():
        end = float((func(t[-1], out[-1]) * weights[-1]).sum())
    assert abs(float(g_t[-1]) - end) < (1e-6 if method == "dopri5" else 1e-4) * max(1.0, abs(end))


def test_the_gradient_in_t_matches_torchdiffeqs_adjoint_within_its_own_tests_tolerance():
    func = ConstantODE()
    t = torch.linspace(1, 8, 10, dtype=F64, requires_grad=True)
    y0 = (func.a * t[0] + func.b).detach().requires_grad_()
    grad = torch.rand(10, generator=torch.Generator().manual_seed(0), dtype=F64)
    ours = torch.autograd.grad((anode_plan.odeint(func, y0, t, rtol=1e-9, atol=1e-12) * grad).sum(),
                               (y0, t, func.a, func.b))
    theirs = torch.autograd.grad((torchdiffeq.odeint_adjoint(func, y0, t, rtol=1e-9, atol=1e-12) * grad).sum(),
                                 (y0, t, func.a, func.b))
    for a, b in zip(ours, theirs):
        assert float((a - b).abs().max()) < 1e-12  # gradient_tests.py's eps for 'constant'


def test_t_without_a_gradient_costs_no_extra_evaluations():
    counts = []
    for grad in (False, True):
        func = Rotating()
        t = _times(grad=grad)
        out = anode_plan.odeint(func, _y0(), t)
        before = func.nfe
        out.sum().backward()
        counts.append(func.nfe - before)
    assert counts[0] == counts[1]  # the same re-runs; t's gradient rides on their tapes


# ------------------------------------------------------------------------------- states, closures, autograd


def test_a_tuple_state_with_a_0d_part_equals_torchdiffeq():
    func = Rotating()
    x0 = torch.tensor(0.4, dtype=F64, requires_grad=True)
    v0 = torch.tensor([[0.7, -0.3]], dtype=F64, requires_grad=True)

    def pair(t, state):
        x, v = state
        return -x * v.sum(), func(t, v) + x

    t = _times()
    options = {"first_step": 0.05}
    ours = anode_plan.odeint(pair, (x0, v0), t, options=options)
    theirs = torchdiffeq.odeint(pair, (x0, v0), t, options=options)
    assert ours[0].shape == (4,) and ours[1].shape == (4, 1, 2)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda a, b, s: anode_plan.odeint(pair, (a, b), s)[0],
                                    (x0, v0, t.clone().requires_grad_()))
    inputs = (x0, v0, func.A)  # func.A is found through the closure
    want = torch.autograd.grad(sum(p.square().sum() for p in theirs), inputs)
    got = torch.autograd.grad(sum(p.square().sum() for p in ours), inputs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


class _Holder:
    def __init__(self):
        self.field = Rotating()
        self.scale = torch.tensor(0.8, dtype=F64, requires_grad=True)

    def step(self, t, y):
        return self.field(t, y) * self.scale

    def __call__(self, t, y):
        return self.step(t, y)


def test_parameters_reached_through_closures_methods_partials_and_attributes_get_gradients():
    holder = _Holder()
    y0, t = _y0(), _times()
    wanted = [holder.field.A, holder.scale]

    def partial_target(scale, t, y):
        return holder.field(t, y) * scale

    funcs = {"bound method": holder.step, "callable object": holder,
             "lambda": lambda t, y: holder.field(t, y) * holder.scale,
             "partial": functools.partial(partial_target, holder.scale)}
    explicit = anode_plan.odeint(holder.step, y0, t, params=wanted)
    want = torch.autograd.grad(explicit.square().sum(), wanted)
    for label, func in funcs.items():
        out = anode_plan.odeint(func, y0, t, options={"checkpoints": 2})
        got = torch.autograd.grad(out.square().sum(), wanted)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=0, msg=label)


def test_a_second_backward_gradcheck_and_gradgradcheck_under_a_budget_that_recomputes():
    func = Rotating()
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64, requires_grad=True)
    y0 = _y0()
    out = anode_plan.odeint(func, y0, t, options={"checkpoints": 2})
    first = torch.autograd.grad(out.square().sum(), (y0, t, func.A), retain_graph=True)
    second = torch.autograd.grad(out.square().sum(), (y0, t, func.A))
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    # torch's default tolerances for gradcheck. An adaptive solve's finite differences see its step sizes move
    # (the gradients hold them, as constants of the discretisation), which gradgradcheck's differences of
    # gradients amplify to ~1e-4 here, so dopri5's gradgradcheck is at 1e-3; the fixed grid's is at the default,
    # and the exact second derivatives equal backprop's through torchdiffeq below.
    t = torch.tensor([0.0, 0.43, 0.95], dtype=F64, requires_grad=True)  # the grid's count stays put under them
    for method, options, tol in [("dopri5", {"checkpoints": 2}, 1e-3),
                                 ("rk4", {"checkpoints": 2, "step_size": 0.1}, 1e-5)]:
        solve = functools.partial(anode_plan.odeint, func, method=method, options=options)
        assert torch.autograd.gradcheck(lambda a, b, solve=solve: solve(a, b), (y0, t))
        assert torch.autograd.gradgradcheck(lambda a, b, solve=solve: solve(a, b), (y0, t), atol=tol)
    # A gradient penalty, d/dA of |d loss/d y0|², equals backprop's through torchdiffeq with the same first step.
    penalties = []
    for solver in (anode_plan.odeint, torchdiffeq.odeint):
        options = {"first_step": 0.05, **({"checkpoints": 2} if solver is anode_plan.odeint else {})}
        out = solver(func, y0, t.detach(), options=options)
        (g,) = torch.autograd.grad(out.square().sum(), y0, create_graph=True)
        penalties.append(torch.autograd.grad(g.square().sum(), func.A)[0])
    torch.testing.assert_close(penalties[0], penalties[1], rtol=1e-9, atol=1e-12)


class _Probe(nn.Module):
    def __init__(self, func, steps):
        super().__init__()
        self.func, self.steps = func, steps

    def forward(self, t, y):
        return self.func(t, y)

    def callback_accept_step(self, t0, y0, dt):
        self.steps.append(float(dt))


# ---------------------------------------------------------------------------------------------- options


def test_step_control_options_and_tensor_tolerances_equal_torchdiffeq():
    func = Rotating()
    y0, t = _y0(), _times()
    cases = [{"safety": 0.8, "ifactor": 5.0, "dfactor": 0.3}, {"step_t": torch.tensor([0.3, 0.7])},
             {"max_step": 0.1}, {"dtype": torch.float64}]
    for options in cases:
        options = {**options, "first_step": 0.05}
        for rtol, atol in [(1e-8, 1e-9), (torch.tensor([1e-8, 1e-6], dtype=F64), torch.tensor(1e-9, dtype=F64))]:
            ours = anode_plan.odeint(func, y0, t, rtol=rtol, atol=atol, options=options)
            func.nfe = 0
            theirs = torchdiffeq.odeint(func, y0, t, rtol=rtol, atol=atol, options=options)
            torch.testing.assert_close(ours, theirs, rtol=1e-11, atol=1e-11, msg=str(options))


def test_min_and_max_step_bound_the_steps_and_a_norm_sees_the_states_structure():
    func, sizes = Rotating(), []
    probe = _Probe(func, sizes)
    y0, t = _y0(), torch.tensor([0.0, 4.0], dtype=F64)
    anode_plan.odeint(probe, y0, t, options={"max_step": 0.2})
    assert max(sizes) <= 0.2 + 1e-15
    sizes.clear()
    anode_plan.odeint(probe, y0, t, rtol=1e-10, atol=1e-12, options={"min_step": 1.0})
    assert len(sizes) <= 5 and min(sizes[:-1]) >= 1.0  # min_step accepts what the error would reject
    seen = []

    def norm(state):
        seen.append(tuple(part.shape for part in state))
        return max(part.abs().max() for part in state)

    anode_plan.odeint(lambda t, s: (-s[0], -s[1]), (torch.tensor(1.0, dtype=F64), torch.ones(2, 2, dtype=F64)), t,
                      options={"norm": norm})
    assert seen and set(seen) == {((), (2, 2))}
    evaluations = []
    for scale in (1.0, 10.0):  # a larger norm asks for smaller steps
        func = Rotating()
        anode_plan.odeint(func, y0, t, options={"norm": lambda x, scale=scale: scale * x.abs().max()})
        evaluations.append(func.nfe)
    assert evaluations[0] < evaluations[1]


def test_jump_t_lands_on_the_discontinuity_and_perturb_tells_func_which_side():
    sides = []

    def jumpy(t, x, perturb=None):
        side = None if perturb is None else perturb.name
        sides.append((float(t), side))
        return -0.5 * x if t < 0.5 or (t == 0.5 and side == "PREV") else x ** 2

    def plain(t, x):
        return -0.5 * x if t < 0.5 else x ** 2

    x0 = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    ours = anode_plan.odeint(jumpy, x0, t, rtol=1e-8, atol=1e-8, options={"jump_t": torch.tensor([0.5])})
    assert (0.5, "PREV") in sides and (0.5, "NEXT") in sides
    options = {"jump_t": torch.tensor([0.5]), "first_step": 0.1}
    theirs = torchdiffeq.odeint(plain, x0, t, rtol=1e-8, atol=1e-8, options=options)
    torch.testing.assert_close(anode_plan.odeint(plain, x0, t, rtol=1e-8, atol=1e-8, options=options), theirs,
                               rtol=1e-12, atol=1e-12)  # a func without perturb: the time is nudged instead
    counted = []
    for options in ({}, {"jump_t": torch.tensor([0.5])}):  # landing on the jump takes fewer evaluations
        counted.append(0)

        def counting(t, x):
            counted[-1] += 1
            return plain(t, x)

        anode_plan.odeint(counting, x0, t, rtol=1e-6, atol=1e-6, options=options)
    assert counted[1] < counted[0]
    exact = x0.detach() * math.exp(-0.25)  # then y' = y², y = y_h / (1 − y_h (t − 0.5))
    torch.testing.assert_close(ours[-1].detach(), exact / (1 - 0.5 * exact), rtol=1e-6, atol=0)
    g = torch.autograd.grad(ours[-1].sum(), x0)[0]
    torch.testing.assert_close(g, math.exp(-0.25) / (1 - 0.5 * exact) ** 2, rtol=1e-6, atol=0)


@pytest.mark.parametrize("method", ["euler", "midpoint", "rk4"])
def test_fixed_grid_methods_equal_torchdiffeq_in_values_and_gradients_under_a_budget(method):
    func = Rotating()
    y0 = _y0()
    for options in [{"step_size": 0.1}, {"step_size": 0.1, "interp": "cubic"}, {}, {"perturb": True}]:
        t = _times(grad=True)
        theirs = torchdiffeq.odeint(func, y0, t, method=method, options=options)
        want = torch.autograd.grad(theirs.square().sum(), (y0, t, func.A))
        for budget in (None, 2):
            extra = {"checkpoints": budget} if budget else {}
            ours = anode_plan.odeint(func, y0, t, method=method, options={**options, **extra})
            torch.testing.assert_close(ours, theirs, rtol=1e-13, atol=1e-13)
            got = torch.autograd.grad(ours.square().sum(), (y0, t, func.A))
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    func.nfe = 0
    anode_plan.odeint(func, y0.detach(), torch.tensor([0.0, 1.0], dtype=F64), method=method,
                      options={"step_size": 0.1})
    assert func.nfe == 10 * {"euler": 1, "midpoint": 2, "rk4": 4}[method]  # known before the solve


def test_a_fixed_grid_backward_advances_no_more_than_revolves_optimum():
    """20 euler steps: the forward keeps revolve's first sweep, the backward re-advances at most t(20, c)."""
    from planners.revolve import optimal_advances

    for slots, want in [(1, 190), (2, 50), (3, 29), (5, 15)]:
        func = Rotating()
        out = anode_plan.odeint(func, _y0(), torch.tensor([0.0, 2.0], dtype=F64), method="euler",
                                options={"step_size": 0.1, "checkpoints": slots})
        assert func.nfe == 20
        out.sum().backward()
        advances = func.nfe - 20 - 20  # less the forward's and the 20 taped re-runs
        assert advances == want and advances <= optimal_advances(20, slots)


def test_step_callbacks_and_a_single_time():
    func, calls = Rotating(), {"step": 0, "accept": 0, "reject": 0, "adjoint": 0}
    func.callback_step = lambda t0, y0, dt: calls.__setitem__("step", calls["step"] + 1)
    func.callback_accept_step = lambda t0, y0, dt: calls.__setitem__("accept", calls["accept"] + 1)
    func.callback_reject_step = lambda t0, y0, dt: calls.__setitem__("reject", calls["reject"] + 1)
    func.callback_step_adjoint = lambda t0, y0, dt: calls.__setitem__("adjoint", calls["adjoint"] + 1)
    out = anode_plan.odeint(func, _y0(), _times(), rtol=1e-4, atol=1e-6)
    assert calls["step"] == calls["accept"] + calls["reject"] and calls["accept"] > 0
    out.sum().backward()
    assert calls["adjoint"] == calls["accept"]  # each accepted step differentiated once
    y0, t = _y0(), torch.tensor([1.5], dtype=F64, requires_grad=True)
    only = anode_plan.odeint(func, y0, t)
    assert torch.equal(only[0], y0) and only.shape == (1, 1, 2)


def test_a_grid_constructor_and_euler_give_the_discrete_values_and_gradient():
    x0 = torch.tensor(1.0, dtype=F64, requires_grad=True)
    xs = anode_plan.odeint(lambda t, x: x, x0, torch.tensor([0.0, 1.0], dtype=F64), method="euler",
                           options={"grid_constructor": lambda f, y0, t: torch.linspace(0, 1, 11, dtype=F64)})
    assert abs(xs[1].item() - 1.1 ** 10) < 1e-12
    (g,) = torch.autograd.grad(xs[1], x0)
    assert abs(float(g) - 1.1 ** 10) < 1e-12


class SineODE(nn.Module):
    """torchdiffeq's ``tests/problems.py`` SineODE (no parameters; y0 and t get gradients)."""

    def forward(self, t, y):
        return 2 * y / t + t ** 4 * torch.sin(2 * t) - t ** 2 + 4 * t ** 3


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "midpoint"])
def test_budgets_that_recompute_give_the_unbudgeted_gradients(method):
    """The suite's problems under ``checkpoints=3`` and a byte budget: the same values and gradients (1e-10)."""
    t = torch.linspace(1, 8, 10, dtype=F64, requires_grad=True)
    options = {"step_size": 0.05} if method == "midpoint" else {}
    for func in (ConstantODE(), SineODE(), Rotating()):
        y0 = torch.full((1, 2), 3.2, dtype=F64, requires_grad=True)
        inputs = [y0, t, *func.parameters()]
        reference = anode_plan.odeint(func, y0, t, method=method, options=options)
        want = torch.autograd.grad(reference.square().sum(), inputs)
        budget = checkpoint_budget(func, y0, t, 3, method=method)
        for extra in ({"checkpoints": 3}, {"memory_budget": budget}):
            out = anode_plan.odeint(func, y0, t, method=method, options={**options, **extra})
            assert torch.equal(out, reference)
            got = torch.autograd.grad(out.square().sum(), inputs)
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------- adjoint and events


def test_odeint_adjoint_is_odeint_with_torchdiffeqs_signature():
    func = Rotating()
    func.unused = nn.Linear(2, 3).double()
    y0, t = _y0(), _times()
    out = anode_plan.odeint_adjoint(func, y0, t, adjoint_rtol=1e-6, adjoint_atol=1e-8, adjoint_method="dopri5",
                                    adjoint_options={"norm": "seminorm"})
    torch.testing.assert_close(out, anode_plan.odeint(func, y0, t), rtol=0, atol=0)
    out.sum().backward()
    assert func.unused.weight.grad is not None and float(func.unused.weight.grad.abs().max()) == 0.0
    assert float(func.A.grad.abs().max()) > 0
    only_y0 = anode_plan.odeint_adjoint(Rotating(), y0, t, adjoint_params=())
    assert only_y0.requires_grad
    with pytest.raises(anode_plan.SolverConfigError, match="adjoint_method"):
        anode_plan.odeint_adjoint(func, y0, t, adjoint_method="dopri8")


@pytest.mark.parametrize("reverse", [False, True])
def test_an_event_stops_the_solve_with_the_implicit_function_gradient(reverse):
    k = torch.tensor(1.3, dtype=F64, requires_grad=True)
    y0 = torch.tensor([1.0], dtype=F64, requires_grad=True)
    start = torch.tensor([2.0 if reverse else 0.0], dtype=F64, requires_grad=True)
    level = 4.0 if reverse else 0.5

    def event_fn(t, y):
        return (y - level).sum()

    event_t, solution = anode_plan.odeint_event(lambda t, y: -k * y, y0, start, event_fn=event_fn,
                                                reverse_time=reverse, rtol=1e-10, atol=1e-12)
    exact = 2.0 - math.log(level) / 1.3 if reverse else math.log(1 / level) / 1.3  # y = y0·exp(−k (t − t0))
    assert abs(event_t.item() - exact) < 1e-9 and abs(solution[-1].item() - level) < 1e-9
    g_y0, g_k, g_t0 = torch.autograd.grad(event_t, (y0, k, start))
    log_ratio = math.log(1.0 / level)  # t* = t0 + ln(y0/level)/k
    assert abs(float(g_y0) - 1 / 1.3) < 1e-8
    assert abs(float(g_k) + log_ratio / 1.3 ** 2) < 1e-8
    assert abs(float(g_t0) - 1.0) < 1e-8
    # Through odeint(event_fn=...) and a fixed-grid method, as torchdiffeq's event tests call it.
    span = torch.tensor([2.0, 1.0] if reverse else [0.0, 1.0], dtype=F64)
    t_fixed, y_fixed = anode_plan.odeint(lambda t, y: -k * y, y0, span, event_fn=event_fn, method="rk4",
                                         options={"step_size": 0.01, "interp": "cubic"})
    assert abs(t_fixed.item() - exact) < 1e-8 and abs(y_fixed[-1].item() - level) < 1e-8
    (g_k_fixed,) = torch.autograd.grad(t_fixed, k)
    assert abs(float(g_k_fixed) + log_ratio / 1.3 ** 2) < 1e-6


def test_an_event_on_a_tuple_state_under_a_budget():
    """A ball thrown up, (height, velocity): it lands at t = 2·v0/g; d t/d v0 = 2/g."""
    v0 = torch.tensor(3.0, dtype=F64, requires_grad=True)
    state = (torch.tensor(0.0, dtype=F64), v0)
    for options in ({}, {"checkpoints": 2}):
        event_t, (height, velocity) = anode_plan.odeint(
            lambda t, s: (s[1], torch.full_like(s[1], -9.81)), state, torch.tensor([0.0, 1.0], dtype=F64),
            event_fn=lambda t, s: s[0] if t > 0.1 else torch.ones_like(s[0]), options=options)
        assert abs(event_t.item() - 6.0 / 9.81) < 1e-9 and abs(velocity[-1].item() + 3.0) < 1e-9
        (g,) = torch.autograd.grad(event_t, v0)
        assert abs(float(g) - 2 / 9.81) < 1e-8
