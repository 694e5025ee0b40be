"""The compiled mode's choice between one graph of the whole model and stages compiled one by one.

``compile(..., backend="inductor")`` (with the default planner) offers the planner a
compiled unit of the whole model (:mod:`anode_plan.stages.unit`) at each partitioner budget
of :data:`~anode_plan.stages.unit.FRACTIONS`, most kept first. A unit's peak and time are
known only once it is compiled and run, and compiling the whole model costs what
``torch.compile`` of it costs (``benchmarks/unit_parity.py``: 48 and 53 s against the peer's 58
and 51 s), so units are tried in order of speed and only where an estimate says they may fit:

1. the estimate of a unit at fraction ``f`` is the eager cost model's store-all peak less
   ``1 - f`` of the activations live at it (the states and tapes: what the save-everything
   partition keeps), times the largest ratio of measured to estimated peak of the units
   measured so far (the partitioner keeps about ``f`` of the activations; Inductor's
   buffers are its own);
2. the first fraction whose estimate fits the usable budget is compiled and measured
   (:mod:`anode_plan.measure.unit_step`); if its measured peak fits, it is the plan, else
   the estimate is corrected and the next fraction tried, at most :data:`MAX_NEW_UNITS`
   compiles per plan;
3. when the per-stage compiled chain of these inputs is measured already (an earlier plan of
   the model compiled its stages), its plan at this budget is made too and the faster of the
   two, in measured milliseconds, is taken.

Measured units are kept with the model's compiled stages, per fraction and input key, so
another budget reuses them. Budgets no unit fits run the per-stage schedule, whose nested
recompute one graph cannot express (``docs/algorithms.md`` §11).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Sequence

import torch
from torch import nn

import planners
from anode_plan.measure.lower import lower_to_chain
from anode_plan.measure.unit_step import UnitStep, measure_unit_step, run_step
from anode_plan.model_state import state_restored
from anode_plan.plans.plan import CompiledUnit, Plan, plan_for_budget
from anode_plan.stages.inductor import CompiledStages, input_key
from anode_plan.stages.unit import FRACTIONS, UnitCompileError, unit_for
from anode_plan.tracing.trace import TracedModel
from planners import Chain, simulate_plan

MAX_NEW_UNITS = 2
"""Units compiled for one plan at most (each costs a compile of the whole model)."""

AUTO_PLANNERS = (None, "auto")
"""Planners under which units are offered: a named planner (``"revolve"``, ``"store-all"`` ...) plans the stages."""


def offers_units(planner: Any, compiled: CompiledStages) -> bool:
    """Whether ``compile`` offers whole-model units: the default planner, and every stage compilable (no
    adaptive solve, whose step count depends on values)."""
    return any(planner is auto for auto in AUTO_PLANNERS) and not compiled.eager


def _estimator(chain: Chain) -> Callable[[float], int]:
    """The unit at a fraction's peak, estimated: store-all's, less the share of its activations (the states and
    tapes live at its peak, what the save-everything partition keeps) the partitioner does not keep."""
    simulation = simulate_plan(chain, planners.StoreAll().plan(chain, budget_bytes=2**62))
    live = simulation.breakdown()
    activations = live.get("states", 0) + live.get("tapes", 0)
    return lambda fraction: int(simulation.peak_bytes - (1.0 - fraction) * activations)


def _measured(model: nn.Module, inputs: Sequence[torch.Tensor], compiled: CompiledStages,
              fraction: float, key: Any, head_bytes: int) -> UnitStep | str:
    """The unit at ``fraction``'s measured step for ``key`` (compiling it first), or why it cannot compile."""
    unit = unit_for(compiled, fraction)
    found = unit.steps.get(key)
    if found is not None:
        return found

    before = unit.compile_seconds
    try:
        with state_restored(model, inputs[0].device):
            unit.warm(lambda fn: run_step(fn, model, inputs))
    except UnitCompileError as error:
        unit.steps[key] = f"{error}"
        return unit.steps[key]
    compiled.compile_seconds += unit.compile_seconds - before
    unit.steps[key] = measure_unit_step(unit.function(), model, inputs, head_bytes=head_bytes)
    return unit.steps[key]


def unit_plan(model: nn.Module, traced: TracedModel, inputs: Sequence[torch.Tensor], budget_bytes: int,
              compiled: CompiledStages, staged: Callable[[], Plan] | None = None, *,
              fractions: Sequence[float] = FRACTIONS, estimated: bool = True) -> Plan | None:
    """The plan running a whole-model unit at ``budget_bytes`` (the module docstring says which), or ``None``
    when none fits within :data:`MAX_NEW_UNITS` new compiles. ``staged``: the per-stage plan, asked for
    only when the per-stage chain of these inputs is measured already. ``fractions``: those offered;
    ``estimated=False`` measures them without estimating first (a saved plan's unit)."""
    chain = lower_to_chain(model, traced, inputs, calibrate=False)
    usable = budget_bytes  # a unit's peak is measured on the step itself (anode_plan.measure.unit_step)
    key = input_key(model, inputs)
    estimate = _estimator(chain)
    ratio, tried, new = 1.0, [], 0
    chosen: tuple[float, UnitStep] | None = None
    for fraction in fractions:
        unit = unit_for(compiled, fraction)
        known = unit.steps.get(key)
        if known is None and (new >= MAX_NEW_UNITS or (estimated and estimate(fraction) * ratio > usable)):
            continue
        new += known is None
        step = _measured(model, inputs, compiled, fraction, key, chain.head_bytes)
        if isinstance(step, str):  # cannot be compiled as one graph: no unit at any fraction
            return None
        tried.append((fraction, step.peak_bytes))
        if step.peak_bytes <= usable:
            chosen = (fraction, step)
            break
        ratio = max(ratio, step.peak_bytes / max(1, estimate(fraction)))
    if chosen is None:
        return None
    fraction, step = chosen
    staged_ms = 0.0
    if staged is not None and compiled.chain_for(key) is not None:
        try:
            other = staged()
        except planners.AnodePlanError:
            other = None
        if other is not None:
            staged_ms = other.predicted_step_seconds * 1e3
            if staged_ms < step.step_ms:
                return other
    base = plan_for_budget(chain, traced, inputs, 2**62, planners.StoreAll())
    schedule = replace(base.schedule, planner="unit", description=(
        f"one compiled unit over {len(chain.stages)} stages at activation_memory_budget={fraction:g}, "
        f"measured peak {planners.format_bytes(step.peak_bytes)}"
        + "".join(f"; {f:g} measured {planners.format_bytes(b)}, over the budget" for f, b in tried[:-1])))
    return replace(base, schedule=schedule, budget_bytes=budget_bytes, backend="inductor",
                   unit=CompiledUnit(fraction=fraction, peak_bytes=step.peak_bytes, step_ms=step.step_ms,
                                     staged_step_ms=staged_ms, tried=tuple(tried)))


def unit_peak(compiled: CompiledStages, model: nn.Module, inputs: Sequence[torch.Tensor], unit: CompiledUnit) -> str:
    """The measured peak of ``unit``'s fraction for these inputs, as text (for an error), or why there is none."""
    step = unit_for(compiled, unit.fraction).steps.get(input_key(model, inputs))
    return str(step.peak_bytes) if isinstance(step, UnitStep) else f"nothing ({step})"
