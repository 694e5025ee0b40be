"""XConv as a planner option: opt-in only, taken only where it pays, flagged, measured, and the same under recompute.

The model is an ODE-ResNet whose blocks' vector fields are convolutions (``tests/factories.py``),
in float64 so that what should be exact can be compared tightly.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import anode_plan
import planners
from anode_plan import XConv2d
from anode_plan.stages.sketch import _layer_seed
from factories import tiny_odenet
from planners import Chain, Stage
from planners.chain import Sketch
from planners.sketch import plan_with_sketches, sketch_groups
from promise import assert_budget_promise, step_peak

PROBES = 4


def _setup(nt=6, channels=6, batch=4, size=10, dtype=torch.float64):
    model = tiny_odenet(channels=channels, nt=nt, method="rk2").to(dtype)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, dtype=dtype, generator=generator)
    y = torch.randint(0, 5, (batch,), generator=generator)
    return model, x, y


def _gradients(model, forward, x, y):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    F.cross_entropy(forward(x), y).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads, x.grad


def _sketched_reference(model, layers, config):
    """The plain model with ``layers`` run as XConv2d under plain autograd, probes seeded as the compiler seeds them."""
    ops = {name: XConv2d(model.get_submodule(name), config.probes, seed=_layer_seed(config.seed, name))
           for name in layers}

    def forward(x):
        for name, op in ops.items():
            model.get_submodule(name).forward = op.forward
        try:
            return model(x)
        finally:
            for name in ops:
                model.get_submodule(name).__dict__.pop("forward")
    return forward


def _exact_minimum(model, x, approximate=None):
    with pytest.raises(anode_plan.InfeasibleBudgetError) as info:
        anode_plan.compile(model, 1, (x,), approximate=approximate)
    return info.value.min_budget_bytes


def _between_the_minima(model, x, config):
    """A budget below the smallest exact schedule and above the smallest with sketches."""
    exact, sketched = _exact_minimum(model, x), _exact_minimum(model, x, config)
    assert sketched < exact
    return (exact + sketched) // 2


def test_without_approximate_nothing_is_offered_and_gradients_are_plain_autograds_bit_for_bit():
    model, x, y = _setup()
    plain = _gradients(model, model, x, y)
    budget = int(_exact_minimum(model, x) * 1.1)
    compiled = anode_plan.compile(model, budget, (x,))
    assert compiled.plan.exact and not compiled.plan.approximated and not compiled.plan.chain.sketchable_stages
    assert compiled.plan.recompute_overhead > 0
    grads, grad_x = _gradients(model, compiled, x, y)
    assert torch.equal(grad_x, plain[1]) and all(torch.equal(grads[n], plain[0][n]) for n in grads)


def test_a_budget_the_exact_schedule_meets_without_recompute_is_not_approximated():
    model, x, y = _setup()
    compiled = anode_plan.compile(model, "1GB", (x,), approximate=anode_plan.XConv(probes=PROBES))
    assert compiled.plan.chain.sketchable_stages  # offered...
    assert compiled.plan.exact and compiled.plan.schedule.sketched == ()  # ...and declined
    grads, _ = _gradients(model, compiled, x, y)
    plain, _ = _gradients(model, model, x, y)
    assert all(torch.equal(grads[n], plain[n]) for n in grads)


def test_below_the_exact_minimum_sketches_fit_are_flagged_and_hold_the_budget():
    # float32: the CPU's float64 convolution (im2col) allocates a workspace larger than the tapes a
    # sketch saves, so there the smallest budget is the same with and without sketches.
    model, x, y = _setup(dtype=torch.float32)
    config = anode_plan.XConv(probes=PROBES, seed=3)
    budget = _between_the_minima(model, x, config)
    compiled = anode_plan.compile(model, budget, (x,), approximate=config)
    plan = compiled.plan
    assert not plan.exact
    flagged = {layer.layer: layer for layer in plan.approximated}
    assert flagged and set(flagged) <= {"stem", "ode1.func.conv", "ode2.func.conv"}
    assert all(layer.probes == PROBES and layer.relative_error > 0 for layer in flagged.values())
    report = anode_plan.format_report(plan)
    assert "INEXACT" in report and all(name in report for name in flagged)
    measured = step_peak(compiled, model, x, y)
    assert_budget_promise(measured.peak_bytes, plan.predicted_peak_bytes, plan.budget_bytes, "sketched plan")


def test_sketched_offers_charge_no_random_state_replay():
    """The probes come from each op's own generator, so re-running a sketched stage replays no RNG state: the
    offers' re-runs are charged no generator state (5,056 B on the CPU, which once put the prediction 5.5%
    above the allocator's peak where a sketched re-run set the peak), and the plan replays nothing."""
    model, x, _ = _setup(dtype=torch.float32)
    traced = anode_plan.trace_model(model, (x,))
    chain = anode_plan.lower_to_chain(model, traced, (x,), approximate=anode_plan.XConv(probes=PROBES, seed=3))
    offers = [stage.sketch.stage for stage in chain.stages if stage.sketch is not None]
    assert offers and not any(offer.uses_rng for offer in offers)
    assert not any(stage.uses_rng for stage in chain.with_sketches(chain.sketchable_stages).stages)


def test_sketched_gradients_are_the_sketched_models_under_recompute_and_exact_elsewhere():
    """float64, at a budget where the exact schedule recomputes: the gradients are those of the model with the
    flagged layers sketched under plain autograd (a re-run and the backward see the probes the first run drew),
    and the input, every bias and every layer not sketched are exact.

    Planned on the FLOP model's costs (``calibrate=False``), which take sketches where the
    exact schedule recomputes; on measured costs a sketch is taken only where it measured
    faster (``test_timing.py``), which this tiny model's sketched stages are not."""
    model, x, y = _setup()
    config = anode_plan.XConv(probes=PROBES, seed=3)
    store_all = anode_plan.compile(model, "1GB", (x,), calibrate=False).plan.predicted_peak_bytes
    for fraction in (0.8, 0.5):
        compiled = anode_plan.compile(model, int(store_all * fraction), (x,), approximate=config, calibrate=False)
        flagged = [layer.layer for layer in compiled.plan.approximated]
        assert flagged
        grads, grad_x = _gradients(model, compiled, x, y)
        reference, reference_x = _gradients(model, _sketched_reference(model, flagged, config), x, y)
        torch.testing.assert_close(grad_x, reference_x, rtol=1e-10, atol=1e-12)
        for name in grads:
            torch.testing.assert_close(grads[name], reference[name], rtol=1e-10, atol=1e-12, msg=name)
        exact, exact_x = _gradients(model, model, x, y)
        torch.testing.assert_close(grad_x, exact_x, rtol=1e-10, atol=1e-12)
        for name in grads:
            if name.removesuffix(".weight") not in flagged:
                torch.testing.assert_close(grads[name], exact[name], rtol=1e-10, atol=1e-12, msg=name)
        assert all(not torch.allclose(grads[f"{name}.weight"], exact[f"{name}.weight"]) for name in flagged)
    assert compiled.plan.recompute_overhead > 0  # the smaller budget recomputes sketched stages too


def test_each_training_step_draws_new_probes_in_step_with_the_reference():
    model, x, y = _setup(nt=3, dtype=torch.float32)
    config = anode_plan.XConv(probes=PROBES)
    compiled = anode_plan.compile(model, _between_the_minima(model, x, config), (x,), approximate=config)
    reference = _sketched_reference(model, [layer.layer for layer in compiled.plan.approximated], config)
    steps = [(_gradients(model, compiled, x, y)[0], _gradients(model, reference, x, y)[0]) for _ in range(2)]
    name = f"{compiled.plan.approximated[0].layer}.weight"
    assert not torch.equal(steps[0][0][name], steps[1][0][name])
    for ours, theirs in steps:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-7)


def test_the_sketched_stages_are_measured_and_keep_less():
    model, x, _ = _setup()
    traced = anode_plan.trace_model(model, (x,))
    chain = anode_plan.lower_to_chain(model, traced, (x,), approximate=anode_plan.XConv(probes=PROBES))
    step = next(s for s in chain.stages if s.block is not None)
    offer = step.sketch.stage
    assert step.saves_input and not offer.saves_input  # the conv's input is not kept...
    assert offer.tape_bytes < step.tape_bytes + step.input_bytes  # ...its sketch is, and it is smaller
    assert offer.fwd_cost > step.fwd_cost  # the projections cost something
    assert offer.bwd_bytes != step.bwd_bytes  # the backward's own temporaries are measured, not assumed
    assert step.sketch.layers == ("ode1.func.conv",)


def test_convolutions_xconv_cannot_sketch_stay_exact_and_the_plan_says_so():
    model, x, _ = _setup()
    model.stem = nn.Conv2d(3, 6, 3, padding=2, dilation=2).double()
    traced = anode_plan.trace_model(model, (x,))
    chain = anode_plan.lower_to_chain(model, traced, (x,), calibrate=False, approximate=anode_plan.XConv())
    assert chain.unsketchable_layers == ("stem",)
    assert all("stem" not in s.sketch.layers for s in chain.stages if s.sketch is not None)


def test_a_sketched_plan_saves_and_loads(tmp_path):
    model, x, _ = _setup(nt=3, dtype=torch.float32)
    config = anode_plan.XConv(probes=PROBES)
    compiled = anode_plan.compile(model, _between_the_minima(model, x, config), (x,), approximate=config)
    path = tmp_path / "plan.yaml"
    anode_plan.save_plan(compiled.plan, path)
    loaded = anode_plan.load_plan(path)
    assert loaded.schedule == compiled.plan.schedule and loaded.chain == compiled.plan.chain
    again = anode_plan.compile(model, plan=path)
    assert again.plan.schedule.sketched == compiled.plan.schedule.sketched
    assert [layer.layer for layer in again.plan.approximated] == [layer.layer for layer in compiled.plan.approximated]
    with pytest.raises(anode_plan.PlanMismatchError, match="approximate"):
        anode_plan.compile(model, plan=path, approximate=anode_plan.XConv(probes=PROBES + 1))


def test_bad_approximations_are_refused():
    model, x, _ = _setup(nt=2)
    with pytest.raises(anode_plan.ApproximationSpecError, match="XConv\\(probes=16\\)"):
        anode_plan.compile(model, "1GB", (x,), approximate="xconv")
    with pytest.raises(anode_plan.ApproximationSpecError, match="positive int"):
        anode_plan.XConv(probes=0)


# ------------------------------------------------------------------------------ the choice, on hand-written chains


def _chain(sketch_tape=1, blocks=2, nt=3, sketch_cost=1.2):
    """``blocks`` ODE blocks of ``nt`` unit steps with tape 4, each offering a sketch with tape ``sketch_tape``."""
    stages = []
    for b in range(blocks):
        for step in range(nt):
            sketched = Stage(f"b{b}@{step}", 1, 1, sketch_tape, fwd_cost=sketch_cost, block=b, step=step)
            stages.append(Stage(f"b{b}@{step}", 1, 1, 4, block=b, step=step,
                                sketch=Sketch(sketched, (f"b{b}.conv",), (0.3,), 16)))
    return Chain(tuple(stages), tuple(planners.Block(f"b{b}", b * nt, (b + 1) * nt) for b in range(blocks)))


def _plan(chain, budget):
    return plan_with_sketches(chain, budget, lambda c, b: planners.ChainDP().plan(c, budget_bytes=b))


def test_the_planner_sketches_nothing_when_the_exact_schedule_needs_no_recompute():
    chain = _chain()
    store_all = planners.simulate_plan(chain, planners.StoreAll().plan(chain, budget_bytes=10**6)).peak_bytes
    assert _plan(chain, store_all).sketched == ()


def test_the_planner_sketches_only_what_the_budget_needs():
    chain = _chain()
    exact_min = planners.simulate_plan(chain, planners.ChainDP().plan(chain, budget_bytes=10**6)).peak_bytes
    one_block = planners.simulate_plan(chain.with_sketches(range(3)), planners.StoreAll().plan(
        chain, budget_bytes=10**6)).peak_bytes
    schedule = _plan(chain, one_block)
    assert len({chain.stages[i].block for i in schedule.sketched}) <= 2
    assert planners.simulate_plan(chain, schedule).peak_bytes <= one_block
    assert sketch_groups(chain) == ((0, 1, 2), (3, 4, 5))
    with pytest.raises(planners.InfeasibleBudgetError) as info:
        planners.ChainDP().plan(chain, budget_bytes=1)
    with pytest.raises(planners.InfeasibleBudgetError) as sketched_info:
        _plan(chain, 1)
    assert sketched_info.value.min_budget_bytes < info.value.min_budget_bytes <= exact_min


def test_a_sketch_that_only_lowers_a_peak_within_the_budget_is_dropped():
    chain = _chain(sketch_cost=1.0)  # sketches cost nothing extra: the choice rests on compute alone
    for budget in range(24, 33, 2):
        schedule = _plan(chain, budget)
        blocks = {chain.stages[i].block for i in schedule.sketched}
        assert len(blocks) <= 1, (budget, schedule.sketched)


def test_the_planner_does_not_sketch_where_recompute_is_cheaper():
    # A sketch that saves little and costs more than the recompute it spares is not taken.
    chain = _chain(sketch_tape=4, sketch_cost=50.0)
    budget = planners.simulate_plan(chain, planners.Anode().plan(chain, budget_bytes=10**6)).peak_bytes
    assert _plan(chain, budget).sketched == ()


def test_a_schedule_cannot_sketch_a_stage_without_an_offer():
    chain = Chain.uniform(3)
    schedule = planners.Schedule(tuple(planners.Run(i) for i in range(3)), planner="hand", sketched=(1,))
    with pytest.raises(planners.PlanInvariantError, match="offer no sketch"):
        planners.simulate_plan(chain, schedule)
