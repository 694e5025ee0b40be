"""``anode_plan.compile``: trace → measure → plan → check → rewrite.

The budget, ``memory_budget``, bounds the peak memory one training step (forward and
backward) allocates on top of what is already allocated when forward starts.
Parameters, optimizer state and the input batch do not count; activations, recompute
temporaries and parameter gradients do. On CUDA that is ``max_memory_allocated()``
minus ``memory_allocated()`` at forward start; :func:`anode_plan.measure_peak_memory`
measures it on either device.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from anode_plan.budget import parse_memory_budget
from anode_plan.costmodel import lower_to_chain
from anode_plan.errors import AnodePlanError, InfeasibleBudgetError, InputMismatchError, PlannerSpecError
from anode_plan.plan_cache import CachedPlan, PlanCache, describe_call, describe_plan
from anode_plan.planfile import (check_plan_fits, check_plan_matches, example_inputs_for, read_plan_file,
                                 structure_digest)
from anode_plan.runtime import ScheduleRunner
from anode_plan.trace import TracedModel, trace_model
import planners
from planners import Chain, Schedule, Simulation, format_bytes, simulate_plan


@dataclass(frozen=True)
class Plan:
    """A schedule for one model and input shape, and what it is predicted to cost.

    Attributes:
        schedule: what runs, taped or in checkpoint regions (plain data).
        chain: the measured stages the schedule was planned on.
        budget_bytes: the budget it was planned for.
        simulation: the simulated step: predicted peak, cost and timeline.
        input_shapes: the shapes of the example inputs.
        input_dtypes: their dtypes, as strings.
        fingerprint: the traced structure, to tell whether a plan fits a model.
    """

    schedule: Schedule
    chain: Chain
    budget_bytes: int
    simulation: Simulation
    input_shapes: tuple[tuple[int, ...], ...]
    input_dtypes: tuple[str, ...]
    fingerprint: str

    @property
    def predicted_peak_bytes(self) -> int:
        return self.simulation.peak_bytes

    @property
    def recompute_overhead(self) -> float:
        """Predicted extra compute, as a fraction of a step without recompute."""
        return self.simulation.recompute_overhead


class CompiledModel(nn.Module):
    """A model that trains by a memory plan; made by :func:`anode_plan.compile`.

    It shares its parameters, buffers and submodules with the original model, so its
    ``state_dict()`` has the original keys, an optimizer over ``compiled.parameters()``
    trains the original, and checkpoints load either way. With autograd on, forward
    runs the plan; under ``torch.no_grad()``, ``torch.inference_mode()``, or when
    neither a parameter nor an input needs a gradient, it runs the stages straight
    through (no checkpoints, no recompute, the memory of the plain model).

    A training call with a smaller batch than planned runs the plan as it is (its
    memory only shrinks). A larger batch, other non-batch shapes, another dtype or
    device (after ``.to(...)``), another autocast state, or parameters unfrozen since
    planning make it measure and plan again under the same budget, once per new key
    (see :mod:`anode_plan.plan_cache`); ``plan`` is then the plan of the last training
    call and ``plans`` all that are cached. When nothing fits the budget for the new
    inputs, the call raises :class:`~anode_plan.InfeasibleBudgetError` saying so.
    """

    def __init__(self, model: nn.Module, traced: TracedModel, plan: Plan, *, planner: Any = None) -> None:
        super().__init__()
        self._parameters = model._parameters
        self._buffers = model._buffers
        self._modules = model._modules
        self._non_persistent_buffers_set = model._non_persistent_buffers_set
        self.training = model.training
        self.__dict__["original_model"] = model
        self.__dict__["traced"] = traced
        self.__dict__["plan"] = plan
        self.__dict__["runner"] = ScheduleRunner(traced, plan.schedule.ops, model)
        self.__dict__["planner"] = planner
        self.__dict__["_modules_list"] = list(model.modules())
        self.__dict__["_plan_cache"] = PlanCache()
        key, batches = describe_plan(plan.input_shapes, plan.input_dtypes, self._modules_list)
        self._plan_cache.add(CachedPlan(key, batches, plan, self.runner))

    @property
    def plans(self) -> tuple[Plan, ...]:
        """The cached plans, one per input shape, dtype, device and autocast state seen in training."""
        return tuple(entry.plan for entry in self._plan_cache.entries)

    def train(self, mode: bool = True) -> "CompiledModel":
        self.original_model.train(mode)
        return super().train(mode)

    def _check_inputs(self, inputs: tuple) -> None:
        expected = self.plan.input_shapes
        if len(inputs) != len(expected):
            raise InputMismatchError(f"{self.traced.model_name} was compiled for {len(expected)} inputs, got "
                                     f"{len(inputs)}")
        for position, value in enumerate(inputs):
            if not isinstance(value, torch.Tensor):
                raise InputMismatchError(f"input {position} is a {type(value).__name__}, not a tensor")

    def _runner_for(self, inputs: tuple) -> ScheduleRunner | None:
        """The runner of the plan for these inputs (planning anew if needed); ``None`` when no gradient is needed."""
        key, batches = describe_call(inputs, self._modules_list)
        if not any(key.trainable) and not any(x.requires_grad for x in inputs):
            return None
        entry = self._plan_cache.find(key, batches)
        if entry is None:
            plan = self._replan(inputs)
            entry = self._plan_cache.add(CachedPlan(key, batches, plan, ScheduleRunner(
                self.traced, plan.schedule.ops, self.original_model)))
        self.__dict__["plan"], self.__dict__["runner"] = entry.plan, entry.runner
        return entry.runner

    def _replan(self, inputs: tuple) -> Plan:
        """Measure and plan for ``inputs`` under the budget of the first plan (see :mod:`anode_plan.plan_cache`)."""
        first = self._plan_cache.entries[0].plan  # every cached plan has the same budget
        shapes = [tuple(x.shape) for x in inputs]
        try:
            chain = lower_to_chain(self.original_model, self.traced, inputs)
        except AnodePlanError:
            raise
        except Exception as error:
            raise InputMismatchError(
                f"{self.traced.model_name} was compiled for inputs of shapes {list(first.input_shapes)} and is now "
                f"called with {shapes}; planning for the new shapes failed ({type(error).__name__}: {error}). Call it "
                "with inputs shaped like example_inputs (the batch size may change).") from error
        try:
            return plan_for_budget(chain, self.traced, inputs, first.budget_bytes, self.planner)
        except InfeasibleBudgetError as error:
            raise InfeasibleBudgetError(
                f"{self.traced.model_name} was planned for inputs {list(first.input_shapes)} under a budget of "
                f"{format_bytes(first.budget_bytes)} ({first.budget_bytes} bytes); this call (inputs {shapes}, "
                f"{', '.join(str(x.dtype) for x in inputs)}) needs at least {format_bytes(error.min_budget_bytes)}, "
                f"so no schedule fits. Split the batch (for example accumulate gradients over batches no larger than "
                f"planned), or compile with memory_budget of at least {error.min_budget_bytes} bytes.",
                budget_bytes=first.budget_bytes, min_budget_bytes=error.min_budget_bytes,
                breakdown=error.breakdown) from None

    def forward(self, *inputs: Any) -> Any:
        self._check_inputs(inputs)
        runner = self._runner_for(inputs) if torch.is_grad_enabled() else None
        if runner is not None:
            state = runner.run_schedule(self, tuple(inputs))
        else:
            state = self.runner.run_plain(self, tuple(inputs))
        final = dict(zip(self.traced.stages[-1].out_names, state))
        return self.traced.build_output(self, final)

    def extra_repr(self) -> str:
        plan = self.plan
        return (f"plan={plan.schedule.description!r}, budget_bytes={plan.budget_bytes}, "
                f"predicted_peak_bytes={plan.predicted_peak_bytes}")


def compile(model: nn.Module, memory_budget: int | str | None = None,
            example_inputs: Sequence[torch.Tensor] | None = None, *, planner: Any = None,
            leaf_modules: Sequence[type] = (), plan: "str | os.PathLike | Plan | None" = None) -> CompiledModel:
    """Plan ``model``'s training step to fit ``memory_budget`` and return the compiled model.

    Args:
        model: any ``nn.Module`` that torch.fx can trace, with its ODE blocks built from
            :class:`anode_plan.ODEBlock`. Put it in the mode (train/eval), dtype and
            device you will train in.
        memory_budget: ``"4GB"`` (SI), ``"512MiB"`` (IEC) or an int of bytes: the peak a
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
        leaf_modules: module classes fx should not trace into.
        plan: a saved plan (a path written by :func:`anode_plan.save_plan`, or a
            :class:`Plan`) to reuse instead of planning. The model is traced and measured
            again; the plan must match its structure and ``example_inputs`` (by default
            inputs shaped like the plan's), and its schedule must fit ``memory_budget``
            (by default the plan's budget) on the fresh measurements.

    Raises:
        BudgetFormatError: the budget is not a positive size.
        InfeasibleBudgetError: nothing fits; the error carries the smallest budget.
        UntraceableModelError, ExampleInputsError: the model or inputs cannot be planned.
        PlanFileError, PlanMismatchError, PlanInvariantError, PlanOverBudgetError: ``plan``
            cannot be read, was made for another model or input, or is broken.
    """
    if plan is not None:
        return _reuse_plan(model, plan, memory_budget, example_inputs, planner, leaf_modules)
    parse_memory_budget(memory_budget)  # reject a bad budget before tracing
    traced = trace_model(model, example_inputs, leaf_modules=leaf_modules)
    chain = lower_to_chain(model, traced, example_inputs)
    plan = plan_for_budget(chain, traced, example_inputs, memory_budget, planner)
    return CompiledModel(model, traced, plan, planner=planner)


PLANNER_NAMES = {
    "auto": planners.Auto,
    "chain-dp": planners.ChainDP,
    "cp-sat": planners.CPSat,
    "landmarks": planners.Landmarks,
    "store-all": planners.StoreAll,
    "anode": planners.Anode,
    "revolve": planners.Revolve,
}


def resolve_planner(planner: Any) -> Any:
    """A planner object from ``planner``: ``None`` or a name from :data:`PLANNER_NAMES`, or an object."""
    if planner is None:
        planner = "auto"
    if isinstance(planner, str):
        if planner not in PLANNER_NAMES:
            raise PlannerSpecError(f"planner={planner!r} is not a known planner; use one of "
                                   f"{sorted(PLANNER_NAMES)} or a planner object such as planners.Revolve(snapshots=4)")
        return PLANNER_NAMES[planner]()
    if not callable(getattr(planner, "plan", None)):
        raise PlannerSpecError(f"planner={planner!r} has no plan(chain, *, budget_bytes) method; pass a name from "
                               f"{sorted(PLANNER_NAMES)} or a planner object")
    return planner


def plan_for_budget(chain: Chain, traced: TracedModel, example_inputs: Sequence[torch.Tensor],
                    memory_budget: int | str, planner: Any = None) -> Plan:
    """Plan an already measured chain for one budget (what :func:`compile` does after tracing).

    Use it to compare several budgets or planners without tracing again.
    """
    budget_bytes = parse_memory_budget(memory_budget)
    planner = resolve_planner(planner)
    try:
        schedule = planner.plan(chain, budget_bytes=budget_bytes)
    except InfeasibleBudgetError as error:
        raise InfeasibleBudgetError(f"memory_budget={memory_budget!r}: {error}", budget_bytes=error.budget_bytes,
                                    min_budget_bytes=error.min_budget_bytes, breakdown=error.breakdown) from None
    simulation = simulate_plan(chain, schedule, timeline=True)
    return Plan(schedule=schedule, chain=chain, budget_bytes=budget_bytes, simulation=simulation,
                input_shapes=tuple(tuple(x.shape) for x in example_inputs),
                input_dtypes=tuple(str(x.dtype) for x in example_inputs),
                fingerprint=structure_digest(traced))


def load_plan(path: str | os.PathLike) -> Plan:
    """Read a plan saved by :func:`anode_plan.save_plan`; equal to the plan that was saved.

    The schedule is validated and simulated on the chain recorded in the file, and must
    fit the file's budget. To run it, give it (or the path) to ``compile(model, plan=...)``,
    which checks it against the model as well.

    Raises:
        PlanFileError: the file cannot be read or a field has the wrong type.
        PlanInvariantError: the schedule would not compute the gradients.
        PlanOverBudgetError: the schedule needs more than the file's budget.
    """
    saved = read_plan_file(path)
    simulation = check_plan_fits(saved.schedule, saved.chain, saved.budget_bytes, saved.source)
    return Plan(schedule=saved.schedule, chain=saved.chain, budget_bytes=saved.budget_bytes, simulation=simulation,
                input_shapes=saved.input_shapes, input_dtypes=saved.input_dtypes, fingerprint=saved.fingerprint)


def _reuse_plan(model: nn.Module, plan: "str | os.PathLike | Plan", memory_budget: int | str | None,
                example_inputs: Sequence[torch.Tensor] | None, planner: Any,
                leaf_modules: Sequence[type]) -> CompiledModel:
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
    chain = lower_to_chain(model, traced, inputs)
    simulation = check_plan_fits(saved.schedule, chain, budget_bytes, source)
    fresh = Plan(schedule=saved.schedule, chain=chain, budget_bytes=budget_bytes, simulation=simulation,
                 input_shapes=saved.input_shapes, input_dtypes=saved.input_dtypes, fingerprint=saved.fingerprint)
    return CompiledModel(model, traced, fresh)
