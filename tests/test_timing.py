"""Costs in milliseconds measured on the device: what the planners plan on, and what a plan predicts.

Times vary with the machine and its load, so these tests assert orderings, ratios within
generous tolerances, and that plans do not flip with timing noise; never an absolute time.
The benchmarks (``benchmarks/budget_sweep.py``, ``compare.py``) hold the accuracy targets.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import anode_plan
import planners
from anode_plan.measure.timing import relative_spread, time_phases
from anode_plan.plans.adaptive_share import adaptive_saving, recomputed
from anode_plan.plans.plan import plan_schedule
from factories import ConvField, tiny_odenet
from planners import Chain, Region, Run, Stage, simulate_plan


class _WideThenNarrow(nn.Module):
    """An ODE block 32 channels wide, then one 4 wide: the wide step does 64 times the narrow one's FLOPs."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.wide = anode_plan.ODEBlock(ConvField(32), nt=2, method="euler")
        self.squeeze = nn.Conv2d(32, 4, 1)
        self.narrow = anode_plan.ODEBlock(ConvField(4), nt=2, method="euler")
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.narrow(self.squeeze(self.wide(self.stem(x)))).mean(dim=(2, 3)))


def _chain(model, x, **kwargs):
    return anode_plan.lower_to_chain(model, anode_plan.trace_model(model, (x,)), (x,), **kwargs)


def test_a_calibrated_chain_is_priced_in_measured_milliseconds_and_keeps_the_flop_models_costs():
    torch.manual_seed(0)
    model, x = _WideThenNarrow(), torch.randn(8, 3, 16, 16)
    chain = _chain(model, x)
    assert chain.cost_source == "measured" and chain.cost_unit == "ms"
    assert all(stage.fwd_cost > 0 and stage.bwd_cost > 0 for stage in chain.stages)
    wide = [s for s in chain.stages if s.block == 0]
    narrow = [s for s in chain.stages if s.block == 1]
    # A block's steps are one measurement (timed once), so they cost the same.
    assert len({(s.fwd_cost, s.bwd_cost) for s in wide}) == 1 and len({(s.fwd_cost, s.bwd_cost) for s in narrow}) == 1
    assert wide[0].fwd_cost > narrow[0].fwd_cost and wide[0].bwd_cost > narrow[0].bwd_cost
    nominal = _chain(model, x, calibrate=False)
    assert nominal.cost_source == "nominal"
    assert [(s.nominal_fwd_cost, s.nominal_bwd_cost) for s in chain.stages] == \
        [(s.fwd_cost, s.bwd_cost) for s in nominal.stages]
    assert [(s.fwd_cost, s.bwd_cost) for s in chain.nominal().stages] == [(s.fwd_cost, s.bwd_cost) for s in nominal.stages]


def test_a_plan_says_where_its_costs_came_from_and_predicts_the_whole_step():
    torch.manual_seed(0)
    model, x = tiny_odenet(channels=8, nt=4), torch.randn(16, 3, 16, 16)
    y = torch.randint(0, 5, (16,))
    landmarks = anode_plan.find_landmarks(_chain(model, x))
    budget = (landmarks.minimum_bytes + landmarks.anode_bytes) // 2
    compiled = anode_plan.compile(model, budget, (x,))
    plan = compiled.plan
    assert plan.cost_source == "measured"
    assert plan.simulation.recomputed_forwards > 0
    # The prediction counts the stages, the regions and the loss: more than the stages alone, and than plain autograd.
    assert plan.predicted_step_seconds * 1e3 > plan.simulation.compute_cost
    assert plan.predicted_slowdown > 1.0
    times = []
    for _ in range(7):
        began = time.perf_counter()
        F.cross_entropy(compiled(x), y).backward()
        times.append(time.perf_counter() - began)
    ratio = plan.predicted_step_seconds / statistics.median(times[1:])
    assert 0.5 < ratio < 2.0, f"predicted {plan.predicted_step_seconds:.4f} s, measured {statistics.median(times):.4f} s"
    report = anode_plan.format_report(plan)
    assert f"step {plan.predicted_step_seconds * 1e3:.1f} ms (measured on the device)" in report
    assert f"{plan.predicted_slowdown:.2f}x plain autograd's {plan.plain_step_seconds * 1e3:.1f} ms" in report
    uncalibrated = anode_plan.compile(model, budget, (x,), calibrate=False).plan
    assert uncalibrated.cost_source == "nominal" and "(nominal: FLOP counts" in anode_plan.format_report(uncalibrated)


@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.8])
def test_two_identical_compiles_choose_the_same_plan(fraction):
    torch.manual_seed(0)
    model, x = tiny_odenet(channels=8, nt=4), torch.randn(16, 3, 16, 16)
    landmarks = anode_plan.find_landmarks(_chain(model, x))
    budget = int(landmarks.minimum_bytes + (landmarks.store_all_bytes - landmarks.minimum_bytes) * fraction)
    first, second = (anode_plan.compile(model, budget, (x,)).plan for _ in range(2))
    assert first.chain.stages != second.chain.stages  # timed afresh: the milliseconds differ by noise...
    assert first.schedule == second.schedule  # ...and the plan does not


def _three_stages(fwd, nominal_fwd, *, measured=True):
    stages = tuple(Stage(name=f"s{i}", input_bytes=10, output_bytes=10, tape_bytes=100, fwd_cost=f, bwd_cost=2.0,
                         nominal_fwd_cost=n, nominal_bwd_cost=2.0) for i, (f, n) in enumerate(zip(fwd, nominal_fwd)))
    return Chain(stages=stages, cost_source="measured" if measured else "nominal", timing_noise=0.005)


def test_a_difference_inside_the_timing_noise_is_a_tie_settled_by_the_flop_model():
    one_recompute = [(Region(0, 1, (Run(0),)), Run(1), Run(2)), (Run(0), Region(1, 2, (Run(1),)), Run(2))]
    reference = _three_stages((1.0, 1.0, 1.0), (1.0, 1.0, 1.0))
    budget = max(simulate_plan(reference, ops).peak_bytes for ops in one_recompute)
    assert simulate_plan(reference, tuple(Run(i) for i in range(3))).peak_bytes > budget
    # The FLOP model recomputes stage 0; measured, stage 1 is 1% cheaper: inside the noise, the FLOP model's plan.
    close = _three_stages((1.01, 1.0, 3.0), (1.0, 1.1, 3.0))
    assert planners.ChainDP().plan(close, budget_bytes=budget).ops == one_recompute[1]
    assert plan_schedule(close, budget, planners.ChainDP()).ops == one_recompute[0]
    # Measured 50% cheaper is real: the measured plan.
    clear = _three_stages((1.5, 1.0, 3.0), (1.0, 1.1, 3.0))
    assert plan_schedule(clear, budget, planners.ChainDP()).ops == one_recompute[1]
    # A nominal chain carries no noise: its own optimum, however close.
    nominal = _three_stages((1.01, 1.0, 3.0), (1.01, 1.0, 3.0), measured=False)
    assert plan_schedule(nominal, budget, planners.ChainDP()).ops == one_recompute[1]


def test_region_overheads_count_in_the_predicted_step_and_in_the_choice_among_candidates():
    chain = dataclasses.replace(_three_stages((1.0, 1.0, 1.0), (1.0, 1.0, 1.0)), region_cost=0.25, step_overhead=0.5)
    ops = (Region(0, 2, (Region(0, 1, (Run(0),)), Run(1))), Run(2))
    simulation = simulate_plan(chain, ops)
    assert simulation.region_calls == 3  # the outer region once, the inner one in the first run and in the re-run
    assert simulation.step_cost == pytest.approx(simulation.compute_cost + 3 * 0.25 + 0.5)
    assert simulation.baseline_step_cost == pytest.approx(simulation.baseline_cost + 0.5)


def test_the_stopwatch_times_phases_by_their_median_over_repeats():
    calls = []

    def run(watch):
        calls.append(1)
        watch.start()
        time.sleep(0.002)
        watch.lap("sleep")
        watch.start()
        watch.lap("nothing")

    times = time_phases(run, torch.device("cpu"))
    assert times.repeats >= 5 and len(calls) == times.repeats + 1  # one untimed run first
    assert times.get("sleep") >= 2.0 > times.get("nothing")
    assert relative_spread([1.0, 1.0, 1.0, 1.0]) == 0.0 and relative_spread([1.0, 2.0, 3.0, 4.0, 5.0]) > 0.5


def test_an_adaptive_blocks_time_falls_with_its_checkpoints_as_online_checkpointing_counts_the_rerun_steps():
    assert recomputed(50, 1) == 50 * 49 // 2 and recomputed(50, 50) == 0
    assert recomputed(50, 1) > recomputed(50, 3) > recomputed(50, 10) > 0
    stage = Stage(name="ode", input_bytes=8, output_bytes=8, tape_bytes=0, fwd_cost=50.0, bwd_cost=2000.0, block=0,
                  step=0)
    chain = Chain(stages=(stage,), blocks=(planners.Block("ode", 0, 1, "dopri5"),), cost_source="measured",
                  adaptive_steps=((0, 50),))
    savings = [adaptive_saving(chain, (("ode", c),)) for c in (1, 3, 10, 50)]
    assert savings[0] == 0 and savings == sorted(savings)
    assert savings[-1] <= stage.bwd_cost - stage.fwd_cost  # never below one re-run of every step


def test_a_saved_plan_carries_its_timings_and_a_reused_one_is_timed_again(tmp_path):
    torch.manual_seed(0)
    model, x = tiny_odenet(channels=4, nt=3), torch.randn(4, 3, 8, 8)
    plan = anode_plan.compile(model, "1GB", (x,)).plan
    path = tmp_path / "plan.yaml"
    anode_plan.save_plan(plan, path)
    loaded = anode_plan.load_plan(path)
    assert loaded.chain == plan.chain and loaded.predicted_step_seconds == plan.predicted_step_seconds
    text = path.read_text().replace(f"fwd_cost: {plan.chain.stages[0].fwd_cost}", "fwd_cost: 12345.0")
    path.write_text(text)
    reused = anode_plan.compile(model, plan=path).plan
    assert reused.cost_source == "measured" and reused.schedule == plan.schedule
    assert reused.chain.stages[0].fwd_cost < 12345.0
