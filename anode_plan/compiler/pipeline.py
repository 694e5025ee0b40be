"""``anode_plan.compile``: trace → measure → plan → check → rewrite.

The budget, ``memory_budget``, bounds the peak memory one training step (forward and
backward) allocates on top of what is already allocated when forward starts.
Parameters, optimizer state and the input batch do not count; activations, recompute
temporaries and parameter gradients do. On CUDA that is ``max_memory_allocated()``
minus ``memory_allocated()`` at forward start; on the CPU the same as the profiler's
allocation events count it. Memory kernels allocate inside themselves counts, which is
why each distinct stage is calibrated on the device (:mod:`anode_plan.measure.calibrate`).
:func:`anode_plan.measure_peak_memory` measures it on either device.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any, Sequence

import torch
from torch import nn

from anode_plan.budget import parse_memory_budget, usable_bytes
from anode_plan.compiler.chains import measured_chain, with_backend
from anode_plan.compiler.model import CompiledModel
from anode_plan.compiler.segmented import with_block_units
from anode_plan.compiler.units import offers_units, unit_peak, unit_plan
from anode_plan.errors import PlanMismatchError, PlanOverBudgetError
from anode_plan.measure.calibrate import UNCALIBRATED_MARGIN
from anode_plan.plans.adaptive_share import adaptive_checkpoints
from anode_plan.plans.checks import check_plan_fits, check_plan_matches, example_inputs_for
from anode_plan.plans.files import load_plan
from anode_plan.plans.plan import Plan, approximation_of, plan_for_budget
from anode_plan.plans.serialise import structure_digest
from anode_plan.stages.inductor import check_backend, compiled_stages_for
from anode_plan.stages.sketch import XConv, check_approximation
from anode_plan.tracing.trace import trace_model


def compile(model: nn.Module, memory_budget: int | float | str | None = None,
            example_inputs: Sequence[torch.Tensor] | None = None, *, planner: Any = None,
            leaf_modules: Sequence[type] = (), plan: "str | os.PathLike | Plan | None" = None,
            calibrate: bool = True, approximate: XConv | None = None, backend: str | None = None) -> CompiledModel:
    """Plan ``model``'s training step to fit ``memory_budget`` and return the compiled model.

    Args:
        model: an ``nn.Module`` with its ODE blocks built from :class:`anode_plan.ODEBlock`,
            as written: it is traced with torch.fx on fake tensors of the example's shapes,
            so Python that reads shapes traces (:mod:`anode_plan.tracing.capture`); only control
            flow on a tensor's value cannot. Put it in the mode (train/eval), dtype and
            device you will train in.
        memory_budget: ``"4GB"`` (SI), ``"512MiB"`` (IEC), or a number of bytes (an int, or a
            finite float rounded down, such as ``0.8 * total_memory``): the peak a
            training step may allocate on top of what is allocated when forward starts
            (parameters, optimizer state and the batch excluded; activations, recompute
            and parameter gradients included).
        example_inputs: a tuple of tensors shaped like a training batch; the plan holds
            for this batch size and smaller. A training call with a larger batch (or
            another shape, dtype or device) plans again under the same budget, or raises
            :class:`InfeasibleBudgetError` if nothing fits (see :class:`CompiledModel`).
        planner: ``"auto"`` (the default: :class:`planners.Auto`, the optimal chain DP for
            chains, CP-SAT and the landmark schedules for graphs with skip connections),
            another name from :data:`PLANNER_NAMES`, or a planner object with
            ``plan(chain, *, budget_bytes)``.
        leaf_modules: module classes fx should not trace into (each runs as one opaque
            layer, on fake tensors in the cost model).
        plan: a saved plan (a path written by :func:`anode_plan.save_plan`, or a
            :class:`Plan`) to reuse instead of planning. The model is traced and measured
            again; the plan must match its structure and ``example_inputs`` (by default
            inputs shaped like the plan's), and its schedule must fit ``memory_budget``
            (by default the plan's budget) on the fresh measurements.
        calibrate: run each distinct stage for real on the inputs' device to measure what
            its kernels allocate inside themselves (convolution and cuDNN workspaces), which
            count against the budget, and to time it, then time a few whole steps, so the
            plan is the fastest in measured milliseconds (``plan.predicted_step_seconds``;
            :mod:`anode_plan.measure.calibrate`, :mod:`anode_plan.compiler.step_fit`;
            ``benchmarks/RESULTS.md``, "Calibration cost", for what it costs). ``False``
            skips it, plans on FLOP counts (``plan.cost_source == "nominal"``) and under
            ``1 - UNCALIBRATED_MARGIN`` (75%) of the budget, which is no guarantee.
        approximate: ``None`` (the default: exact gradients, and nothing below runs), or
            ``anode_plan.XConv(probes=16)`` to let the planner keep random sketches of
            convolutions' inputs instead of the inputs (Siahkoohi et al., arXiv 2106.06998)
            where that lets the budget be met or saves recompute. Those layers' weight
            gradients become unbiased estimates (input and bias gradients stay exact);
            ``compiled.plan.approximated`` lists them with their measured relative error,
            and the report flags them.
        backend: ``"eager"`` (the default; with ``plan=``, the saved plan's backend) runs
            every stage with PyTorch's own kernels. ``"inductor"`` compiles each stage with
            ``torch.compile`` (the schedule's checkpoint regions stay as planned), measures
            each compiled stage's memory with the allocator and its time, and plans on
            those (:mod:`anode_plan.stages.inductor`). The first compile of a model pays for
            compiling its stages (``plan.compile_seconds``); compiling it again, for
            another budget, plans only. A stage that cannot be compiled runs eager, with a
            :class:`~anode_plan.errors.CompileFallbackWarning`.

    Raises:
        BudgetFormatError: the budget is not a positive size.
        InfeasibleBudgetError: nothing fits; the error carries the smallest budget.
        UntraceableModelError, ExampleInputsError: the model or inputs cannot be planned.
        PlanFileError, PlanMismatchError, PlanInvariantError, PlanOverBudgetError: ``plan``
            cannot be read, was made for another model or input, or is broken.
    """
    if plan is not None:
        return _reuse_plan(model, plan, memory_budget, example_inputs, planner, leaf_modules, calibrate, approximate,
                           backend)
    parse_memory_budget(memory_budget)  # reject a bad budget before tracing
    check_approximation(approximate)
    backend = check_backend("eager" if backend is None else backend, approximate=approximate, calibrate=calibrate)
    traced = trace_model(model, example_inputs, leaf_modules=leaf_modules)
    compiled = compiled_stages_for(model, traced, structure_digest(traced)) if backend == "inductor" else None
    before = compiled.compile_seconds if compiled is not None else 0.0

    def staged() -> Plan:
        chain = measured_chain(model, traced, example_inputs, calibrate=calibrate, approximate=approximate,
                               compiled=compiled)
        return plan_for_budget(chain, traced, example_inputs, memory_budget, planner,
                               workspace_margin=0.0 if calibrate else UNCALIBRATED_MARGIN)
    plan = None
    if compiled is not None and offers_units(planner, compiled):  # one graph of the whole model, where one fits
        plan = unit_plan(model, traced, example_inputs, parse_memory_budget(memory_budget), compiled, staged)
        if plan is None:  # else each ODE block as one graph, where that is faster than stage by stage
            plan = with_block_units(staged(), model, traced, example_inputs, compiled, planner)
    plan = with_backend(plan or staged(), compiled, compiled.compile_seconds - before if compiled is not None else 0.0)
    return CompiledModel(model, traced, plan, planner=planner, calibrate=calibrate, approximate=approximate,
                         compiled=compiled)


def _reuse_plan(model: nn.Module, plan: "str | os.PathLike | Plan", memory_budget: int | float | str | None,
                example_inputs: Sequence[torch.Tensor] | None, planner: Any,
                leaf_modules: Sequence[type], calibrate: bool, approximate: XConv | None,
                backend: str | None = None) -> CompiledModel:
    """``compile(model, plan=...)``: trace and measure again, check the saved schedule, run it."""
    if planner is not None:
        raise TypeError("compile(..., plan=..., planner=...): a saved plan is reused, not planned again, so "
                        "planner has no effect; pass plan= or planner=, not both")
    source = "the plan" if isinstance(plan, Plan) else os.fspath(plan)
    saved = plan if isinstance(plan, Plan) else load_plan(plan)
    budget_bytes = saved.budget_bytes if memory_budget is None else parse_memory_budget(memory_budget)
    inputs = tuple(example_inputs) if example_inputs is not None else example_inputs_for(saved, model)
    traced = trace_model(model, inputs, leaf_modules=leaf_modules)
    check_plan_matches(saved, traced, inputs, source)
    check_approximation(approximate)
    saved_approximation = approximation_of(saved)
    if approximate is not None and saved_approximation is not None and approximate != saved_approximation:
        raise PlanMismatchError(f"{source} was planned with approximate={saved_approximation!r}, and compile got "
                                f"approximate={approximate!r}; leave approximate unset to reuse the plan as saved",
                                differences=(f"approximate: {saved_approximation!r} saved, {approximate!r} given",))
    approximate = saved_approximation if approximate is None else approximate
    backend = check_backend(saved.backend if backend is None else backend, approximate=approximate,
                            calibrate=calibrate)
    compiled = compiled_stages_for(model, traced, structure_digest(traced)) if backend == "inductor" else None
    before = compiled.compile_seconds if compiled is not None else 0.0
    if saved.unit is not None and compiled is not None:  # the saved unit, compiled and measured again
        fresh = unit_plan(model, traced, inputs, budget_bytes, compiled, fractions=(saved.unit.fraction,),
                          estimated=False)
        if fresh is None:
            raise PlanOverBudgetError(
                f"{source}: its compiled unit (the whole model at activation_memory_budget={saved.unit.fraction:g}, "
                f"{saved.unit.peak_bytes} bytes when saved) now measures {unit_peak(compiled, model, inputs, saved.unit)} "
                f"bytes, above the budget of {budget_bytes} bytes (or "
                "no longer compiles as one graph); plan again with anode_plan.compile(model, budget, (x,), "
                "backend='inductor') and save that plan")
        fresh = replace(fresh, fingerprint=saved.fingerprint)
        return CompiledModel(model, traced, with_backend(fresh, compiled, compiled.compile_seconds - before),
                             calibrate=calibrate, compiled=compiled)
    runs, measuring = traced, compiled
    if saved.segments:  # the schedule is over compiled units: measure those again
        if compiled is None:
            raise PlanMismatchError(f"{source} runs its schedule over compiled units (runs of stages {list(saved.segments)}), "
                                    "which only backend='inductor' runs; leave backend unset to reuse it as saved",
                                    differences=("backend: 'inductor' saved with units, 'eager' given",))
        try:
            measuring = compiled.segmented_stages(saved.segments, saved.segment_fraction)
        except ValueError as error:
            raise PlanMismatchError(f"{source}: {error}", differences=(str(error),)) from None
        runs = measuring.traced
    chain = measured_chain(model, runs, inputs, calibrate=calibrate, approximate=approximate, compiled=measuring)
    margin = 0.0 if calibrate else UNCALIBRATED_MARGIN
    simulation = check_plan_fits(saved.schedule, chain, budget_bytes, source, margin)
    fresh = Plan(schedule=saved.schedule, chain=chain, budget_bytes=budget_bytes, simulation=simulation,
                 input_shapes=saved.input_shapes, input_dtypes=saved.input_dtypes, fingerprint=saved.fingerprint,
                 workspace_margin=margin, segments=saved.segments, segment_fraction=saved.segment_fraction,
                 adaptive_checkpoints=adaptive_checkpoints(chain, simulation, usable_bytes(budget_bytes, margin)))
    fresh = with_backend(fresh, compiled, compiled.compile_seconds - before if compiled is not None else 0.0)
    return CompiledModel(model, traced, fresh, calibrate=calibrate, approximate=approximate, compiled=compiled)
