"""anode-plan: train ODE-block networks under a memory budget with exact gradients."""

from anode_plan.errors import (AnodePlanError, BudgetFormatError, ExampleInputsError, InfeasibleBudgetError,
                               InputMismatchError, ODEBlockConfigError, ODEFunctionError, PlanInvariantError,
                               UntraceableModelError)
from anode_plan.ode import ODEBlock
