"""``anode_plan.odeint``: torchdiffeq's adaptive solves, with gradients exact for the steps taken, by online
checkpointing within a byte budget; and the online schedule itself, against equinox's published orders."""

from __future__ import annotations

import pytest
import torch
import torchdiffeq  # the reference solver; the [test] extra installs it
from torch import nn

import anode_plan
from anode_plan.ode import solve
from anode_plan.ode.checkpoints import checkpoint_budget
from anode_plan.ode.solve import solve_taped
from planners.online import OnlineCheckpointing, recomputed_steps, reverse_actions

# ------------------------------------------------------------------------------------------- the schedule

EQUINOX_ORDERS = [  # (checkpoints, steps, the backward's step evaluations), from equinox's tests
    (2, 5, "3,4,3,0,1,2,1,0"), (4, 7, "6,5,2,3,4,3,2,0,1,0"), (9, 5, "4,3,2,1,0"), (1, 3, "0,1,2,0,1,0"),
    (3, 11, "10,4,5,6,7,8,9,7,8,7,4,5,6,5,4,0,1,2,3,2,1,0"), (4, 4, "3,2,1,0"), (4, 6, "5,2,3,4,3,2,1,0"),
    (4, 9, "7,8,7,6,5,0,1,2,3,4,3,2,1,0"), (4, 14, "12,13,12,9,10,11,10,9,5,6,7,8,7,6,5,0,1,2,3,4,3,2,1,0"),
]


@pytest.mark.parametrize("checkpoints,steps,order", EQUINOX_ORDERS)
def test_the_backward_order_is_equinoxs(checkpoints, steps, order):
    kept = OnlineCheckpointing(checkpoints).plan(steps)
    actions = reverse_actions(kept, steps, checkpoints)
    assert ",".join(str(a.step) for a in actions) == order


def test_recompute_counts_are_the_offline_optimum_up_to_the_stumm_walther_bound():
    for checkpoints in range(1, 8):
        online = OnlineCheckpointing(checkpoints)
        for steps in range(1, online.optimal_up_to + 1):
            actions = reverse_actions(online.plan(steps), steps, checkpoints)
            assert recomputed_steps(actions) == max(0, steps - checkpoints), (checkpoints, steps)
            assert [a.step for a in actions if a.kind == "vjp"] == list(range(steps - 1, -1, -1))


def test_beyond_the_bound_every_step_is_still_differentiated_once_in_order():
    for checkpoints, steps in [(2, 8), (3, 40), (5, 200)]:
        kept = OnlineCheckpointing(checkpoints).plan(steps)
        assert len(kept) <= checkpoints and kept[0] == 0
        actions = reverse_actions(kept, steps, checkpoints)
        assert [a.step for a in actions if a.kind == "vjp"] == list(range(steps - 1, -1, -1))


def test_a_long_gap_with_many_free_slots_is_reversed_without_recursion():
    kept = OnlineCheckpointing(1100).plan(2500)
    actions = reverse_actions(kept, 2500, 1100)
    assert [a.step for a in actions if a.kind == "vjp"] == list(range(2499, -1, -1))


# ------------------------------------------------------------------------------------------- the solver


@pytest.mark.parametrize("method,order", [("dopri5", 5), ("bosh3", 3), ("tsit5", 5)])
def test_each_method_has_its_order(method, order):
    """One step of size h on y' = cos(t)·y (y = exp(sin t)): the local error falls like h^(order+1).
    (torchdiffeq 0.2.5's tsit5 carries its embedded fourth-order solution: this test fails for it.)"""
    class Growth(nn.Module):
        def forward(self, t, y):
            return torch.cos(t) * y

    errors = []
    sizes = [0.4, 0.2, 0.1, 0.05]
    for h in sizes:
        t = torch.tensor([0.0, h], dtype=torch.float64)
        y = anode_plan.odeint(Growth(), torch.ones(1, dtype=torch.float64), t, rtol=1e3, atol=1e3, method=method,
                              options={"first_step": h})[-1]
        errors.append(abs(float(y) - torch.exp(torch.sin(torch.tensor(h, dtype=torch.float64))).item()))
    slopes = [torch.log(torch.tensor(a / b)).item() / torch.log(torch.tensor(2.0)).item()
              for a, b in zip(errors, errors[1:])]
    assert min(slopes) > order + 0.5, slopes


class Field(nn.Module):
    def __init__(self, width=4, hidden=16):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, t, y):
        return self.b(torch.tanh(self.a(y))) * torch.cos(t)


class TupleField(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.a = nn.Linear(3, 3)

    def forward(self, t, state):
        x, v = state
        return v, -x + 0.1 * torch.tanh(self.a(v))


def _grads(out, inputs):
    parts = out if isinstance(out, tuple) else (out,)
    loss = sum((p * torch.linspace(0.5, 1.5, p.numel(), dtype=p.dtype).view(p.shape)).square().sum() for p in parts)
    return torch.autograd.grad(loss, inputs)


def _close(got, want, tolerance):
    for g, w in zip(got, want):
        scale = float(w.abs().max()) or 1.0
        assert float((g - w).abs().max()) / scale <= tolerance


@pytest.mark.parametrize("method", ["dopri5", "bosh3"])
@pytest.mark.parametrize("reverse", [False, True])
def test_values_and_gradients_equal_torchdiffeqs_with_the_same_first_step(method, reverse):
    field = Field().double()
    y0 = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    t = torch.linspace(0, 2, 5, dtype=torch.float64)
    t = t.flip(0) if reverse else t
    options = {"first_step": 0.05}
    theirs = torchdiffeq.odeint(field, y0, t, rtol=1e-8, atol=1e-9, method=method, options=options)
    ours = anode_plan.odeint(field, y0, t, rtol=1e-8, atol=1e-9, method=method, options=options)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    inputs = [y0, *field.parameters()]
    _close(_grads(ours, inputs), _grads(theirs, inputs), 1e-12)


def _budget_cases(field, y0, t, method, steps):
    yield "no budget", None
    for slots in sorted({1, 2, max(1, steps // 3), steps + 1}):
        yield f"{slots} checkpoints", checkpoint_budget(field, y0, t, slots, rtol=1e-6, atol=1e-8, method=method)


@pytest.mark.parametrize("method", ["dopri5", "bosh3", "tsit5"])
def test_gradients_equal_backprop_through_the_same_steps_at_every_budget(method):
    field = Field().double()
    y0 = torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    t = torch.tensor([0.0, 0.3, 1.1, 1.7, 2.5], dtype=torch.float64)
    inputs = [y0, *field.parameters()]
    reference, steps = solve_taped(field, y0, t, rtol=1e-6, atol=1e-8, method=method)
    want = _grads(reference, inputs)
    assert len(steps) > 6
    for label, budget in _budget_cases(field, y0, t, method, len(steps)):
        out = anode_plan.odeint(field, y0, t, rtol=1e-6, atol=1e-8, method=method,
                                options={"memory_budget": budget})
        torch.testing.assert_close(out, reference.detach(), rtol=0, atol=0, msg=label)  # the same steps
        _close(_grads(out, inputs), want, 1e-10)


def test_a_tuple_state_and_decreasing_times():
    field = TupleField().double()
    generator = torch.Generator().manual_seed(4)
    x0 = torch.randn(2, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    v0 = torch.randn(2, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    t = torch.linspace(3.0, 0.0, 4, dtype=torch.float64)
    inputs = [x0, v0, *field.parameters()]
    reference, steps = solve_taped(field, (x0, v0), t, rtol=1e-7, atol=1e-9)
    budget = checkpoint_budget(field, (x0, v0), t, 2, rtol=1e-7, atol=1e-9)
    out = anode_plan.odeint(field, (x0, v0), t, rtol=1e-7, atol=1e-9, options={"memory_budget": budget})
    assert isinstance(out, tuple) and out[0].shape == (4, 2, 3)
    theirs = torchdiffeq.odeint(field, (x0, v0), t, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(out, theirs, rtol=1e-6, atol=1e-6)  # their first step differs from ours by rounding
    _close(_grads(out, inputs), _grads(reference, inputs), 1e-10)


def test_dropping_the_carried_derivatives_gradient_at_a_checkpoint_changes_the_gradient(monkeypatch):
    field = Field().double()
    y0 = torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5), requires_grad=True)
    t = torch.tensor([0.0, 2.0], dtype=torch.float64)
    inputs = [y0, *field.parameters()]
    reference, steps = solve_taped(field, y0, t, rtol=1e-6, atol=1e-8)
    want = _grads(reference, inputs)
    budget = checkpoint_budget(field, y0, t, 3, rtol=1e-6, atol=1e-8)
    monkeypatch.setattr(solve, "CARRY_DERIVATIVE_GRADIENT", False)
    dropped = _grads(anode_plan.odeint(field, y0, t, rtol=1e-6, atol=1e-8, options={"memory_budget": budget}), inputs)
    worst = max(float((g - w).abs().max() / w.abs().max()) for g, w in zip(dropped, want))
    assert worst > 1e-4


def _solve_peak(field, y0, t, budget):
    def step():
        out = anode_plan.odeint(field, y0, t, rtol=1e-6, atol=1e-8, options={"memory_budget": budget})
        out.square().sum().backward()
    step()  # the step's costs are measured on the first call; a forward's lazily made state must not count
    field.zero_grad(set_to_none=True)
    peak = anode_plan.measure_peak_memory(step).peak_bytes
    field.zero_grad(set_to_none=True)
    return peak


def test_the_allocator_peak_stays_flat_as_the_interval_grows_fourfold():
    field = Field(width=64, hidden=128).double()
    y0 = torch.randn(16, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    short, long = torch.tensor([0.0, 2.0], dtype=torch.float64), torch.tensor([0.0, 8.0], dtype=torch.float64)
    budget = checkpoint_budget(field, y0, short, 3, rtol=1e-6, atol=1e-8)
    steps = [len(solve_taped(field, y0, span, rtol=1e-6, atol=1e-8)[1]) for span in (short, long)]
    assert steps[1] >= 3 * steps[0]
    peaks = [_solve_peak(field, y0, span, budget) for span in (short, long)]
    for peak in peaks:
        assert peak <= budget, (peak, budget)
    assert peaks[1] <= peaks[0] * 1.05 + 4096, peaks
    taped = []
    for span in (short, long):
        def step(span=span):
            out, _ = solve_taped(field, y0, span, rtol=1e-6, atol=1e-8)
            out.square().sum().backward()
        taped.append(anode_plan.measure_peak_memory(step).peak_bytes)
    assert taped[1] > 2 * taped[0] and taped[1] > 2 * peaks[1]


_GLOBAL_FIELD = Field().double()


def _uses_a_global_module(t, y):
    return _GLOBAL_FIELD(t, y)


def test_bad_calls_get_specific_errors():
    field = Field().double()
    y0 = torch.zeros(1, 4, dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    with pytest.raises(anode_plan.SolverConfigError, match="adaptive methods are"):
        anode_plan.odeint(field, y0, t, method="rk45")
    with pytest.raises(anode_plan.SolverConfigError, match="unknown options"):
        anode_plan.odeint(field, y0, t, options={"stepsize": 0.1})
    with pytest.raises(anode_plan.SolverConfigError, match="are for fixed-grid methods"):
        anode_plan.odeint(field, y0, t, options={"step_size": 0.1})
    with pytest.raises(anode_plan.SolverConfigError, match="strictly increasing or decreasing"):
        anode_plan.odeint(field, y0, torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64))
    weight = torch.ones(4, dtype=torch.float64, requires_grad=True)
    with pytest.raises(anode_plan.InfeasibleBudgetError) as info:
        anode_plan.odeint(field, y0.requires_grad_(), t, options={"memory_budget": 64})
    assert info.value.min_budget_bytes == checkpoint_budget(field, y0, t, 1)
    with pytest.raises(anode_plan.SolverConfigError, match="max_num_steps=3"):
        anode_plan.odeint(field, y0, torch.tensor([0.0, 50.0], dtype=torch.float64), rtol=1e-10, atol=1e-12,
                          options={"max_num_steps": 3})
    # A function reaching a module through a global gets its parameters differentiated (tests/test_odeint_surface.py).
    from_global = anode_plan.odeint(_uses_a_global_module, torch.ones_like(y0), t)
    assert all(g is not None for g in torch.autograd.grad(from_global.sum(), list(_GLOBAL_FIELD.parameters())))
    # A value that does not depend on the state (f's gradient has nowhere to go) is differentiated all the same.
    start = torch.zeros(1, 4, dtype=torch.float64, requires_grad=True)
    ramp = anode_plan.odeint(lambda t, y: torch.cos(t) * torch.ones_like(y), start, t, options={"checkpoints": 1})
    assert torch.equal(torch.autograd.grad(ramp[-1].sum(), start)[0], torch.ones_like(start))
    noisy = nn.Sequential(nn.Dropout(0.5))
    with pytest.raises(anode_plan.SolverConfigError, match="random numbers"):
        anode_plan.odeint(lambda t, y: noisy(y), y0.detach().requires_grad_(), t)
    # A function given its tensors is differentiated with respect to them.
    out = anode_plan.odeint(lambda t, y: -weight * y, torch.ones_like(y0), t, params=[weight])
    assert torch.autograd.grad(out.sum(), weight)[0].abs().sum() > 0


# ------------------------------------------------------------------------------------------- inside compile


def _adaptive_net(span=(0.0, 1.0)):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), anode_plan.ODEBlock(Field(32, 64), method="dopri5", t_span=span,
                                                                 rtol=1e-6, atol=1e-8),
                         nn.ReLU(), anode_plan.ODEBlock(Field(32, 64), method="bosh3", t_span=span, rtol=1e-6,
                                                        atol=1e-8),
                         nn.Linear(32, 5)).double()


def _minimum(model, x):
    with pytest.raises(anode_plan.InfeasibleBudgetError) as info:
        anode_plan.compile(model, 1, (x,))
    return info.value.min_budget_bytes


def test_adaptive_blocks_compile_with_exact_gradients_and_hold_the_budget_whatever_their_steps():
    from promise import assert_budget_promise, step_peak

    x = torch.randn(64, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    y = torch.randint(0, 5, (64,), generator=torch.Generator().manual_seed(8))
    model = _adaptive_net()
    plain = _grads(model(x), list(model.parameters()))
    minimum = _minimum(model, x)
    for budget in (minimum, 3 * minimum):
        compiled = anode_plan.compile(model, budget, (x,))
        checkpoints = dict(compiled.plan.adaptive_checkpoints)
        assert set(checkpoints) == {"1", "3"} and all(c >= 1 for c in checkpoints.values())
        count = checkpoints["1"]
        assert f"1 (dopri5): solved with {count} checkpoint{'s' * (count != 1)}" in anode_plan.format_report(compiled.plan)
        _close(_grads(compiled(x), list(model.parameters())), plain, 1e-10)
        measured = step_peak(compiled, model, x, y).peak_bytes
        assert measured <= budget
        if budget == minimum:
            assert checkpoints == {"1": 1, "3": 1}
            assert_budget_promise(measured, compiled.plan.predicted_peak_bytes, budget, "adaptive blocks")
    # Four times the interval: several times the steps, the same budget still holds (the checkpoints are fixed).
    long = _adaptive_net(span=(0.0, 4.0))
    compiled = anode_plan.compile(long, minimum + minimum // 4, (x,))
    steps = [len(solve_taped(net[1].func, net[0](x), torch.tensor(net[1].t_span, dtype=torch.float64),
                             rtol=1e-6, atol=1e-8)[1]) for net in (model, long)]
    assert steps[1] >= 2 * steps[0]
    assert step_peak(compiled, long, x, y).peak_bytes <= minimum + minimum // 4


def test_an_adaptive_block_takes_no_step_count():
    with pytest.raises(anode_plan.ODEBlockConfigError, match="leave nt out"):
        anode_plan.ODEBlock(Field(), nt=4, method="dopri5")
    block = anode_plan.ODEBlock(Field().double(), method="tsit5", rtol=1e-8, atol=1e-10)
    z = torch.randn(3, 4, dtype=torch.float64)
    expected = anode_plan.odeint(block.func, z, torch.tensor([0.0, 1.0], dtype=torch.float64), rtol=1e-8,
                                 atol=1e-10, method="tsit5")[-1]
    torch.testing.assert_close(block(z), expected, rtol=0, atol=0)


@pytest.mark.parametrize("batch,width,hidden,method", [(4, 32, 512, "dopri5"), (64, 128, 128, "bosh3")])
def test_the_budget_holds_with_large_parameters_and_with_many_checkpoints(batch, width, hidden, method):
    """Parameters larger than the state (their gradients summed over steps), and a share of many checkpoints."""
    from promise import step_peak

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, width), anode_plan.ODEBlock(Field(width, hidden), method=method, rtol=1e-6,
                                                                     atol=1e-8), nn.Linear(width, 5)).double()
    x = torch.randn(batch, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    y = torch.randint(0, 5, (batch,), generator=torch.Generator().manual_seed(10))
    minimum = _minimum(model, x)
    for budget in (minimum, 2 * minimum):
        compiled = anode_plan.compile(model, budget, (x,))
        measured = step_peak(compiled, model, x, y).peak_bytes
        assert measured <= budget and measured <= compiled.plan.predicted_peak_bytes, (budget, measured)
