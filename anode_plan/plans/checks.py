"""Whether a saved plan fits: its schedule simulated under a budget, its model's structure and inputs compared.

Nothing in a plan file is trusted: :func:`check_plan_fits` validates the schedule and
simulates it on a chain (:class:`~anode_plan.PlanInvariantError`,
:class:`~anode_plan.PlanOverBudgetError`), :func:`check_plan_matches` compares the traced
model and the inputs with what the plan was made for (:class:`~anode_plan.PlanMismatchError`).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from anode_plan.budget import budget_for_peak, usable_bytes
from anode_plan.errors import PlanInvariantError, PlanMismatchError, PlanOverBudgetError
from anode_plan.plans.serialise import structure_digest
from anode_plan.tracing.segments import coarsen
from anode_plan.tracing.trace import TracedModel
from planners import (
    Chain,
    Schedule,
    Simulation,
    format_bytes,
    simulate_plan,
)
from planners.feasibility import peak_workspace

REPLAN_ADVICE = ("plan again with anode_plan.compile(model, memory_budget=..., example_inputs=...) and save the new "
           "plan")


# ---------------------------------------------------------------------------------------- checking


def check_plan_fits(schedule: Schedule, chain: Chain, budget_bytes: int, source: str,
                    workspace_margin: float = 0.0, measured_peak: int | None = None) -> Simulation:
    """Validate ``schedule`` on ``chain`` and simulate it; its peak (``measured_peak`` instead, for a
    compiled unit's plan, whose peak is measured) must be within the part of ``budget_bytes`` a plan
    may use (:func:`anode_plan.budget.usable_bytes`).

    Returns the simulation (with its timeline). Raises :class:`PlanInvariantError` when the
    schedule would not compute the gradients (a stage skipped, repeated or out of order)
    and :class:`PlanOverBudgetError` when it needs more than the budget.
    """
    try:
        simulation = simulate_plan(chain, schedule, timeline=True)
    except PlanInvariantError as error:
        raise PlanInvariantError(f"{source}: the schedule does not compute the gradients of {chain.name} "
                                 f"({len(chain.stages)} stages): {error}. The plan was edited or corrupted; "
                                 f"{REPLAN_ADVICE}.") from None
    except (IndexError, KeyError) as error:  # a schedule over stages the chain lacks, caught by the validator first
        raise PlanInvariantError(f"{source}: the schedule does not fit {chain.name}: {error!r}; {REPLAN_ADVICE}.") from None
    usable = usable_bytes(budget_bytes, workspace_margin)
    peak = simulation.peak_bytes if measured_peak is None else measured_peak
    if peak > usable:
        kept = f" (a plan may use {usable} bytes of it; the rest is kept free)"
        raise PlanOverBudgetError(
            f"{source}: the schedule ({schedule.planner}: {schedule.description}) needs "
            f"{format_bytes(peak)} ({peak} bytes) on {chain.name}"
            f"{peak_workspace(chain, simulation)}, above the budget {format_bytes(budget_bytes)} ({budget_bytes} "
            f"bytes){kept}. The plan was edited, or the model's memory has changed since it was planned (plans made before "
            "anode-plan measured kernel workspaces did not count them); give memory_budget="
            f"{budget_for_peak(peak, workspace_margin)} or more, or {REPLAN_ADVICE}.",
            peak_bytes=peak, budget_bytes=budget_bytes)
    return simulation


def input_differences(plan: Any, example_inputs: Sequence[torch.Tensor]) -> list[str]:
    """How ``example_inputs`` differ from the inputs ``plan`` was made for (empty if they do not)."""
    if len(example_inputs) != len(plan.input_shapes):
        return [f"the plan takes {len(plan.input_shapes)} inputs, example_inputs has {len(example_inputs)}"]
    found = []
    for position, (value, shape, dtype) in enumerate(zip(example_inputs, plan.input_shapes, plan.input_dtypes)):
        if not isinstance(value, torch.Tensor):
            found.append(f"input {position} is a {type(value).__name__}, not a tensor")
            continue
        if tuple(value.shape) != shape:
            found.append(f"input {position} has shape {tuple(value.shape)}, the plan {shape}")
        if str(value.dtype) != dtype:
            found.append(f"input {position} has dtype {value.dtype}, the plan {dtype}")
    return found


def structure_differences(plan: Any, traced: TracedModel) -> list[str]:
    """How ``traced`` differs from the model ``plan`` was made for (empty if the digests agree)."""
    digest = structure_digest(traced)
    if digest == plan.fingerprint:
        return []
    chain = plan.chain
    found = []
    segments = getattr(plan, "segments", ())
    if segments:  # the plan's chain is over compiled units: compare the model cut the same way
        try:
            traced = coarsen(traced, segments)
        except ValueError as error:
            found.append(f"the plan's compiled units do not fit the model: {error}")
    theirs = [(b.name, b.nt, b.method) for b in chain.blocks]
    ours = [(b.target, b.nt, b.method) for b in traced.blocks]
    if len(theirs) != len(ours):
        found.append(f"the plan has {len(theirs)} ODE blocks, the model {len(ours)}")
    for (name, nt, method), (our_name, our_nt, our_method) in zip(theirs, ours):
        if (name, nt, method) != (our_name, our_nt, our_method):
            found.append(f"ODE block {name} (nt={nt}, {method}) in the plan is {our_name} (nt={our_nt}, "
                         f"{our_method}) in the model")
    if len(chain.stages) != len(traced.stages):
        found.append(f"the plan has {len(chain.stages)} stages, the model {len(traced.stages)}")
    if not found:
        for index, (stage, spec) in enumerate(zip(chain.stages, traced.stages)):
            if stage.name != spec.name:
                found.append(f"stage {index} is {stage.name!r} in the plan, {spec.name!r} in the model")
                break
    if not found:
        found.append("the layers of the traced graph differ (same stages and ODE blocks, other operations)")
    found.append(f"structure digest {plan.fingerprint} in the plan, {digest} for the model")
    return found


def check_plan_matches(plan: Any, traced: TracedModel, example_inputs: Sequence[torch.Tensor], source: str) -> None:
    """Raise :class:`PlanMismatchError` listing every way ``traced``/``example_inputs`` differ from ``plan``'s."""
    found = input_differences(plan, example_inputs) + structure_differences(plan, traced)
    if found:
        raise PlanMismatchError(f"{source} was made for {plan.chain.name} and does not fit this model or input: "
                                + "; ".join(found) + f". Pass the model and input shapes it was made for, or "
                                f"{REPLAN_ADVICE}.", differences=tuple(found))


def example_inputs_for(plan: Any, model: torch.nn.Module) -> tuple[torch.Tensor, ...]:
    """Inputs shaped like the ones ``plan`` was made for, on ``model``'s device (values are irrelevant)."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    inputs = []
    for shape, dtype in zip(plan.input_shapes, plan.input_dtypes):
        dtype = getattr(torch, dtype.removeprefix("torch."))
        value = torch.zeros(shape, dtype=dtype, device=device)
        inputs.append(value.requires_grad_(plan.chain.input_grad and value.is_floating_point()))
    return tuple(inputs)
