"""The checkpoints a plan leaves the adaptive ODE blocks, and how the budget is shared with them.

How the budget is shared (:func:`plan_sharing_adaptive`, :func:`adaptive_checkpoints`): the
rest of the network is planned under its minimum plus a share of what the minimum leaves
of the budget, and the adaptive blocks share what that plan leaves, equally, as checkpoints
of ``(y, f)`` beyond the first. On a measured chain the share is the one, of 0, 1/4, 1/2,
3/4 and all of the slack, whose predicted step is fastest: the network's plan priced by
the simulator, each adaptive block's time at its checkpoints by :func:`adaptive_saving`
(its solve timed at one checkpoint, less the steps more checkpoints spare it from
re-running, as :mod:`planners.online` counts them); ties (within the timings' noise) go to
half. A nominal chain has no time for the blocks, and keeps half. Each block then checkpoints online inside its share
(:mod:`planners.online`), so the step's peak stays within the budget whatever number of
steps the solves take; when even the minimum does not fit, the plan fails with
:class:`~anode_plan.InfeasibleBudgetError` as for any stage. The block as a stage:
:mod:`anode_plan.measure.adaptive_profile`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

from anode_plan.ode.block import ADAPTIVE
from planners import Chain, Schedule, Simulation, simulate_plan
from planners.chain import tie_tolerance
from planners.errors import InfeasibleBudgetError
from planners.online import OnlineCheckpointing, recomputed_steps, reverse_actions

NEVER_RECOMPUTED_COST = 1e9
"""An adaptive block's forward cost as the planners see it (:func:`planning_view`): so high that no schedule
recomputes it (its solve keeps its own checkpoints instead)."""

SHARES = (2, 1, 3, 0, 4)
"""The network's share of the slack, in quarters, in the order ties are broken."""


def adaptive_stages(chain: Chain) -> tuple[int, ...]:
    """The stages of the chain that are adaptive blocks (each such block is one stage)."""
    return tuple(block.start for block in chain.blocks if block.method in ADAPTIVE)


def _checkpoint_bytes(chain: Chain, stage: int) -> int:
    """One checkpoint of the adaptive block at ``stage``: its state and the state's derivative."""
    return 2 * chain.stages[stage].input_bytes


def planning_view(chain: Chain) -> Chain:
    """``chain`` as the planners see it: each adaptive block's forward priced at :data:`NEVER_RECOMPUTED_COST`."""
    stages = set(adaptive_stages(chain))
    if not stages:
        return chain
    return dataclasses.replace(chain, stages=tuple(
        dataclasses.replace(stage, fwd_cost=NEVER_RECOMPUTED_COST, nominal_fwd_cost=NEVER_RECOMPUTED_COST)
        if at in stages else stage for at, stage in enumerate(chain.stages)))


def plan_sharing_adaptive(chain: Chain, usable: int, plan: Callable[[Chain, int], Schedule]) -> Schedule:
    """Plan the network under its minimum plus the share of what that leaves which makes the step fastest (half
    on a nominal chain), so the adaptive blocks get the rest. ``plan`` gets :func:`planning_view` of the chain."""
    view = planning_view(chain)
    if not adaptive_stages(chain):
        return plan(chain, usable)
    try:
        plan(view, 0)
        minimum = 0
    except InfeasibleBudgetError as error:
        minimum = error.min_budget_bytes
    if usable < minimum:
        return plan(view, usable)  # raises, with the minimum
    if chain.cost_source != "measured" or not chain.adaptive_steps:
        return plan(view, minimum + (usable - minimum) // 2)
    found = []
    for quarters in SHARES:
        schedule = plan(view, minimum + (usable - minimum) * quarters // 4)
        simulation = simulate_plan(chain, schedule)
        checkpoints = adaptive_checkpoints(chain, simulation, usable)
        found.append((simulation.step_cost - adaptive_saving(chain, checkpoints), schedule))
    fastest = min(ms for ms, _ in found)
    return next(schedule for ms, schedule in found if ms <= fastest + abs(fastest) * tie_tolerance(chain))


@functools.lru_cache(maxsize=256)
def recomputed(steps: int, checkpoints: int) -> int:
    """The steps a solve of ``steps`` accepted steps re-runs untaped in backward, keeping ``checkpoints`` states."""
    slots = max(1, min(checkpoints, steps))
    if slots == 1:  # every step re-run from the start: (steps - 1) + (steps - 2) + ... + 0
        return steps * (steps - 1) // 2
    kept = OnlineCheckpointing(slots).plan(steps)
    return recomputed_steps(reverse_actions(kept, steps, slots))


def adaptive_saving(chain: Chain, checkpoints: tuple[tuple[str, int], ...]) -> float:
    """What the adaptive blocks' ``checkpoints`` save on their time at one checkpoint (which the chain prices), in
    the chain's cost unit: the re-run steps they spare, each at the block's measured forward time per step. At
    most the measured backward less one re-run of every step (which any number of checkpoints makes)."""
    found = dict(checkpoints)
    saving = 0.0
    for stage, steps in chain.adaptive_steps:
        count = found.get(chain.blocks[chain.stages[stage].block].name, 1)
        measured = chain.stages[stage]
        spared = (recomputed(steps, 1) - recomputed(steps, count)) * measured.fwd_cost / steps
        saving += min(spared, max(0.0, measured.bwd_cost - measured.fwd_cost))
    return saving


def adaptive_checkpoints(chain: Chain, simulation: Simulation, usable: int) -> tuple[tuple[str, int], ...]:
    """Per adaptive block (its qualified name), its checkpoints: one, plus an equal share of what the plan leaves."""
    stages = adaptive_stages(chain)
    if not stages:
        return ()
    share = max(0, usable - simulation.peak_bytes) // len(stages)
    return tuple((chain.blocks[chain.stages[i].block].name, 1 + share // _checkpoint_bytes(chain, i)) for i in stages)


def extra_checkpoint_bytes(chain: Chain, checkpoints: tuple[tuple[str, int], ...]) -> int:
    """What the adaptive blocks' checkpoints beyond the first can add to the simulated peak (an upper bound)."""
    sizes = {chain.blocks[chain.stages[i].block].name: _checkpoint_bytes(chain, i) for i in adaptive_stages(chain)}
    return sum((count - 1) * sizes[name] for name, count in checkpoints)
