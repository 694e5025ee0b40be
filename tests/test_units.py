"""The compiled mode's whole-model units: one Inductor graph where it fits the budget, exact, measured, reused.

``compile(..., backend="inductor")`` offers the planner the whole model as one compiled
graph at partitioner budgets (``anode_plan.stages.unit.FRACTIONS``), measured by the
allocator; budgets no unit fits run the per-stage compiled schedule. Every budget below is
derived from what the units measured on this machine.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import anode_plan
from models import ode_resnet
from promise import assert_budget_promise, restored_peak as _peak, training_step as _step

pytestmark = pytest.mark.filterwarnings("ignore:.*No CUDA runtime.*")


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    model = ode_resnet(width=4, stages=2, nt=2, method="rk2", norm="batch").double()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 10, (4,))
    return model, x, y


def _assert_same(got, want):
    for mine, theirs in zip(got, want):
        torch.testing.assert_close(mine.double(), theirs.double(), rtol=1e-12, atol=1e-13)


def test_a_unit_runs_the_whole_model_as_one_graph_exactly_within_its_measured_budget(net, tmp_path):
    model, x, y = net
    reference = copy.deepcopy(model)
    want = _step(reference, reference, x, y)
    compiled = anode_plan.compile(model, 2**40, (x,), backend="inductor")
    plan = compiled.plan
    assert plan.unit is not None and plan.unit.fraction == 1.0, plan.schedule.description
    assert plan.cost_source == "measured" and plan.predicted_step_seconds > 0
    assert "one compiled unit" in plan.schedule.description
    assert "the whole model as one Inductor graph" in anode_plan.format_report(plan)
    _assert_same(_step(compiled, model, x, y), want)
    measured = _peak(compiled, model, x, y)
    assert_budget_promise(measured, plan.predicted_peak_bytes, None, "unit at fraction 1")

    # at its own measured peak's budget the same unit is chosen again, compiled already
    budget = anode_plan.budget_for_peak(plan.unit.peak_bytes)
    again = anode_plan.compile(model, budget, (x,), backend="inductor")
    assert again.plan.unit is not None and again.plan.unit.fraction == 1.0 and again.plan.compile_seconds == 0

    # a plan file keeps the unit; reusing it compiles and measures that unit again
    path = tmp_path / "unit.yaml"
    anode_plan.save_plan(again.plan, path)
    assert anode_plan.load_plan(path).unit.fraction == 1.0
    reused = anode_plan.compile(model, plan=path)
    assert reused.plan.unit is not None and reused.plan.unit.fraction == 1.0
    _assert_same(_step(reused, model, x, y), want)


def test_below_every_unit_the_per_stage_schedule_runs_and_the_budget_holds(net):
    model, x, y = net
    reference = copy.deepcopy(model)
    want = _step(reference, reference, x, y)
    first = anode_plan.compile(model, 2**40, (x,), backend="inductor").plan.unit
    try:
        anode_plan.compile(model, 1, (x,), backend="inductor")
    except anode_plan.InfeasibleBudgetError as error:
        low = error.min_budget_bytes
    assert low < first.peak_bytes
    compiled = anode_plan.compile(model, low, (x,), backend="inductor")
    assert compiled.plan.unit is None and compiled.plan.simulation.recomputed_forwards > 0
    _assert_same(_step(compiled, model, x, y), want)
    measured = _peak(compiled, model, x, y)
    assert_budget_promise(measured, compiled.plan.predicted_peak_bytes, low, "per-stage at the minimum")

    # between the two, whichever runs (a unit at a lower fraction, or the stages) holds the budget, exactly
    middle = (low + first.peak_bytes) // 2
    between = anode_plan.compile(model, middle, (x,), backend="inductor")
    assert between.plan.unit is None or between.plan.unit.fraction < 1.0
    _assert_same(_step(between, model, x, y), want)
    measured = _peak(between, model, x, y)
    assert_budget_promise(measured, between.plan.predicted_peak_bytes, middle, between.plan.schedule.description)


def test_a_named_planner_plans_the_stages(net):
    model, x, _ = net
    compiled = anode_plan.compile(model, 2**40, (x,), backend="inductor", planner="store-all")
    assert compiled.plan.unit is None and compiled.plan.schedule.planner != "unit"


def test_a_unit_compiled_under_autocast_trains_in_bfloat16_within_its_budget():
    torch.manual_seed(0)
    model = ode_resnet(width=4, stages=1, nt=2, method="rk2", norm="batch")
    reference = copy.deepcopy(model)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        compiled = anode_plan.compile(model, 2**40, (x,), backend="inductor")
    assert compiled.plan.unit is not None

    def step(net):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x)
            loss = F.cross_entropy(out, y)
        loss.backward()
        return out, loss.detach()
    out, loss = step(compiled)
    _, want = step(reference)
    assert out.dtype == torch.bfloat16 and len(compiled.plans) == 1  # planned under the autocast it trains in
    torch.testing.assert_close(loss, want, rtol=2e-2, atol=2e-2)  # Inductor's bfloat16 kernels round otherwise
    model.zero_grad(set_to_none=True)
    state = copy.deepcopy(model.state_dict())
    measured = anode_plan.measure_peak_memory(lambda: step(compiled)).peak_bytes
    model.load_state_dict(state)
    assert_budget_promise(measured, compiled.plan.predicted_peak_bytes, None, "a unit under bfloat16 autocast")
