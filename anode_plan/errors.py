"""The exception classes of anode-plan, all under :class:`AnodePlanError`.

The planners' errors (:class:`InfeasibleBudgetError`, :class:`PlanInvariantError`)
live in :mod:`planners.errors` because ``planners`` imports no torch; they are
re-exported here so users need only this module.
"""

from __future__ import annotations

from planners.errors import AnodePlanError, InfeasibleBudgetError, PlanInvariantError


class BudgetFormatError(AnodePlanError, ValueError):
    """``memory_budget`` is not a positive byte count such as ``"4GB"``, ``"512MiB"`` or ``2**30``."""


class ODEBlockConfigError(AnodePlanError, ValueError):
    """An ``ODEBlock`` was built with a bad ``nt``, ``method``, ``func`` or ``t_span``."""


class ODEFunctionError(AnodePlanError, RuntimeError):
    """An ODE function returned the wrong shape, or the state is not a floating tensor."""


class UntraceableModelError(AnodePlanError, RuntimeError):
    """torch.fx could not trace the model, or the traced graph cannot be planned."""


class ExampleInputsError(AnodePlanError, TypeError):
    """``example_inputs`` is missing or does not match the model's forward signature."""


class InputMismatchError(AnodePlanError, ValueError):
    """A compiled model was called with inputs that do not fit its plan (for example a larger batch)."""


__all__ = ["AnodePlanError", "BudgetFormatError", "ExampleInputsError", "InfeasibleBudgetError",
           "InputMismatchError", "ODEBlockConfigError", "ODEFunctionError", "PlanInvariantError",
           "UntraceableModelError"]
