"""The CP-SAT planner on graphs that are not chains: U-Net skip connections and torchvision's resnet18."""

from __future__ import annotations

import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
import torchvision

import anode_plan
import planners
from promise import assert_budget_promise
from models import unet_ode
from planners.cpsat import CPSat, PlanningTimeoutError, separate_states


QUICK = CPSat(time_limit_s=2.0)  # the U-Net tests check validity, not how close to optimal a short search gets


def _chain(model, x):
    traced = anode_plan.trace_model(model, (x,))
    return traced, anode_plan.lower_to_chain(model, traced, (x,))


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    model = unet_ode(width=4, nt=3).double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    return (model, x, *_chain(model, x))


def _carries_values(chain):
    return any(set(a) & set(b) - set(chain.state_values[0]) for a, b in zip(chain.state_values, chain.state_values[1:]))


def test_unet_chain_carries_skip_values(unet):
    _, _, _, chain = unet
    assert _carries_values(chain)


def test_every_cpsat_schedule_is_valid_and_fits(unet):
    _, _, _, chain = unet
    store_all = planners.simulate_plan(chain, planners.StoreAll().plan(chain, budget_bytes=1 << 60)).peak_bytes
    minimum = None
    for fraction in (1.2, 1.0, 0.8, 0.6, 0.45, 0.3, 0.2):
        budget = int(store_all * fraction)
        try:
            schedule = QUICK.plan(chain, budget_bytes=budget)
        except planners.InfeasibleBudgetError as error:
            assert error.min_budget_bytes > budget
            minimum = error.min_budget_bytes
            continue
        planners.validate_schedule(schedule, len(chain.stages))
        assert planners.simulate_plan(chain, schedule).peak_bytes <= budget
        assert schedule.planner == "cp-sat"
    assert minimum is not None, "expected the smallest budgets to be infeasible"
    QUICK.plan(chain, budget_bytes=minimum)  # the reported minimum is itself feasible


def test_cpsat_reaches_below_the_landmark_minimum_on_a_dag(unet):
    _, _, _, chain = unet
    with pytest.raises(planners.InfeasibleBudgetError) as landmark:
        planners.Landmarks().plan(chain, budget_bytes=1)
    with pytest.raises(planners.InfeasibleBudgetError) as cpsat:
        CPSat().plan(chain, budget_bytes=1)
    assert cpsat.value.min_budget_bytes < landmark.value.min_budget_bytes


def test_unet_gradients_exact_and_memory_within_budget(unet):
    model, x, traced, chain = unet
    reference = copy.deepcopy(model)
    ref_x = x.clone().requires_grad_()
    reference(ref_x).square().mean().backward()
    with pytest.raises(planners.InfeasibleBudgetError) as info:
        CPSat().plan(chain, budget_bytes=1)
    for budget in (info.value.min_budget_bytes, int(info.value.min_budget_bytes * 1.5)):
        model.zero_grad(set_to_none=True)
        x_in = x.clone().requires_grad_()  # planned as it trains: the input's gradient is charged
        compiled = anode_plan.compile(model, budget + x.nbytes, (x_in,), planner=QUICK)
        compiled(x_in)  # warm-up
        model.zero_grad(set_to_none=True)
        x_in.grad = None
        measured = anode_plan.measure_peak_memory(lambda: compiled(x_in).square().mean().backward()).peak_bytes
        assert len(compiled.plans) == 1
        assert_budget_promise(measured, compiled.plan.predicted_peak_bytes, budget + x.nbytes,
                              compiled.plan.schedule.description)
        torch.testing.assert_close(x_in.grad, ref_x.grad, rtol=1e-10, atol=1e-13)
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-13, msg=name)


def test_resnet18_through_the_same_path():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    reference = copy.deepcopy(model)
    x = torch.randn(4, 3, 128, 128)  # float32: activations outweigh the 45 MB of parameter gradients
    traced, chain = _chain(model, x)
    assert len(chain.stages) >= 10
    store_all = planners.simulate_plan(chain, planners.StoreAll().plan(chain, budget_bytes=1 << 60)).peak_bytes
    with pytest.raises(planners.InfeasibleBudgetError) as info:
        CPSat().plan(chain, budget_bytes=1)
    budget = (info.value.min_budget_bytes + store_all) // 2
    compiled = anode_plan.compile(model, budget, (x,), planner=CPSat())
    assert planners.count_regions(compiled.plan.schedule.ops) >= 1
    compiled(x)
    model.zero_grad(set_to_none=True)
    measured = anode_plan.measure_peak_memory(lambda: compiled(x).sum().backward()).peak_bytes
    assert_budget_promise(measured, compiled.plan.predicted_peak_bytes, budget, compiled.plan.schedule.description)
    reference(x)  # the compiled model ran forward twice: BatchNorm statistics match after the same count
    reference(x).sum().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)
    for (name, b), c in zip(model.named_buffers(), reference.buffers()):
        torch.testing.assert_close(b, c, rtol=1e-6, atol=1e-7, msg=name)


def test_time_limit_is_explicit_and_reported():
    chain = planners.Chain.uniform(12, state_bytes=10, tape_bytes=30)
    tiny = CPSat(time_limit_s=1e-9)
    try:
        schedule = tiny.plan(chain, budget_bytes=10**6)
    except PlanningTimeoutError as error:
        assert "time_limit_s" in str(error)
    else:  # solved before the limit bit: it must then be a checked schedule
        assert planners.simulate_plan(chain, schedule).peak_bytes <= 10**6


def test_cpsat_is_deterministic(unet):
    _, _, _, chain = unet
    budget = planners.simulate_plan(chain, planners.Anode().plan(chain, budget_bytes=1 << 60)).peak_bytes
    assert QUICK.plan(chain, budget_bytes=budget) == QUICK.plan(chain, budget_bytes=budget)


def _random_odenet_chain(seed):
    import random
    rng = random.Random(seed)
    names, blocks = [], []
    for b in range(rng.randint(1, 3)):
        names.append((f"layer{b}", None, None))
        start = len(names)
        names += [(f"block{b}@{i}", b, i) for i in range(rng.randint(2, 5))]
        blocks.append(planners.Block(f"block{b}", start, len(names)))
    sizes = [rng.randint(1, 8) * 1000 for _ in range(len(names) + 1)]
    stages = tuple(planners.Stage(name, sizes[i], sizes[i + 1], rng.randint(1, 20) * 1000,
                                  fwd_cost=rng.uniform(1, 3), bwd_cost=rng.uniform(2, 5), block=b, step=s)
                   for i, (name, b, s) in enumerate(names))
    return planners.Chain(stages, tuple(blocks))


def _minimum(planner, chain):
    with pytest.raises(planners.InfeasibleBudgetError) as info:
        planner.plan(chain, budget_bytes=1)
    return info.value.min_budget_bytes


@st.composite
def _plain_chains(draw):
    """Chains of up to 8 stages: random sizes, tapes, saved tensors, shared parameters."""
    n = draw(st.integers(1, 8))
    sizes = draw(st.lists(st.integers(1, 8), min_size=n + 1, max_size=n + 1))
    stages = tuple(planners.Stage(
        f"s{i}", sizes[i] * 1000, sizes[i + 1] * 1000, draw(st.integers(0, 20)) * 1000,
        saves_input=draw(st.booleans()), saves_output=draw(st.booleans()),
        rerun_taped_bytes=draw(st.sampled_from([-1, -1, 4000, 30000])),
        fwd_cost=draw(st.sampled_from([1.0, 1.5, 2.25])), bwd_cost=draw(st.sampled_from([2.0, 3.5])),
        param_ids=draw(st.sampled_from([(), (0,), (1,), (0, 1)]))) for i in range(n))
    return planners.Chain(stages, param_grad_bytes=(700, 300), input_grad=draw(st.booleans()))


@settings(max_examples=25)
@given(chain=_plain_chains(), fraction=st.sampled_from([0.0, 0.15, 0.4, 0.7, 1.0]))
def test_on_chains_cpsat_agrees_with_the_exact_dp(chain, fraction):
    """Without the DP's schedule as a hint, CP-SAT proves the DP's optimum: same cost, same minimum budget."""
    cpsat, dp = CPSat(hint=False, body_points=None), planners.ChainDP(two_level=False)
    minimum = _minimum(dp, chain)
    assert _minimum(cpsat, chain) == minimum
    store_all = planners.simulate_plan(chain, planners.StoreAll().plan(chain, budget_bytes=1 << 60)).peak_bytes
    budget = minimum + int((store_all - minimum) * fraction)
    schedule = cpsat.plan(chain, budget_bytes=budget)
    assert schedule.proven_optimal
    simulation = planners.simulate_plan(chain, schedule)
    optimum = planners.simulate_plan(chain, dp.plan(chain, budget_bytes=budget))
    assert simulation.peak_bytes <= budget
    assert simulation.compute_cost == pytest.approx(optimum.compute_cost, rel=1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_on_odenet_chains_cpsat_with_its_defaults_reaches_the_dp_optimum(seed):
    """ODE blocks of 2-5 steps between layers, 9-18 stages: the default planner, thinned bodies and all."""
    chain = _random_odenet_chain(seed)
    minimum = _minimum(planners.ChainDP(two_level=False), chain)
    assert _minimum(CPSat(), chain) == minimum
    store_all = planners.simulate_plan(chain, planners.StoreAll().plan(chain, budget_bytes=1 << 60)).peak_bytes
    for fraction in (0.1, 0.5, 0.9):
        budget = minimum + int((store_all - minimum) * fraction)
        cost = planners.simulate_plan(chain, CPSat().plan(chain, budget_bytes=budget)).compute_cost
        optimum = planners.simulate_plan(chain, planners.ChainDP(two_level=False).plan(chain, budget_bytes=budget))
        assert cost == pytest.approx(optimum.compute_cost, rel=1e-9)


def test_separate_states_never_understate_a_peak(unet):
    """The bodies CP-SAT takes from the DP on a graph are priced on this chain: it must be pessimistic."""
    _, _, _, chain = unet
    separate = separate_states(chain)
    assert not planners.carries_values(separate)
    for planner in (planners.StoreAll(), planners.Anode(), planners.Revolve(snapshots=2)):
        ops = planner.plan(chain, budget_bytes=1 << 60).ops
        assert planners.simulate_plan(separate, ops).peak_bytes >= planners.simulate_plan(chain, ops).peak_bytes
