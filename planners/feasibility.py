"""Shared checks that a schedule fits a budget, and the error when none does."""

from __future__ import annotations

from typing import Callable, Sequence

from planners.chain import Chain
from planners.errors import InfeasibleBudgetError, format_bytes
from planners.schedule import Op, Schedule
from planners.simulate import Simulation, simulate_plan


def peak_workspace(chain: Chain, simulation: Simulation) -> str:
    """Which kernel's workspace is in ``simulation``'s peak, and where: ``""`` when none is."""
    workspace = simulation.breakdown().get("workspace", 0)
    if not workspace or not 0 <= simulation.peak_stage < len(chain.stages):
        return ""
    stage = chain.stages[simulation.peak_stage]
    kernel = simulation.peak_kernel or "a kernel"
    return (f" (the workspace {format_bytes(workspace)} is what {kernel} allocates inside itself, in the "
            f"{simulation.peak_phase} of stage {stage.name})")


def infeasible_error(chain: Chain, planner: str, budget_bytes: int, smallest: Simulation) -> InfeasibleBudgetError:
    """The error for a budget below ``smallest.peak_bytes``, with what is live at that peak."""
    parts = " + ".join(f"{kind} {format_bytes(nbytes)}" for kind, nbytes in smallest.peak_breakdown if nbytes)
    return InfeasibleBudgetError(
        f"memory budget {format_bytes(budget_bytes)} ({budget_bytes} bytes) is below the smallest "
        f"{planner} schedule for {chain.name}: {format_bytes(smallest.peak_bytes)} = {parts}"
        f"{peak_workspace(chain, smallest)}. Give at least "
        f"{smallest.peak_bytes} bytes, or lower the batch size.",
        budget_bytes=budget_bytes, min_budget_bytes=smallest.peak_bytes, breakdown=smallest.breakdown())


def require_fit(chain: Chain, ops: tuple[Op, ...], budget_bytes: int, planner: str) -> Simulation:
    """Simulate ``ops``; raise :class:`InfeasibleBudgetError` if the peak exceeds the budget."""
    simulation = simulate_plan(chain, ops)
    if simulation.peak_bytes > budget_bytes:
        raise infeasible_error(chain, planner, budget_bytes, simulation)
    return simulation


def fit_per_block(chain: Chain, build: Callable[[Chain, list[int]], tuple[Op, ...]], least: Sequence[int],
                  most: Sequence[int], budget_bytes: int, planner: str) -> tuple[list[int], tuple[Op, ...]]:
    """Choose per-block snapshot counts in ``[least[b], most[b]]``: the cheapest schedule found that fits.

    Walks a path of count vectors that does not depend on the budget: it starts from the
    fewest snapshots everywhere (the least memory), and each step raises the count of the
    block that saves the most compute per extra byte of peak (free steps first) to its
    next rung (:func:`_next_rung`: by one at first, then geometrically). The
    walk stops at the first point over the budget and returns the cheapest point before
    it (ties to the smaller peak). Since the path is the same for every budget, a larger
    budget only lengthens the walk, so it never costs more. (Raising blocks one after
    the other as far as the budget allows lacks that property: the first block takes
    memory a later block would have used better.) Raises :class:`InfeasibleBudgetError`
    if the fewest snapshots everywhere do not fit.
    """
    counts = list(least)
    ops = build(chain, counts)
    current = require_fit(chain, ops, budget_bytes, planner)
    best_key, best_counts, best_ops = (current.step_cost, current.peak_bytes), counts, ops
    while True:
        steps = []
        for block in range(len(counts)):
            if counts[block] < most[block]:
                trial = counts[:block] + [_next_rung(counts[block], least[block], most[block])] + counts[block + 1:]
                trial_ops = build(chain, trial)
                trial_sim = simulate_plan(chain, trial_ops)
                steps.append((_step_rank(current, trial_sim), block, trial, trial_ops, trial_sim))
        if not steps:
            break
        _, _, counts, ops, current = min(steps, key=lambda step: step[:2])
        if current.peak_bytes > budget_bytes:
            break
        if (current.step_cost, current.peak_bytes) < best_key:
            best_key, best_counts, best_ops = (current.step_cost, current.peak_bytes), counts, ops
    return best_counts, best_ops


LADDER_DENSE = 32


def _next_rung(count: int, least: int, most: int) -> int:
    """The next snapshot count of a block's walk: +1 for the first ``LADDER_DENSE``, then ×1.25.

    Bounds the walk to about a hundred simulations per block however long the block is.
    """
    if count < least + LADDER_DENSE:
        return count + 1
    return min(most, max(count + 1, int(count * 1.25)))


def _step_rank(before: Simulation, after: Simulation) -> tuple[int, float, int]:
    """Order of preference of a step of :func:`fit_per_block`'s walk (smallest first)."""
    saved = before.step_cost - after.step_cost
    extra = after.peak_bytes - before.peak_bytes
    if extra <= 0:
        return 0, -saved, extra
    return 1, -saved / extra, extra


def cheapest_fitting(chain: Chain, candidates: Sequence, budget_bytes: int) -> Schedule:
    """The cheapest schedule any of ``candidates`` (planners) plans within the budget.

    Cost is the whole step's (:attr:`~planners.Simulation.step_cost`, region overheads
    included). Ties in simulated cost go to the smaller peak, then to the earlier candidate. If none
    fits, re-raises the candidates' :class:`InfeasibleBudgetError` with the smallest
    ``min_budget_bytes`` (it names the candidate in its message).
    """
    best, smallest = None, None
    for order, planner in enumerate(candidates):
        try:
            schedule = planner.plan(chain, budget_bytes=budget_bytes)
        except InfeasibleBudgetError as error:
            if smallest is None or error.min_budget_bytes < smallest.min_budget_bytes:
                smallest = error
            continue
        simulation = simulate_plan(chain, schedule)
        key = (simulation.step_cost, simulation.peak_bytes, order)
        if best is None or key < best[0]:
            best = (key, schedule)
    if best is None:
        raise smallest
    return best[1]
