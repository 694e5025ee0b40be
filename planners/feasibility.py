"""Shared checks that a schedule fits a budget, and the error when none does."""

from __future__ import annotations

from typing import Callable, Sequence

from planners.chain import Chain
from planners.errors import InfeasibleBudgetError, format_bytes
from planners.schedule import Op
from planners.simulate import Simulation, simulate_plan


def infeasible_error(chain: Chain, planner: str, budget_bytes: int, smallest: Simulation) -> InfeasibleBudgetError:
    """The error for a budget below ``smallest.peak_bytes``, with what is live at that peak."""
    parts = " + ".join(f"{kind} {format_bytes(nbytes)}" for kind, nbytes in smallest.peak_breakdown if nbytes)
    return InfeasibleBudgetError(
        f"memory budget {format_bytes(budget_bytes)} ({budget_bytes} bytes) is below the smallest "
        f"{planner} schedule for {chain.name}: {format_bytes(smallest.peak_bytes)} = {parts}. Give at least "
        f"{smallest.peak_bytes} bytes, or lower the batch size.",
        budget_bytes=budget_bytes, min_budget_bytes=smallest.peak_bytes, breakdown=smallest.breakdown())


def require_fit(chain: Chain, ops: tuple[Op, ...], budget_bytes: int, planner: str) -> Simulation:
    """Simulate ``ops``; raise :class:`InfeasibleBudgetError` if the peak exceeds the budget."""
    simulation = simulate_plan(chain, ops)
    if simulation.peak_bytes > budget_bytes:
        raise infeasible_error(chain, planner, budget_bytes, simulation)
    return simulation


def fit_per_block(chain: Chain, build: Callable[[Chain, list[int]], tuple[Op, ...]],
                  most: Sequence[int], budget_bytes: int, planner: str) -> tuple[list[int], tuple[Op, ...]]:
    """Choose, block by block, the largest snapshot count in ``[1, most[b]]`` that fits.

    Starts from one snapshot everywhere (the least memory), then raises each block's
    count as far as the budget allows, the others fixed, by bisection on the
    simulated peak. Raises :class:`InfeasibleBudgetError` if one snapshot everywhere
    does not fit.
    """
    counts = [1] * len(chain.blocks)
    require_fit(chain, build(chain, counts), budget_bytes, planner)
    for block in range(len(chain.blocks)):
        low, high = counts[block], most[block]
        while low < high:
            mid = (low + high + 1) // 2
            trial = counts[:block] + [mid] + counts[block + 1:]
            if simulate_plan(chain, build(chain, trial)).peak_bytes <= budget_bytes:
                low = mid
            else:
                high = mid - 1
        counts[block] = low
    ops = build(chain, counts)
    require_fit(chain, ops, budget_bytes, planner)
    return counts, ops
