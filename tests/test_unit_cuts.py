"""Compiled units over part of the model: runs of stages (whole ODE blocks, runs of two steps) fused into one
Inductor graph each, planned as stages, exact and within the budget the allocator counts.

Each model is compiled stage by stage first (a planner object plans the stages); the cuts of
``anode_plan.compiler.segmented`` are then measured and planned on at budgets derived from
what their units measured on this machine: one that keeps every unit, one that recomputes.
"""

from __future__ import annotations

import copy

import pytest
import torch

import anode_plan
import planners
from anode_plan.compiler.model import CompiledModel
from anode_plan.compiler.segmented import MAX_NEW_CUTS, candidate_cuts, cut_plan, with_block_units
from anode_plan.stages.inductor import input_key
from anode_plan.tracing.segments import block_segments, coarsen
from models import mlp_ode, ode_resnet, unet_ode
from promise import assert_budget_promise, restored_peak as _peak, training_step as _step

pytestmark = pytest.mark.filterwarnings("ignore:.*No CUDA runtime.*")


def _resnet():
    model = ode_resnet(width=4, stages=2, nt=3, method="rk2", norm="batch").double()
    return model, torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.randint(0, 10, (4,))


def _mlp():
    model = mlp_ode(features=16, hidden=32, blocks=2, nt=4, method="rk4").double()
    return model, torch.randn(16, 16, dtype=torch.float64), torch.randint(0, 3, (16,))


def _unet():  # skip connections cross the blocks: the units' states carry them
    model = unet_ode(width=4, nt=2, method="euler").double()
    return model, torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.randint(0, 3, (2, 8, 8))


MODELS = {"ode_resnet": _resnet, "mlp_ode": _mlp, "unet_ode": _unet}
AUTO = planners.Auto()  # the default planner as an object: the stages are planned, no whole-model unit offered
_STAGED: dict = {}


def _staged(name):
    """The model, batch, labels and its per-stage compiled model at an unbounded budget, made once per module
    (the compiled model keeps the compiled stages, and their measured chains, alive for the next test)."""
    if name not in _STAGED:
        torch.manual_seed(0)
        model, x, y = MODELS[name]()
        _STAGED[name] = model, x, y, anode_plan.compile(model, 2**40, (x,), backend="inductor", planner=AUTO)
    return _STAGED[name]


def _assert_exact(got, want, what):
    for position, (mine, theirs) in enumerate(zip(got, want)):
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-13, msg=lambda m: f"{what}, value {position}: {m}")


def test_block_segments_cut_each_block_whole_or_in_runs_of_steps():
    traced = _staged("ode_resnet")[3].traced
    blocks = [(b.start, b.stop) for b in traced.blocks]
    whole = block_segments(traced)
    assert [run for run in whole if run in blocks] == blocks  # each block one run
    pairs = block_segments(traced, 2)
    for start, stop in blocks:  # nt=3: a run of two steps and a run of one
        assert (start, start + 2) in pairs and (start + 2, stop) in pairs
    for segments in (whole, pairs):
        coarse = coarsen(traced, segments)
        assert len(coarse.stages) == len(segments) and not coarse.blocks
        assert coarse.stages[-1].out_names == traced.stages[-1].out_names
    assert [cut for cut, _ in candidate_cuts(traced)] == [whole, whole, pairs, pairs]
    with pytest.raises(ValueError, match="do not cover stages"):
        coarsen(traced, ((0, 2), (3, len(traced.stages))))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_units_spanning_stages_and_blocks_are_exact_and_hold_their_budget(name, tmp_path):
    model, x, y, staged = _staged(name)
    reference = copy.deepcopy(model)
    want = _step(reference, reference, x, y)
    stages, traced = staged.compiled_stages, staged.traced
    segments = block_segments(traced)
    assert any(stop - start > 1 for start, stop in segments)

    keep_all = cut_plan(staged.plan, model, traced, (x,), stages, AUTO, segments, 1.0)
    assert keep_all is not None and keep_all.segments == segments
    assert keep_all.simulation.recomputed_forwards == 0
    spans = [stop - start for start, stop in segments]
    assert len(keep_all.chain.stages) == len(segments) and max(spans) >= 2

    # a budget between the units' lowest plan and keeping them all: the plan recomputes whole units
    with pytest.raises(anode_plan.InfeasibleBudgetError) as info:
        anode_plan.plan_for_budget(keep_all.chain, traced, (x,), 1)
    lowest = info.value.min_budget_bytes
    budget = (lowest + anode_plan.budget_for_peak(keep_all.predicted_peak_bytes)) // 2
    tight = anode_plan.compile(model, budget, (x,), backend="inductor", planner=AUTO)
    for fraction in (1.0, 0.5) if name == "ode_resnet" else (1.0,):  # each fraction compiles every unit again
        plan = cut_plan(tight.plan, model, traced, (x,), stages, AUTO, segments, fraction)
        if plan is None:  # the units at 0.5 can need more than at 1 (recompute inside the backward graph)
            continue
        assert plan.segment_fraction == fraction and plan.budget_bytes == budget
        compiled = CompiledModel(model, traced, plan, compiled=stages)
        _assert_exact(_step(compiled, model, x, y), want, f"{name} units at {fraction}")
        assert_budget_promise(_peak(compiled, model, x, y), plan.predicted_peak_bytes, budget,
                              f"{name} units at {fraction}")
        if fraction == 1.0:
            assert plan.simulation.recomputed_forwards > 0, plan.schedule.description
        if fraction == 1.0 and name == "ode_resnet":
            report = anode_plan.format_report(plan)
            assert f"as {len(segments)} compiled units" in report and "unit " in report

            # a plan file keeps the cut; reusing it measures the units again and runs them
            path = tmp_path / "units.yaml"
            anode_plan.save_plan(plan, path)
            again = anode_plan.compile(model, plan=path)
            assert again.plan.segments == segments and again.plan.segment_fraction == 1.0
            assert again.plan.schedule.ops == plan.schedule.ops
            _assert_exact(_step(again, model, x, y), want, f"{name} units from a plan file")
            state = copy.deepcopy(model.state_dict())
            with torch.no_grad():  # (BatchNorm in train mode updates its statistics: put back below)
                torch.testing.assert_close(again(x), copy.deepcopy(model)(x), rtol=1e-12, atol=1e-13)
            model.load_state_dict(state)
            with pytest.raises(anode_plan.PlanMismatchError, match="compiled units.*backend='inductor'"):
                anode_plan.compile(model, plan=path, backend="eager")


def test_the_compiled_mode_takes_the_fastest_plan_of_stages_and_units():
    """Below a whole-model unit, the plan is the per-stage one or a cut's: the one predicted fastest, in
    measured milliseconds, of those measured for it."""
    model, x, _, staged = _staged("ode_resnet")
    stages, traced = staged.compiled_stages, staged.traced
    chosen = with_block_units(staged.plan, model, traced, (x,), stages, AUTO)
    key = input_key(model, (x,))
    measured = [cut_plan(staged.plan, model, traced, (x,), stages, AUTO, segments, fraction)
                for segments, fraction in candidate_cuts(traced)
                if stages.segmented_stages(segments, fraction).chain_for(key) is not None]
    assert len(measured) >= MAX_NEW_CUTS, "at store-all's budget the screen lets the first cuts through"
    offered = [staged.plan, *(plan for plan in measured if plan is not None)]
    assert chosen.predicted_step_seconds == min(plan.predicted_step_seconds for plan in offered)
    assert chosen.segments in [plan.segments for plan in offered]
