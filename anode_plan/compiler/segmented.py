"""The compiled mode below a whole-model unit: stages compiled one by one, or units of several stages.

Where no compiled unit of the whole model fits the budget (:mod:`anode_plan.compiler.units`),
``compile(..., backend="inductor")`` plans the per-stage compiled chain, whose nested
recompute reaches the lowest budgets, with every time step a compiled call of its own. This
module offers the planner coarser *cuts* of the same model (:func:`candidate_cuts`): each ODE
block's steps as one compiled graph, or its steps two at a time, with each run of layer
groups between blocks as another (:func:`~anode_plan.tracing.segments.block_segments`), at
partitioner budget 1 or 0.5 (:data:`FRACTIONS`). Inside a unit Inductor fuses across steps;
across units the schedule stays the planner's, eager, so a unit is either kept (taped, what
its compiled graph saves) or recomputed whole from its kept input, and recompute still nests
across units (revolve over blocks). That is the route the measurements in
``docs/algorithms.md`` §11 leave open: one graph holds single-level keep-or-recompute, nested
recompute stays eager across compiled leaves.

How a plan is chosen (:func:`with_block_units`):

1. the per-stage plan is made first (its chain measured on the device, as before);
2. a screen per cut: its lowest peak is about that of keeping each unit's input and re-running
   the units one at a time, simulated on the per-stage chain (tapes scaled by the fraction);
   above :data:`SCREEN_SLACK` times the budget the cut is not compiled, and at most
   :data:`MAX_NEW_CUTS` cuts are compiled for one plan;
3. every unit of a cut that passes is compiled and measured on the device like a stage (its
   allocator peaks in the phases of a step, its times, then whole steps:
   :func:`~anode_plan.compiler.chains.measured_chain`), the coarse chain is planned at the
   budget (:func:`cut_plan`), and the plan predicted fastest, in measured milliseconds, of the
   per-stage plan and every measured cut's is taken. A unit that cannot be compiled as one graph
   drops its cut.

Measured cuts are kept with the model's compiled stages per input key, so later budgets plan
on them without compiling.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Sequence

import torch
from torch import nn

from anode_plan.budget import usable_bytes
from anode_plan.compiler.chains import measured_chain, with_backend
from anode_plan.errors import InfeasibleBudgetError
from anode_plan.plans.plan import Plan, plan_for_budget
from anode_plan.stages.inductor import CompiledStages, input_key
from anode_plan.tracing.segments import Segments, block_segments
from anode_plan.tracing.trace import TracedModel
from planners import Chain, Region, Run, simulate_plan

SCREEN_SLACK = 1.25
"""Units are compiled only when the screen's peak is at most this times the budget: a compiled unit can need
less than its stages (fused pointwise values are recomputed) or more (a shared weight's gradient partials: on
the benchmark model, the first block as one unit at fraction 0.5 measured a 24.01 MiB backward peak, 2.03 MiB
at fraction 1)."""

FRACTIONS = (1.0, 0.5)
"""The partitioner budgets units are offered at: 1 saves what backward reads; 0.5 keeps half of it and
recomputes the cheapest rest (normalisations, pointwise ops) inside the unit's backward graph."""

STEPS = (None, 2)
"""The cuts offered, coarsest first: each ODE block whole (``None``), then runs of two time steps."""

MAX_NEW_CUTS = 2
"""Cuts (a segmentation at a fraction) compiled and measured for one plan at most: each compiles every unit."""


def candidate_cuts(traced: TracedModel) -> list[tuple[Segments, float]]:
    """The (segmentation, fraction) pairs offered, coarsest and most kept first; a cut with no run of two
    stages or more fuses nothing and is left out."""
    cuts = []
    for steps in STEPS:
        segments = block_segments(traced, steps)
        if any(stop - start > 1 for start, stop in segments) and segments not in (s for s, _ in cuts):
            cuts.extend((segments, fraction) for fraction in FRACTIONS)
    return cuts


def screen_peak(chain: Chain, segments: Segments) -> Callable[[float], int]:
    """About the lowest peak a plan over units of ``segments`` at a partitioner fraction reaches: keeping every
    run's input and re-running the runs one at a time, simulated on the per-stage ``chain``, less the share of
    the tapes live at its peak a unit at that fraction would not keep."""
    ops = tuple(Run(start) if stop - start == 1 else Region(start, stop, tuple(Run(i) for i in range(start, stop)))
                for start, stop in segments)
    simulation = simulate_plan(chain, ops)
    tapes = simulation.breakdown().get("tapes", 0)
    return lambda fraction: int(simulation.peak_bytes - (1.0 - fraction) * tapes)


def cut_plan(staged: Plan, model: nn.Module, traced: TracedModel, inputs: Sequence[torch.Tensor],
             compiled: CompiledStages, planner: Any, segments: Segments, fraction: float) -> Plan | None:
    """The plan over the units of ``segments`` at partitioner ``fraction`` for ``staged``'s budget, every unit
    compiled and measured on the device first; ``None`` when a unit cannot be compiled as one graph or no
    schedule over the units fits."""
    units = compiled.segmented_stages(segments, fraction)
    chain = measured_chain(model, units.traced, inputs, calibrate=True, approximate=None, compiled=units)
    if units.eager:  # a unit that cannot be one graph: the cut is only a candidate, and is dropped
        return None
    try:
        plan = plan_for_budget(chain, traced, inputs, staged.budget_bytes, planner,
                               workspace_margin=staged.workspace_margin)
    except InfeasibleBudgetError:
        return None
    schedule = replace(plan.schedule, description=(
        f"{len(segments)} compiled units of up to {max(stop - start for start, stop in segments)} stages at "
        f"activation_memory_budget={fraction:g}; {plan.schedule.description}"))
    return replace(with_backend(plan, compiled), schedule=schedule, segments=segments, segment_fraction=fraction)


def with_block_units(staged: Plan, model: nn.Module, traced: TracedModel, inputs: Sequence[torch.Tensor],
                     compiled: CompiledStages, planner: Any) -> Plan:
    """``staged`` (the per-stage compiled plan) or the plan over units at its budget that is predicted faster
    (the module docstring says how they are chosen)."""
    usable = usable_bytes(staged.budget_bytes, staged.workspace_margin)
    key = input_key(model, inputs)
    best, new, screens = staged, 0, {}
    for segments, fraction in candidate_cuts(traced):
        if compiled.segmented_stages(segments, fraction).chain_for(key) is None:
            if segments not in screens:
                screens[segments] = screen_peak(staged.chain, segments)
            if new >= MAX_NEW_CUTS or screens[segments](fraction) > SCREEN_SLACK * usable:
                continue
            new += 1
        plan = cut_plan(staged, model, traced, inputs, compiled, planner, segments, fraction)
        if plan is not None and plan.predicted_step_seconds < best.predicted_step_seconds:
            best = plan
    return best
