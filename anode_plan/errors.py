"""The exception classes of anode-plan, all under :class:`AnodePlanError`.

The planners' errors (:class:`InfeasibleBudgetError`, :class:`PlanInvariantError`)
live in :mod:`planners.errors` because ``planners`` imports no torch; they are
re-exported here so users need only this module.
"""

from __future__ import annotations

from typing import Any

from planners.errors import AnodePlanError, InfeasibleBudgetError, PlanInvariantError


class BudgetFormatError(AnodePlanError, ValueError):
    """``memory_budget`` is not a positive byte count such as ``"4GB"``, ``"512MiB"`` or ``2**30``."""


class ODEBlockConfigError(AnodePlanError, ValueError):
    """An ``ODEBlock`` was built with a bad ``nt``, ``method``, ``func`` or ``t_span``."""


class ODEFunctionError(AnodePlanError, RuntimeError):
    """An ODE function returned the wrong shape, or the state is not a floating tensor."""


class PlannerSpecError(AnodePlanError, ValueError):
    """``planner=`` is neither a known planner name nor an object with ``plan(chain, *, budget_bytes)``."""


class UntraceableModelError(AnodePlanError, RuntimeError):
    """torch.fx could not trace the model, or the traced graph cannot be planned."""


class CompiledModuleError(AnodePlanError, TypeError):
    """The model, or a module inside it, is already compiled with ``torch.compile``: its memory cannot be planned."""


class ExampleInputsError(AnodePlanError, TypeError):
    """``example_inputs`` is missing or does not match the model's forward signature."""


class InputMismatchError(AnodePlanError, ValueError):
    """A compiled model was called with inputs that do not fit its plan (for example a larger batch)."""


class InPlaceModificationError(AnodePlanError, RuntimeError):
    """A value a checkpoint region recomputes from was overwritten in place after the region first ran.

    The region keeps a reference to its input and recomputes from it in backward, so an
    in-place write (``z.relu_()``, ``ReLU(inplace=True)``, ``z.add_(1)`` on an ODE block's
    input after the block, or inside the ODE function on ``z``) would silently change the
    gradients. Use the out-of-place form (``z = z.relu()``).
    """


class NonFiniteStateError(AnodePlanError, FloatingPointError):
    """An ODE block built with ``check_finite=True`` produced a NaN or infinite state."""


class PlanFileError(AnodePlanError, ValueError):
    """A plan file cannot be read: not YAML, not a plan, another format version, or a field of the wrong type."""


class PlanMismatchError(AnodePlanError, ValueError):
    """A saved plan was given to a model or input shape other than the one it was made for.

    ``differences`` lists what differs, one sentence each.
    """

    def __init__(self, message: str, *, differences: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.differences = tuple(differences)


class PlanOverBudgetError(AnodePlanError, ValueError):
    """A saved plan's schedule, simulated on the model as measured now, needs more than its budget.

    ``peak_bytes`` is what it needs, ``budget_bytes`` the budget it was checked against.
    """

    def __init__(self, message: str, *, peak_bytes: int, budget_bytes: int) -> None:
        super().__init__(message)
        self.peak_bytes = peak_bytes
        self.budget_bytes = budget_bytes


class PlotUnavailableError(AnodePlanError, ImportError):
    """Drawing a plan needs matplotlib, the optional ``[plot]`` extra, and it is not installed."""


class SolverConfigError(AnodePlanError, ValueError):
    """``anode_plan.odeint`` got an unknown method or option, bad times, or could not finish the solve."""


class BackendSpecError(AnodePlanError, ValueError):
    """``compile(..., backend=...)`` got a backend other than ``"eager"`` or ``"inductor"``, or options it cannot run with."""


class CompileFallbackWarning(UserWarning):
    """A stage could not be compiled with ``backend="inductor"`` and runs eager (measured all the same)."""


class TorchCompileWrapWarning(UserWarning):
    """``torch.compile`` was applied to a compiled model: its schedule runs outside TorchDynamo, as planned.

    Said once per compiled model. The budget holds; for Inductor kernels under the budget,
    compile with ``anode_plan.compile(..., backend="inductor")``.
    """


class ApproximationSpecError(AnodePlanError, ValueError):
    """``compile(..., approximate=...)`` got something other than an approximation it knows (``anode_plan.XConv``)."""


class MachineMemoryError(AnodePlanError, MemoryError):
    """:func:`max_batch_size` stopped at the machine's memory before it reached the budget.

    ``batch`` is the largest batch confirmed to fit the budget; ``stop`` (an
    :class:`anode_plan.analysis.machine_memory.MachineMemoryStop`) says which batch would
    not fit the device, with the numbers.
    """

    def __init__(self, message: str, batch: int, stop: Any) -> None:
        super().__init__(message)
        self.batch = batch
        self.stop = stop


__all__ = ["AnodePlanError", "ApproximationSpecError", "BackendSpecError", "CompileFallbackWarning", "SolverConfigError", "BudgetFormatError", "ExampleInputsError", "InfeasibleBudgetError",
           "InputMismatchError", "ODEBlockConfigError", "ODEFunctionError", "PlanFileError", "PlanInvariantError", "PlannerSpecError",
           "PlanMismatchError", "PlanOverBudgetError", "PlotUnavailableError", "UntraceableModelError",
           "InPlaceModificationError", "NonFiniteStateError", "MachineMemoryError"]
