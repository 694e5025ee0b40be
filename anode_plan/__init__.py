"""anode-plan: train ODE-block networks under a memory budget, with exact gradients.

    compiled = anode_plan.compile(model, memory_budget="4GB", example_inputs=(x,))
    loss_fn(compiled(x), y).backward()

The public names are re-exported here; everything else may change without notice. The
package runs one way, capture → measure → plan → run (``docs/architecture.md``).
"""

from anode_plan.analysis.batch import BatchPoint, BatchSearch, batch_curve, max_batch_size, search_batch_size
from anode_plan.analysis.machine_memory import available_memory
from anode_plan.analysis.plot import plot_batch_curve, plot_timeline, plot_tradeoff
from anode_plan.analysis.report import (BlockSummary, BudgetLandmarks, TradeoffPoint, default_budgets, find_landmarks,
                                        format_landmarks, format_report, format_tradeoff, summarize_blocks,
                                        tradeoff_curve)
from anode_plan.budget import budget_for_peak, parse_memory_budget
from anode_plan.compiler.model import CompiledModel
from anode_plan.compiler.pipeline import compile
from anode_plan.errors import (AnodePlanError, ApproximationSpecError, BackendSpecError, BudgetFormatError,
                               CompiledModuleError, CompileFallbackWarning, ExampleInputsError, InfeasibleBudgetError,
                               InPlaceModificationError, InputMismatchError, MachineMemoryError, NonFiniteStateError,
                               ODEBlockConfigError, ODEFunctionError, PlanFileError, PlanInvariantError,
                               PlanMismatchError, PlannerSpecError, PlanOverBudgetError, PlotUnavailableError,
                               SolverConfigError, TorchCompileWrapWarning, UntraceableModelError)
from anode_plan.measure.lower import lower_to_chain
from anode_plan.memory import AllocatorMeter, LiveStorageTracker, MemoryMeasurement, measure_peak_memory
from anode_plan.ode.block import ODEBlock
from anode_plan.ode.interface import odeint_adjoint, odeint_event
from anode_plan.ode.solve import odeint
from anode_plan.plans.files import load_plan, save_plan
from anode_plan.plans.plan import PLANNER_NAMES, ApproximatedLayer, Plan, plan_for_budget
from anode_plan.plans.serialise import dump_plan
from anode_plan.stages.sketch import XConv, XConv2d
from anode_plan.tracing.trace import trace_model

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
    "odeint", "odeint_adjoint", "odeint_event", "SolverConfigError", "BackendSpecError", "CompileFallbackWarning",
    "MachineMemoryError", "available_memory", "PLANNER_NAMES", "TorchCompileWrapWarning",
]
