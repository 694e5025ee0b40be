"""Choose where to sketch convolutions (XConv, inexact, opt-in): only where it lets the budget be met or makes
the step faster, as the chain's costs count it. On a calibrated chain those are the sketched and exact stages'
times measured on the device, and a sketch must win by more than the timings' noise
(:func:`~planners.chain.tie_tolerance`); FLOP counts alone under-rate a sketched stage's time
(``benchmarks/RESULTS.md``, "XConv").

A stage whose convolutions can be sketched offers a :class:`~planners.chain.Sketch`: the
same stage keeping ``probes`` projections of each convolution's input instead of the
input (Siahkoohi et al., arXiv 2106.06998), with its own measured bytes and cost and the
weight gradients' relative error. The offers are grouped as the user sees them: the
steps of one ODE block share their convolutions, so they are sketched together; any other
stage is a group of its own.

:func:`plan_with_sketches` wraps any exact planner. The exact schedule is planned first,
and is kept when it fits with no recompute (a sketch could only add cost). Otherwise the
groups are added one at a time, those keeping the most bytes first: while nothing fits
each is added, since each lowers the memory needed; once a schedule fits a group stays
only when the schedule found with it is cheaper (beyond the timings' noise). A last pass drops every group the
schedule can do without at no extra cost, least saving first, so no layer is
approximated without a reason. Each attempt is one exact planning run: at most ``2·G + 1``
plans for ``G`` groups.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

from planners.chain import Chain, tie_tolerance
from planners.errors import InfeasibleBudgetError
from planners.schedule import Schedule
from planners.simulate import Simulation, simulate_plan


def sketch_groups(chain: Chain) -> tuple[tuple[int, ...], ...]:
    """The stages offering a sketch, grouped by ODE block (a stage outside blocks alone), most bytes saved first."""
    groups: dict[object, list[int]] = {}
    for index in chain.sketchable_stages:
        block = chain.stages[index].block
        groups.setdefault(("block", block) if block is not None else ("stage", index), []).append(index)

    def kept(stage) -> int:
        return stage.tape_bytes + stage.input_bytes * stage.saves_input + stage.output_bytes * stage.saves_output

    def saving(group: list[int]) -> int:
        return sum(kept(chain.stages[i]) - kept(chain.stages[i].sketch.stage) for i in group)

    ordered = sorted(groups.values(), key=lambda group: (-saving(group), group[0]))
    return tuple(tuple(group) for group in ordered)


def plan_with_sketches(chain: Chain, budget_bytes: int, plan: Callable[[Chain, int], Schedule]) -> Schedule:
    """The cheapest schedule ``plan`` finds within the budget, sketching convolutions only where it pays.

    ``plan(chain, budget_bytes)`` is an exact planner (it may raise
    :class:`InfeasibleBudgetError`). Raises the error with the smallest budget when
    nothing fits even with every offered sketch taken.
    """
    groups = sketch_groups(chain)
    tie = tie_tolerance(chain)
    smallest: InfeasibleBudgetError | None = None
    overshoot: int | None = None

    def infeasible() -> InfeasibleBudgetError:
        if smallest is not None:
            return smallest
        return InfeasibleBudgetError(f"no schedule of {chain.name} fits {budget_bytes} bytes, with or without "
                                     "sketches", budget_bytes=budget_bytes, min_budget_bytes=overshoot)

    def attempt(chosen: list[tuple[int, ...]]) -> tuple[Simulation, Schedule] | None:
        nonlocal smallest, overshoot
        stages = tuple(sorted(i for group in chosen for i in group))
        try:
            schedule = plan(chain.with_sketches(stages), budget_bytes)
        except InfeasibleBudgetError as error:
            if smallest is None or error.min_budget_bytes < smallest.min_budget_bytes:
                smallest = error
            return None
        if stages:
            layers = sorted({layer for i in stages for layer in chain.stages[i].sketch.layers})
            schedule = replace(schedule, sketched=stages, proven_optimal=False,
                               description=f"{schedule.description}; XConv sketches in {len(stages)} stages "
                                           f"({', '.join(layers)})")
        simulation = simulate_plan(chain, schedule)
        if simulation.peak_bytes > budget_bytes:  # a planner's schedule over its budget: not expected
            overshoot = simulation.peak_bytes if overshoot is None else min(overshoot, simulation.peak_bytes)
            return None
        return simulation, schedule  # compared by compute alone: lowering a peak already within budget buys nothing

    best = attempt([])
    if not groups or (best is not None and best[0].recompute_cost == 0):
        if best is None:
            raise infeasible()
        return best[1]
    chosen: list[tuple[int, ...]] = []
    for group in groups:
        trial = attempt(chosen + [group])
        if best is None or (trial is not None and trial[0].step_cost < best[0].step_cost * (1 - tie)):
            chosen.append(group)
            best = trial if trial is not None else best
    if best is None:
        raise infeasible()
    for group in reversed(list(chosen)):
        rest = [g for g in chosen if g != group]
        trial = attempt(rest)
        if trial is not None and trial[0].step_cost <= best[0].step_cost:
            chosen, best = rest, trial
    return best[1]
