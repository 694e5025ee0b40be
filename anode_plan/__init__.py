"""anode-plan: train ODE-block networks under a memory budget, with exact gradients.

    compiled = anode_plan.compile(model, memory_budget="4GB", example_inputs=(x,))
    loss_fn(compiled(x), y).backward()

The public names are re-exported here; everything else may change without notice.
"""

from anode_plan.adaptive import odeint
from anode_plan.batch import BatchPoint, BatchSearch, batch_curve, max_batch_size, search_batch_size
from anode_plan.budget import budget_for_peak, parse_memory_budget
from anode_plan.compiler import ApproximatedLayer, CompiledModel, Plan, compile, load_plan, plan_for_budget
from anode_plan.costmodel import lower_to_chain
from anode_plan.errors import (AnodePlanError, BudgetFormatError, ExampleInputsError, InfeasibleBudgetError,
                               InputMismatchError, ODEBlockConfigError, ODEFunctionError, PlanInvariantError,
                               UntraceableModelError)
from anode_plan.errors import PlanFileError, PlanMismatchError, PlanOverBudgetError, PlotUnavailableError
from anode_plan.errors import ApproximationSpecError, BackendSpecError, CompileFallbackWarning, CompiledModuleError, SolverConfigError, InPlaceModificationError, NonFiniteStateError, PlannerSpecError
from anode_plan.memory import AllocatorMeter, LiveStorageTracker, MemoryMeasurement, measure_peak_memory
from anode_plan.ode import ODEBlock
from anode_plan.planfile import dump_plan, save_plan
from anode_plan.plot import plot_batch_curve, plot_timeline, plot_tradeoff
from anode_plan.sketch import XConv, XConv2d
from anode_plan.report import (BlockSummary, BudgetLandmarks, TradeoffPoint, default_budgets, find_landmarks,
                               format_landmarks, format_report, format_tradeoff, summarize_blocks, tradeoff_curve)
from anode_plan.trace import trace_model

__all__ = [
    "AnodePlanError", "BudgetFormatError", "CompiledModel", "ExampleInputsError", "InfeasibleBudgetError",
    "InputMismatchError", "LiveStorageTracker", "MemoryMeasurement", "ODEBlock", "ODEBlockConfigError",
    "ODEFunctionError", "Plan", "PlanInvariantError", "UntraceableModelError", "compile", "lower_to_chain",
    "measure_peak_memory", "parse_memory_budget", "plan_for_budget", "trace_model",
    "BlockSummary", "BudgetLandmarks", "find_landmarks", "format_report", "summarize_blocks",
    "PlanFileError", "PlanMismatchError", "PlanOverBudgetError", "PlotUnavailableError", "dump_plan", "load_plan",
    "save_plan", "plot_timeline", "plot_tradeoff", "TradeoffPoint", "default_budgets", "format_landmarks",
    "format_tradeoff", "tradeoff_curve",
    "InPlaceModificationError", "PlannerSpecError", "NonFiniteStateError", "CompiledModuleError",
    "AllocatorMeter", "budget_for_peak", "BatchPoint", "BatchSearch", "max_batch_size", "search_batch_size",
    "batch_curve", "plot_batch_curve", "XConv2d", "XConv", "ApproximatedLayer", "ApproximationSpecError",
    "odeint", "SolverConfigError", "BackendSpecError", "CompileFallbackWarning",
]
