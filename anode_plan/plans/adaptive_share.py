"""The checkpoints a plan leaves the adaptive ODE blocks, and how the budget is shared with them.

How the budget is shared (:func:`plan_sharing_adaptive`, :func:`adaptive_checkpoints`): the
rest of the network is planned under its minimum plus half of what the minimum leaves of
the budget, and the adaptive blocks share what that plan leaves, equally, as checkpoints
of ``(y, f)`` beyond the first. Each block then checkpoints online inside its share
(:mod:`planners.online`), so the step's peak stays within the budget whatever number of
steps the solves take; when even the minimum does not fit, the plan fails with
:class:`~anode_plan.InfeasibleBudgetError` as for any stage. The block as a stage:
:mod:`anode_plan.measure.adaptive_profile`.
"""

from __future__ import annotations

from typing import Callable

from anode_plan.ode.block import ADAPTIVE
from planners import Chain, Schedule, Simulation
from planners.errors import InfeasibleBudgetError


def adaptive_stages(chain: Chain) -> tuple[int, ...]:
    """The stages of the chain that are adaptive blocks (each such block is one stage)."""
    return tuple(block.start for block in chain.blocks if block.method in ADAPTIVE)


def _checkpoint_bytes(chain: Chain, stage: int) -> int:
    """One checkpoint of the adaptive block at ``stage``: its state and the state's derivative."""
    return 2 * chain.stages[stage].input_bytes


def plan_sharing_adaptive(chain: Chain, usable: int, plan: Callable[[Chain, int], Schedule]) -> Schedule:
    """Plan the network under its minimum plus half of what that leaves, so the adaptive blocks get the rest."""
    if not adaptive_stages(chain):
        return plan(chain, usable)
    try:
        plan(chain, 0)
        minimum = 0
    except InfeasibleBudgetError as error:
        minimum = error.min_budget_bytes
    if usable < minimum:
        return plan(chain, usable)  # raises, with the minimum
    return plan(chain, minimum + (usable - minimum) // 2)


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
