"""Pure checkpoint-scheduling algorithms over plain data; no torch import.

A planner is a small frozen dataclass with one method,
``plan(chain, *, budget_bytes) -> Schedule``. It is deterministic, and raises
:class:`InfeasibleBudgetError` (carrying the minimum feasible budget) when nothing
fits. :func:`simulate_plan` is the memory model all of them are judged by.
"""

from planners.auto import Auto
from planners.chain import Block, Chain, Reconstruction, Stage, carries_values
from planners.cpsat import CPSat, PlanningTimeoutError
from planners.errors import (AnodePlanError, InfeasibleBudgetError, NothingToReconstructError, PlanInvariantError,
                             format_bytes)
from planners.landmarks import Anode, Landmarks, StoreAll
from planners.nested import Nested
from planners.reconstruct import Reconstructed
from planners.revolve import (Revolve, binomial_beta, optimal_advances, optimal_split, repetition_number,
                              revolve_ops)
from planners.rotor import ChainDP
from planners.schedule import Op, Reconstruct, Region, Run, Schedule, count_regions, nesting_depth, validate_schedule
from planners.simulate import Simulation, TimelineEvent, simulate_plan

__all__ = [
    "AnodePlanError", "Anode", "Block", "Chain", "InfeasibleBudgetError", "Landmarks", "Op",
    "PlanInvariantError", "Region", "Revolve", "Run", "Schedule", "Simulation", "Stage", "StoreAll",
    "TimelineEvent", "binomial_beta", "count_regions", "format_bytes", "nesting_depth",
    "optimal_advances", "optimal_split", "repetition_number", "revolve_ops", "simulate_plan",
    "validate_schedule",
    "Auto", "CPSat", "ChainDP", "PlanningTimeoutError", "carries_values", "Nested", "Reconstruct", "Reconstruction",
    "Reconstructed", "NothingToReconstructError",
]
