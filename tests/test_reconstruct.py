"""Reversible ODE steps and the ``reconstruct`` strategy: states rebuilt backwards instead of kept.

The solvers are checked against their formulas and their order; the inverse step against
the forward's states; the strategy's gradients against plain backprop through the same
solver (float64 to 1e-10 relative, float32 to 1e-4), its allocator-measured peak against
``nt`` (8, 32, 128), and the planner's choice against checkpointing alone.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import anode_plan
import planners
from planners.reconstruct import collapsed_chain, reconstructible_blocks, segments
from promise import assert_budget_promise, step_peak

METHODS = ["reversible_heun", "alf"]


class _Field(nn.Module):
    """An MLP vector field whose tape (the hidden layer) is four states wide."""

    def __init__(self, width):
        super().__init__()
        self.a = nn.Linear(width, 4 * width)
        self.b = nn.Linear(4 * width, width)

    def forward(self, t, z):
        return torch.tanh(self.b(torch.tanh(self.a(z)))) * (1 + t)


def _net(method, nt, width=16, dtype=torch.float64, field=_Field):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, width), anode_plan.ODEBlock(field(width), nt=nt, method=method), nn.Tanh(),
                         anode_plan.ODEBlock(field(width), nt=nt, method=method), nn.Linear(width, 5)).to(dtype)


def _lowered(model, x, calibrate=True):
    traced = anode_plan.trace_model(model, (x,))
    return traced, anode_plan.lower_to_chain(model, traced, (x,), calibrate=calibrate)


# --- the solvers -------------------------------------------------------------------------------------------------------

def _by_the_formulas(method, f, z, nt):
    """The papers' updates, written out: reversible Heun (Kidger et al. 2021) and ALF with damping 1 (MALI)."""
    h = 1.0 / nt
    if method == "reversible_heun":
        y, z_hat, fz = z, z, f(torch.tensor(0.0, dtype=z.dtype), z)
        for k in range(nt):
            t1 = torch.tensor((k + 1) * h, dtype=z.dtype)
            z_hat = 2 * y - z_hat + h * fz
            f1 = f(t1, z_hat)
            y, fz = y + 0.5 * h * (fz + f1), f1
        return y
    y, v = z, f(torch.tensor(0.0, dtype=z.dtype), z)
    for k in range(nt):
        half = y + 0.5 * h * v
        u = f(torch.tensor((k + 0.5) * h, dtype=z.dtype), half)
        v = 2 * (u - v) + v
        y = half + 0.5 * h * v
    return y


@pytest.mark.parametrize("method", METHODS)
def test_reversible_steps_are_the_published_updates(method):
    torch.manual_seed(0)
    field = _Field(6).double()
    block = anode_plan.ODEBlock(field, nt=5, method=method)
    z = torch.randn(3, 6, dtype=torch.float64)
    torch.testing.assert_close(block(z), _by_the_formulas(method, field, z, 5), rtol=1e-13, atol=1e-14)


class _Linear(nn.Module):
    def forward(self, t, z):
        return -z + torch.sin(t) * torch.ones_like(z)


@pytest.mark.parametrize("method", METHODS)
def test_reversible_methods_are_second_order(method):
    """dz/dt = -z + sin t, z(0) = 1: error falls by about 4 when the step halves."""
    z = torch.ones(1, dtype=torch.float64)
    exact = 1.5 * math.exp(-1.0) + 0.5 * (math.sin(1.0) - math.cos(1.0))
    errors = [abs(float(anode_plan.ODEBlock(_Linear(), nt=nt, method=method)(z)) - exact) for nt in (16, 32, 64)]
    for coarse, fine in zip(errors, errors[1:]):
        assert 3.5 < coarse / fine < 4.5, errors


@pytest.mark.parametrize("method", METHODS)
def test_the_inverse_step_rebuilds_each_state(method):
    torch.manual_seed(0)
    block = anode_plan.ODEBlock(_Field(6), nt=16, method=method).double()
    state = block.initial_state(torch.randn(4, 6, dtype=torch.float64))
    states = [state]
    with torch.no_grad():
        for k in range(block.nt):
            states.append(block.step(k, states[-1]))
        rebuilt = states[-1]
        for k in reversed(range(block.nt)):
            rebuilt = block.inverse_step(k, rebuilt)
            for mine, true in zip(rebuilt, states[k]):
                torch.testing.assert_close(mine, true, rtol=0, atol=1e-12)


def test_reversible_methods_refuse_tuple_states_and_inversion_needs_one():
    block = anode_plan.ODEBlock(_Field(2), nt=2, method="alf")
    with pytest.raises(anode_plan.ODEFunctionError, match="tensor state"):
        block((torch.randn(1, 2), torch.randn(1, 2)))
    with pytest.raises(anode_plan.ODEBlockConfigError, match="not reversible"):
        anode_plan.ODEBlock(_Field(2), nt=2, method="rk4").inverse_step(0, torch.randn(1, 2))


# --- the strategy: exact gradients, flat memory ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("method", METHODS)
def test_reconstructed_gradients_equal_backprop_through_the_same_solver(method, dtype, tolerance):
    model = _net(method, nt=12, dtype=dtype)
    reference = copy.deepcopy(model)
    x = torch.randn(16, 8, dtype=dtype, requires_grad=True)
    y = torch.arange(16) % 5
    traced, chain = _lowered(model, x)
    # A bound of five steps' measured round-off: anchors every five steps at most (the planner chooses them).
    error = 5 * max(s.reconstruct.error_per_step for s in chain.stages if s.reconstruct) * 1.01
    plan = anode_plan.plan_for_budget(chain, traced, (x,), 10**9, planners.Reconstructed(max_error=error))
    rebuilt = [op for op in plan.schedule.ops if isinstance(op, planners.Reconstruct)]
    assert len(rebuilt) >= 2 * 2 and min(op.stop - op.start for op in rebuilt) <= 5  # anchored segments
    assert sum(op.stop - op.start for op in rebuilt) == 2 * 12
    compiled = anode_plan.CompiledModel(model, traced, plan)
    x2 = x.detach().clone().requires_grad_()
    F.cross_entropy(compiled(x), y).backward()
    F.cross_entropy(reference(x2), y).backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=tolerance, atol=tolerance * float(x2.grad.abs().max()))
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        scale = float(q.grad.abs().max())
        assert float((p.grad - q.grad).abs().max()) <= tolerance * scale, name


def test_a_reconstructed_block_peaks_the_same_whatever_its_steps():
    """nt = 8, 32, 128: the allocator's peak stays put, where keeping the tapes grows with nt."""
    x, y = torch.randn(32, 8), torch.arange(32) % 5
    peaks, stored = [], []
    for nt in (8, 32, 128):
        model = _net("reversible_heun", nt, dtype=torch.float32)
        traced, chain = _lowered(model, x)
        plan = anode_plan.plan_for_budget(chain, traced, (x,), 10**9, "reconstruct")
        measured = step_peak(anode_plan.CompiledModel(model, traced, plan), model, x, y)
        assert_budget_promise(measured.peak_bytes, plan.predicted_peak_bytes, None, nt)
        peaks.append(measured.peak_bytes)
        stored.append(planners.simulate_plan(chain, planners.StoreAll().plan(chain, budget_bytes=1 << 60)).peak_bytes)
    assert max(peaks) <= 1.02 * min(peaks), peaks
    assert stored[-1] > 8 * peaks[-1]


# --- the planner's choice -----------------------------------------------------------------------------------------------

def _min_budget(chain, traced, x, planner):
    with pytest.raises(anode_plan.InfeasibleBudgetError) as info:
        anode_plan.plan_for_budget(chain, traced, (x,), 1, planner)
    return info.value.min_budget_bytes


def test_reconstruct_never_raises_the_minimum_and_pays_in_deep_blocks():
    """The minimum budget with reconstruct is at most checkpointing's (the exact DP's minimum already keeps
    O(1) states: benchmarks/RESULTS.md has the numbers); its gain is compute, at tight budgets in deep blocks."""
    model = _net("reversible_heun", nt=64, dtype=torch.float32)
    x, y = torch.randn(32, 8), torch.arange(32) % 5
    traced, chain = _lowered(model, x)
    with_it, without = (_min_budget(chain, traced, x, planner) for planner in ("auto", "chain-dp"))
    assert with_it <= without
    # At the reconstruct landmark's peak, checkpointing alone recomputes more.
    landmark = planners.simulate_plan(chain, planners.Reconstructed().plan(chain, budget_bytes=1 << 60))
    budget = anode_plan.budget_for_peak(landmark.peak_bytes)
    mixed = anode_plan.plan_for_budget(chain, traced, (x,), budget, "auto")
    alone = anode_plan.plan_for_budget(chain, traced, (x,), budget, "chain-dp")
    assert mixed.simulation.reconstructed_steps > 0
    assert mixed.simulation.compute_cost < alone.simulation.compute_cost
    measured = step_peak(anode_plan.CompiledModel(model, traced, mixed), model, x, y)
    assert_budget_promise(measured.peak_bytes, mixed.predicted_peak_bytes, budget, "auto with reconstruct")
    summaries = anode_plan.summarize_blocks(mixed)
    assert any(s.strategy.startswith("reconstruct") and s.rebuild_error < 1e-4 for s in summaries)
    assert "rebuilt steps" in anode_plan.format_report(mixed)


def test_the_planner_reconstructs_only_where_it_pays():
    model = _net("reversible_heun", nt=8)
    x = torch.randn(16, 8, dtype=torch.float64)
    traced, chain = _lowered(model, x, calibrate=False)
    store_all = planners.simulate_plan(chain, planners.StoreAll().plan(chain, budget_bytes=1 << 60)).peak_bytes
    for budget in (store_all, store_all // 2):  # short blocks: checkpointing is cheaper
        plan = anode_plan.plan_for_budget(chain, traced, (x,), anode_plan.budget_for_peak(budget), "auto")
        assert plan.simulation.reconstructed_steps == 0
    plain = _net("rk2", nt=8)
    _, plain_chain = _lowered(plain, x, calibrate=False)
    assert reconstructible_blocks(plain_chain) == []


class _NoisyField(_Field):
    def forward(self, t, z):
        return F.dropout(super().forward(t, z), 0.1, self.training)


def test_random_steps_are_not_offered_for_reconstruction():
    model = _net("alf", nt=4, field=_NoisyField)
    traced, chain = _lowered(model, torch.randn(4, 8, dtype=torch.float64))
    assert reconstructible_blocks(chain) == []
    with pytest.raises(ValueError, match="no reversible ODE block"):
        planners.Reconstructed().plan(chain, budget_bytes=1 << 60)


def test_the_collapsed_chain_charges_what_the_simulator_charges():
    """A reconstructed segment as one stage: its store-all peak and cost are the expanded schedule's."""
    model = _net("alf", nt=6)
    traced, chain = _lowered(model, torch.randn(8, 8, dtype=torch.float64), calibrate=False)
    cuts = {b: segments(chain.blocks[b], 4) for b in range(2)}
    collapsed, spans = collapsed_chain(chain, cuts)
    ops = tuple(planners.Run(i) for i in range(len(collapsed.stages)))
    from planners.reconstruct import expand
    real = planners.simulate_plan(chain, expand(ops, spans))
    assert planners.simulate_plan(collapsed, ops).peak_bytes == real.peak_bytes
    assert planners.simulate_plan(collapsed, ops).compute_cost == pytest.approx(real.compute_cost)
    assert real.reconstructed_steps == 12


def test_a_plan_with_reconstruct_round_trips_through_a_plan_file(tmp_path):
    model = _net("reversible_heun", nt=4)
    x = torch.randn(4, 8, dtype=torch.float64)
    traced, chain = _lowered(model, x, calibrate=False)
    plan = anode_plan.plan_for_budget(chain, traced, (x,), 10**9, "reconstruct")
    anode_plan.save_plan(plan, tmp_path / "plan.yaml")
    assert anode_plan.load_plan(tmp_path / "plan.yaml") == plan
