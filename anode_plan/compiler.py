"""``anode_plan.compile``: trace → measure → plan → check → rewrite.

The budget, ``memory_budget``, bounds the peak memory one training step (forward and
backward) allocates on top of what is already allocated when forward starts.
Parameters, optimizer state and the input batch do not count; activations, recompute
temporaries and parameter gradients do. On CUDA that is ``max_memory_allocated()``
minus ``memory_allocated()`` at forward start; :func:`anode_plan.measure_peak_memory`
measures it on either device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from anode_plan.budget import parse_memory_budget
from anode_plan.costmodel import lower_to_chain
from anode_plan.errors import InfeasibleBudgetError, InputMismatchError
from anode_plan.runtime import ScheduleRunner
from anode_plan.trace import TracedModel, trace_model
from planners import Chain, Landmarks, Schedule, Simulation, simulate_plan


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
    runs the plan; under ``torch.no_grad()`` it runs the stages straight through.
    """

    def __init__(self, model: nn.Module, traced: TracedModel, plan: Plan) -> None:
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

    def train(self, mode: bool = True) -> "CompiledModel":
        self.original_model.train(mode)
        return super().train(mode)

    def _check_inputs(self, inputs: tuple) -> None:
        expected = self.plan.input_shapes
        if len(inputs) != len(expected):
            raise InputMismatchError(f"{self.traced.model_name} was compiled for {len(expected)} inputs, got "
                                     f"{len(inputs)}")
        for position, (value, shape) in enumerate(zip(inputs, expected)):
            if not isinstance(value, torch.Tensor):
                raise InputMismatchError(f"input {position} is a {type(value).__name__}, not a tensor")
            if tuple(value.shape[1:]) != shape[1:] or value.dim() != len(shape):
                raise InputMismatchError(
                    f"input {position} has shape {tuple(value.shape)} but the plan was made for {shape}; only the "
                    "batch dimension may differ. Compile again with example inputs of the new shape.")
            if value.shape[0] > shape[0]:
                raise InputMismatchError(
                    f"input {position} has batch {value.shape[0]}, larger than the planned batch {shape[0]}: the "
                    f"plan's memory promise ({self.plan.budget_bytes} bytes) holds only up to {shape[0]}. Compile "
                    f"with example inputs of batch {value.shape[0]}, or split the batch.")

    def forward(self, *inputs: Any) -> Any:
        self._check_inputs(inputs)
        if torch.is_grad_enabled():
            state = self.runner.run_schedule(self, tuple(inputs))
        else:
            state = self.runner.run_plain(self, tuple(inputs))
        final = dict(zip(self.traced.stages[-1].out_names, state))
        return self.traced.build_output(self, final)

    def extra_repr(self) -> str:
        plan = self.plan
        return (f"plan={plan.schedule.description!r}, budget_bytes={plan.budget_bytes}, "
                f"predicted_peak_bytes={plan.predicted_peak_bytes}")


def compile(model: nn.Module, memory_budget: int | str, example_inputs: Sequence[torch.Tensor], *,
            planner: Any = None, leaf_modules: Sequence[type] = ()) -> CompiledModel:
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
            for this batch size and smaller.
        planner: a planner object with ``plan(chain, *, budget_bytes)``; by default
            :class:`planners.Landmarks`, the cheapest of store-all, ANODE and revolve.
        leaf_modules: module classes fx should not trace into.

    Raises:
        BudgetFormatError: the budget is not a positive size.
        InfeasibleBudgetError: nothing fits; the error carries the smallest budget.
        UntraceableModelError, ExampleInputsError: the model or inputs cannot be planned.
    """
    parse_memory_budget(memory_budget)  # reject a bad budget before tracing
    traced = trace_model(model, example_inputs, leaf_modules=leaf_modules)
    chain = lower_to_chain(model, traced, example_inputs)
    plan = plan_for_budget(chain, traced, example_inputs, memory_budget, planner)
    return CompiledModel(model, traced, plan)


def plan_for_budget(chain: Chain, traced: TracedModel, example_inputs: Sequence[torch.Tensor],
                    memory_budget: int | str, planner: Any = None) -> Plan:
    """Plan an already measured chain for one budget (what :func:`compile` does after tracing).

    Use it to compare several budgets or planners without tracing again.
    """
    budget_bytes = parse_memory_budget(memory_budget)
    planner = planner if planner is not None else Landmarks()
    try:
        schedule = planner.plan(chain, budget_bytes=budget_bytes)
    except InfeasibleBudgetError as error:
        raise InfeasibleBudgetError(f"memory_budget={memory_budget!r}: {error}", budget_bytes=error.budget_bytes,
                                    min_budget_bytes=error.min_budget_bytes, breakdown=error.breakdown) from None
    simulation = simulate_plan(chain, schedule, timeline=True)
    return Plan(schedule=schedule, chain=chain, budget_bytes=budget_bytes, simulation=simulation,
                input_shapes=tuple(tuple(x.shape) for x in example_inputs),
                input_dtypes=tuple(str(x.dtype) for x in example_inputs),
                fingerprint=traced.structure_fingerprint())
