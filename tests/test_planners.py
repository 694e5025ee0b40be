"""The planners: revolve's closed form, its schedules, and every planner against the simulator.

Revolve numbers are pinned to the table of docs/algorithms.md §2 and to an independent
brute-force recurrence. Every planner is run on random ODE-network chains and random
budgets and judged by :func:`planners.simulate_plan`, the independent checker.
"""

from __future__ import annotations

import os
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from planners import (Anode, Block, Chain, InfeasibleBudgetError, Landmarks, Region, Revolve, Run, Schedule,
                      Stage, StoreAll, binomial_beta, optimal_advances, optimal_split, repetition_number,
                      revolve_ops, simulate_plan, validate_schedule)

REPO_ROOT = Path(__file__).resolve().parents[1]

# (n, s, r, t) from docs/algorithms.md §2.
REFERENCE_TABLE = [
    (10, 1, 9, 45),
    (10, 2, 3, 20),
    (20, 3, 3, 45),
    (100, 5, 4, 316),
    (100, 10, 3, 222),
    (1000, 5, 8, 6284),
    (1000, 10, 4, 3636),
]


@lru_cache(maxsize=None)
def brute_force_advances(n: int, s: int) -> int:
    """t(n, s) from the recurrence alone (docs/algorithms.md §2), independent of the closed form."""
    if n == 1:
        return 0
    if s == 1:
        return n * (n - 1) // 2
    return min(k + brute_force_advances(n - k, s - 1) + brute_force_advances(k, s) for k in range(1, n))


# --------------------------------------------------------------------------- revolve closed form

@pytest.mark.parametrize("n, s, r, t", REFERENCE_TABLE)
def test_closed_form_matches_reference_table(n, s, r, t):
    assert repetition_number(n, s) == r
    assert optimal_advances(n, s) == t
    # r is the least repetition number whose binomial reach covers n.
    assert binomial_beta(s, r) >= n > binomial_beta(s, r - 1)


def test_closed_form_matches_brute_force_recurrence():
    for n in range(1, 41):
        for s in range(1, 9):
            assert optimal_advances(n, s) == brute_force_advances(n, s), (n, s)


def test_closed_form_edge_cases():
    for n in range(1, 30):
        assert optimal_advances(n, 1) == n * (n - 1) // 2
        for s in range(n - 1, n + 3):
            if s >= 1:
                assert optimal_advances(n, s) == n - 1  # n <= s + 1: keep every state
    assert optimal_advances(1, 0) == 0  # one step needs no slot beyond its input
    assert binomial_beta(3, -1) == 0
    with pytest.raises(ValueError, match="at least one step"):
        optimal_advances(0, 3)
    with pytest.raises(ValueError, match="at least one snapshot"):
        revolve_ops(0, 5, 0)
    with pytest.raises(ValueError, match="at least 2 steps"):
        optimal_split(1, 3)


def test_optimal_split_attains_the_recurrence():
    for n in range(2, 61):
        for s in range(1, 11):
            k = optimal_split(n, s)
            assert 1 <= k < n, (n, s, k)
            # For s = 1 the right part must be the single taped step: t(1, 0) = 0, and
            # optimal_advances raises for t(m > 1, 0).
            assert k + optimal_advances(n - k, s - 1) + optimal_advances(k, s) == optimal_advances(n, s), (n, s, k)
            assert optimal_advances(n, s) == brute_force_advances(n, s)


# --------------------------------------------------------------------------- revolve schedules

def _revolve_simulation(n: int, s: int, *, tape_bytes: int = 1):
    return simulate_plan(Chain.uniform(n, state_bytes=1, tape_bytes=tape_bytes), revolve_ops(0, n, s))


@pytest.mark.parametrize("n, s, r, t", REFERENCE_TABLE)
def test_revolve_ops_performs_the_optimal_advances(n, s, r, t):
    sim = _revolve_simulation(n, s)
    assert sim.recomputed_forwards == t
    assert max(sim.forward_counts) <= r + 1  # r advances plus the taped turn


@given(n=st.integers(1, 200), s=st.integers(1, 30))
def test_revolve_ops_random_sizes(n, s):
    ops = revolve_ops(0, n, s)
    validate_schedule(ops, n)
    sim = _revolve_simulation(n, s)
    assert sim.recomputed_forwards == optimal_advances(n, s)
    assert max(sim.forward_counts) <= repetition_number(n, s) + 1


def test_revolve_ops_offsets_into_a_chain():
    ops = revolve_ops(5, 15, 3)
    flat = (Run(0), Run(1), Run(2), Run(3), Run(4)) + ops + (Run(15),)
    sim = simulate_plan(Chain.uniform(16), flat)
    assert sim.recomputed_forwards == optimal_advances(10, 3)
    assert sim.forward_counts[:5] == (1,) * 5 and sim.forward_counts[15] == 1


# Peak memory of revolve on a unit chain whose tapes dwarf its states (state 1 byte, tape
# 1000 bytes, head 2 bytes), from the model in planners/simulate.py. revolve_ops never
# holds two tapes at once, and its peak is at the loss, where live are:
#     the tape of the last step                               1000
#   + x_{n-1}, held by that tape                                 1
#   + the top-level snapshots other than x_0        min(s, n-1) - 1   (x_0 is the network
#                                                                      input: 0 bytes)
#   + x_n, the network output                                    1
#   + the output gradient                                        1
#   + the loss head, 2 * output, transient                       2
# = tape + 4 + min(s, n-1)  for n >= 2:  at most s stored states on top of a constant 4.
# The breakdown is recorded where the peak is first reached, so checking that it is the
# loss's also checks that no recomputation goes above it.
REVOLVE_OVERHEAD_BYTES = 4


@pytest.mark.parametrize("n", [2, 3, 5, 10, 20, 33, 60])
def test_revolve_peak_grows_with_snapshots_and_counts_at_most_s_states(n):
    tape = 1000
    peaks = []
    for s in range(1, n + 3):
        sim = _revolve_simulation(n, s, tape_bytes=tape)
        assert sim.peak_bytes - tape - REVOLVE_OVERHEAD_BYTES <= s
        assert sim.peak_bytes == tape + REVOLVE_OVERHEAD_BYTES + min(s, n - 1)
        assert sim.breakdown() == {"states": min(s, n - 1) + 1, "tapes": tape, "gradients": 1,
                                   "parameter gradients": 0, "transient": 2, "workspace": 0}
        peaks.append(sim.peak_bytes)
    assert peaks == sorted(peaks)


@pytest.mark.parametrize("n, s", [(1000, 5), (1000, 10)])
def test_revolve_peak_on_reference_rows(n, s):
    assert _revolve_simulation(n, s, tape_bytes=1000).peak_bytes == 1000 + REVOLVE_OVERHEAD_BYTES + s


# --------------------------------------------------------------------------- random ODE-network chains

@st.composite
def odenet_chains(draw) -> Chain:
    """1-3 ODE blocks of 1-12 steps, with optional plain stages before, between and after.

    Every block keeps one state size across its steps; sizes, tapes, costs and parameter
    gradients are random small integers, so every peak is exact.
    """
    stages: list[Stage] = []
    blocks: list[Block] = []
    size = draw(st.integers(1, 50))
    num_blocks = draw(st.integers(1, 3))
    param_grad_bytes = tuple(draw(st.lists(st.integers(0, 20), min_size=num_blocks + 1, max_size=num_blocks + 1)))

    def plain_stage(name: str) -> None:
        nonlocal size
        new_size = draw(st.integers(1, 50))
        stages.append(Stage(name, size, new_size, draw(st.integers(1, 50)),
                            fwd_cost=float(draw(st.integers(1, 5))), bwd_cost=float(draw(st.integers(1, 10))),
                            param_ids=(num_blocks,) if draw(st.booleans()) else ()))
        size = new_size

    for b in range(num_blocks):
        if draw(st.booleans()):
            plain_stage(f"layer{b}")
        steps = draw(st.integers(1, 12))
        tape = draw(st.integers(1, 50))
        fwd_cost = float(draw(st.integers(1, 5)))
        start = len(stages)
        for i in range(steps):
            stages.append(Stage(f"block{b}@step{i}", size, size, tape, fwd_cost=fwd_cost,
                                bwd_cost=2 * fwd_cost, param_ids=(b,), block=b, step=i))
        blocks.append(Block(f"block{b}", start, len(stages)))
    if draw(st.booleans()):
        plain_stage("head")
    return Chain(tuple(stages), tuple(blocks), param_grad_bytes=param_grad_bytes, name="random-odenet")


PLANNERS = [StoreAll(), Anode(), Anode(snapshots=2), Anode(snapshots="auto"), Revolve(), Revolve(snapshots=3),
            Landmarks()]
PLANNER_IDS = ["store-all", "anode", "anode-s2", "anode-auto", "revolve", "revolve-s3", "landmarks"]


def store_all_peak(chain: Chain) -> int:
    return simulate_plan(chain, tuple(Run(i) for i in range(len(chain)))).peak_bytes


@pytest.mark.parametrize("planner", PLANNERS, ids=PLANNER_IDS)
@given(chain=odenet_chains(), percent=st.integers(0, 120))
def test_planner_fits_the_budget_or_says_how_much_it_needs(planner, chain, percent):
    budget = store_all_peak(chain) * percent // 100
    try:
        schedule = planner.plan(chain, budget_bytes=budget)
    except InfeasibleBudgetError as error:
        assert error.budget_bytes == budget
        assert error.min_budget_bytes > budget
        # The minimum is a real schedule's peak: planning at exactly that budget succeeds.
        at_minimum = planner.plan(chain, budget_bytes=error.min_budget_bytes)
        assert simulate_plan(chain, at_minimum).peak_bytes <= error.min_budget_bytes
        return
    assert isinstance(schedule, Schedule)
    validate_schedule(schedule, len(chain))
    sim = simulate_plan(chain, schedule)
    assert sim.peak_bytes <= budget
    assert all(count >= 1 for count in sim.forward_counts)


@pytest.mark.parametrize("planner", PLANNERS, ids=PLANNER_IDS)
@given(chain=odenet_chains())
def test_planner_is_deterministic(planner, chain):
    budget = store_all_peak(chain) * 2
    rebuilt = Chain(tuple(chain.stages), tuple(chain.blocks), param_grad_bytes=chain.param_grad_bytes,
                    name=chain.name)
    first = planner.plan(chain, budget_bytes=budget)
    assert planner.plan(chain, budget_bytes=budget) == first
    assert planner.plan(rebuilt, budget_bytes=budget) == first


ADAPTIVE_PLANNERS = [Revolve(), Anode(snapshots="auto"), Landmarks()]
ADAPTIVE_IDS = ["revolve", "anode-auto", "landmarks"]


def assert_cost_never_grows(planner, chain: Chain, budgets) -> list[float]:
    """Plan at each budget in increasing order; return the costs of the feasible ones."""
    costs: list[float] = []
    for budget in sorted(budgets):
        try:
            schedule = planner.plan(chain, budget_bytes=budget)
        except InfeasibleBudgetError:
            assert not costs, f"feasible below {budget} bytes but not at it"
            continue
        cost = simulate_plan(chain, schedule).compute_cost
        assert not costs or cost <= costs[-1], f"budget {budget} bytes costs {cost} > {costs[-1]}"
        costs.append(cost)
    return costs


@pytest.mark.parametrize("planner", ADAPTIVE_PLANNERS, ids=ADAPTIVE_IDS)
@given(chain=odenet_chains(), percents=st.lists(st.integers(0, 130), min_size=2, max_size=8, unique=True))
def test_cost_never_grows_with_the_budget(planner, chain, percents):
    top = store_all_peak(chain)
    assert_cost_never_grows(planner, chain, [top * percent // 100 for percent in percents])


def two_block_chain() -> Chain:
    """Block 0: 3 steps of 10-byte states; block 1: 12 steps of 1-byte states; tapes 100.

    A snapshot of block 0 costs ten times the memory of one of block 1 and saves far less
    compute. Raising block 0 first, as far as the budget allowed, made a larger budget
    cost more: 63 (revolve, snapshots [1, 10]) at 236 bytes, then 76 at 237 bytes, where
    block 0 took a second snapshot and left block 1 only one.
    """
    stages = [Stage(f"a{i}", 10, 10, 100, block=0, step=i) for i in range(3)]
    stages.append(Stage("down", 10, 1, 1))
    stages += [Stage(f"b{i}", 1, 1, 100, block=1, step=i) for i in range(12)]
    return Chain(tuple(stages), (Block("a", 0, 3), Block("b", 4, 16)), name="two-blocks")


@pytest.mark.parametrize("planner", ADAPTIVE_PLANNERS, ids=ADAPTIVE_IDS)
def test_cost_never_grows_with_the_budget_across_blocks(planner):
    chain = two_block_chain()
    costs = assert_cost_never_grows(planner, chain, [200, *range(226, 250), 300])
    assert costs, "no budget in the range was feasible"


def test_revolve_spends_memory_on_the_block_where_it_saves_most():
    chain = two_block_chain()
    # 237 bytes allow ten more 1-byte snapshots of block 1, or one more 10-byte snapshot
    # of block 0: the second saves one forward, the first dozens.
    schedule = Revolve().plan(chain, budget_bytes=237)
    assert schedule.description == "revolve, snapshots per block [1, 11]"
    assert simulate_plan(chain, schedule).peak_bytes == 237


@given(chain=odenet_chains())
def test_landmarks_with_room_for_everything_is_store_all(chain):
    schedule = Landmarks().plan(chain, budget_bytes=10 * store_all_peak(chain))
    sim = simulate_plan(chain, schedule)
    assert schedule.planner == "landmarks:store-all"
    assert sim.recomputed_forwards == 0
    assert sim.compute_cost == sim.baseline_cost
    assert schedule.ops == StoreAll().plan(chain, budget_bytes=10 * store_all_peak(chain)).ops


@given(chain=odenet_chains())
def test_landmarks_is_the_cheapest_of_its_candidates(chain):
    budget = store_all_peak(chain)  # every candidate can plan here, store-all included
    chosen = simulate_plan(chain, Landmarks().plan(chain, budget_bytes=budget)).compute_cost
    for planner in (StoreAll(), Anode(), Revolve(), Anode(snapshots="auto")):
        try:
            other = planner.plan(chain, budget_bytes=budget)
        except InfeasibleBudgetError:
            continue
        assert chosen <= simulate_plan(chain, other).compute_cost


def test_planners_import_no_torch():
    code = "import planners, sys; assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, check=True)


# --------------------------------------------------------------------------- planners on unit chains

def test_anode_on_one_uniform_block():
    n = 9
    chain = Chain.uniform(n)
    schedule = Anode().plan(chain, budget_bytes=10**9)
    assert schedule.ops == (Region(0, n, tuple(Run(i) for i in range(n))),)
    sim = simulate_plan(chain, schedule)
    assert sim.forward_counts == (2,) * n
    assert sim.compute_cost == 2 * n + n  # docs/algorithms.md §1: 2·Nt·f + Nt·g with f = g = 1


@pytest.mark.parametrize("n, s", [(10, 1), (10, 2), (20, 3), (12, 11), (12, 40)])
def test_anode_with_snapshots_recomputes_the_block_with_revolve(n, s):
    chain = Chain.uniform(n)
    sim = simulate_plan(chain, Anode(snapshots=s).plan(chain, budget_bytes=10**9))
    # One untaped forward of the block, then revolve's t + n forwards in its recompute.
    assert sim.recomputed_forwards == n + optimal_advances(n, min(s, n - 1))


@pytest.mark.parametrize("n, s", [(10, 1), (10, 2), (20, 3), (100, 5), (12, 40)])
def test_revolve_planner_on_one_uniform_block(n, s):
    chain = Chain.uniform(n, tape_bytes=1000)
    schedule = Revolve(snapshots=s).plan(chain, budget_bytes=10**9)
    assert schedule.ops == revolve_ops(0, n, min(s, n - 1))
    assert simulate_plan(chain, schedule).recomputed_forwards == optimal_advances(n, min(s, n - 1))


def test_revolve_auto_takes_the_most_snapshots_that_fit():
    # Uniform block, tape 1000: revolve with s slots peaks at 1004 + s (see above).
    n = 30
    chain = Chain.uniform(n, tape_bytes=1000)
    for s in (1, 2, 5, 17, 29):
        schedule = Revolve().plan(chain, budget_bytes=1004 + s)
        assert schedule.ops == revolve_ops(0, n, s), s
    with pytest.raises(InfeasibleBudgetError) as info:
        Revolve().plan(chain, budget_bytes=1004)
    assert info.value.min_budget_bytes == 1005


def test_planners_on_a_chain_without_blocks_store_everything():
    chain = Chain.uniform(4, as_block=False)
    store_all = StoreAll().plan(chain, budget_bytes=10**6)
    for planner in PLANNERS:
        assert planner.plan(chain, budget_bytes=10**6).ops == store_all.ops


# --------------------------------------------------------------------------- InfeasibleBudgetError

@pytest.mark.parametrize("planner", PLANNERS, ids=PLANNER_IDS)
def test_infeasible_budget_error_names_budget_and_minimum(planner):
    chain = Chain.uniform(12, state_bytes=3, tape_bytes=50)
    with pytest.raises(InfeasibleBudgetError) as info:
        planner.plan(chain, budget_bytes=7)
    error = info.value
    message = str(error)
    assert error.budget_bytes == 7
    assert "(7 bytes)" in message
    assert f"Give at least {error.min_budget_bytes} bytes" in message
    assert error.min_budget_bytes > 7
    assert sum(error.breakdown.values()) == error.min_budget_bytes
    assert isinstance(error, ValueError)
    # The minimum is feasible, and one byte less is not.
    schedule = planner.plan(chain, budget_bytes=error.min_budget_bytes)
    assert simulate_plan(chain, schedule).peak_bytes == error.min_budget_bytes
    with pytest.raises(InfeasibleBudgetError):
        planner.plan(chain, budget_bytes=error.min_budget_bytes - 1)
