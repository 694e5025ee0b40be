"""``CompiledModel``: the model that trains by a memory plan, sharing its parameters with the original.

It runs the plan of each training call's key (:mod:`anode_plan.compiler.plan_cache`),
planning again for a new one, and straight through without a plan where no gradient is needed.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from anode_plan.compiler.chains import measured_chain, with_backend
from anode_plan.compiler.plan_cache import CachedPlan, PlanCache
from anode_plan.compiler.segmented import with_block_units
from anode_plan.compiler.units import offers_units, unit_plan
from anode_plan.errors import AnodePlanError, InfeasibleBudgetError, InputMismatchError, TorchCompileWrapWarning
from anode_plan.plan_key import describe_call, describe_plan
from anode_plan.plans.plan import Plan, approximation_of, plan_for_budget
from anode_plan.runtime import ScheduleRunner
from anode_plan.stages.inductor import CompiledStages
from anode_plan.stages.sketch import SketchedLayers, XConv
from anode_plan.tracing.trace import TracedModel
from planners import format_bytes


def _charged_input_grads(plan: Plan) -> tuple[bool, ...]:
    """For each input, whether the plan charges its gradient (the chain records whether any input's is)."""
    return (plan.chain.input_grad,) * len(plan.input_shapes)


def runner_for(traced: TracedModel, plan: Plan, model: nn.Module, sketch_ops: dict | None = None,
               compiled: CompiledStages | None = None) -> ScheduleRunner:
    """The runner of ``plan``'s schedule, replaying the RNG in the regions whose stages draw random numbers.

    ``sketch_ops``: the sketched layers' ops, kept across a compiled model's plans so that
    each layer's probes keep advancing with the training step. ``compiled``: with
    ``backend="inductor"``, the compiled stages.
    """
    random_stages = frozenset(i for i, stage in enumerate(plan.chain.stages) if stage.uses_rng)
    sketch = None
    if plan.schedule.sketched:
        offers = {plan.chain.stages[i].name: plan.chain.stages[i].sketch for i in plan.schedule.sketched}
        sketch = SketchedLayers(approximation_of(plan), {name: o.layers for name, o in offers.items()}, ops=sketch_ops)
    if compiled is not None and plan.unit is not None:  # the whole step is one graph; no_grad runs eager stages
        return ScheduleRunner(traced, plan.schedule.ops, model, random_stages,
                              unit=compiled.units[plan.unit.fraction].function())
    if compiled is not None and plan.segments:  # the schedule is over units (runs of stages compiled as one graph)
        compiled = compiled.segmented_stages(plan.segments, plan.segment_fraction)
        traced = compiled.traced
    return ScheduleRunner(traced, plan.schedule.ops, model, random_stages, sketch, dict(plan.adaptive_checkpoints),
                          compiled=compiled.view(plan.chain) if compiled is not None and plan.backend == "inductor"
                          else None)


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
    device (after ``.to(...)``), another autocast state, inputs that now require a
    gradient, or parameters unfrozen since planning make it measure and plan again
    under the same budget, once per new key
    (see :mod:`anode_plan.compiler.plan_cache`); ``plan`` is then the plan of the last training
    call and ``plans`` all that are cached. When nothing fits the budget for the new
    inputs, the call raises :class:`~anode_plan.InfeasibleBudgetError` saying so.
    """

    def __init__(self, model: nn.Module, traced: TracedModel, plan: Plan, *, planner: Any = None,
                 calibrate: bool = True, approximate: XConv | None = None,
                 compiled: CompiledStages | None = None) -> None:
        super().__init__()
        self._parameters = model._parameters
        self._buffers = model._buffers
        self._modules = model._modules
        self._non_persistent_buffers_set = model._non_persistent_buffers_set
        self.training = model.training
        self.__dict__["original_model"] = model
        self.__dict__["traced"] = traced
        self.__dict__["plan"] = plan
        self.__dict__["approximate"] = approximate
        self.__dict__["_sketch_ops"] = {}
        self.__dict__["compiled_stages"] = compiled
        self.__dict__["runner"] = runner_for(traced, plan, model, self._sketch_ops, compiled)
        self.__dict__["planner"] = planner
        self.__dict__["calibrate"] = calibrate
        self.__dict__["_modules_list"] = list(model.modules())
        self.__dict__["_plan_cache"] = PlanCache()
        key, batches = describe_plan(plan.input_shapes, plan.input_dtypes, self._modules_list)
        self._plan_cache.add(CachedPlan(key, batches, plan, self.runner, _charged_input_grads(plan)))

    @property
    def plans(self) -> tuple[Plan, ...]:
        """The cached plans, one per input shape, dtype, device and autocast state seen in training."""
        return tuple(entry.plan for entry in self._plan_cache.entries)

    def __getattr__(self, name: str) -> Any:
        """Parameters, buffers and submodules are shared; any other attribute (a tensor constant fx
        stored on the model while tracing it) is the original model's."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            original = self.__dict__.get("original_model")
            if original is None:
                raise
            return getattr(original, name)

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
        traced = self.traced
        if traced.batch_specialised and inputs[0].dim() and inputs[0].shape[0] != traced.batch:
            raise InputMismatchError(
                f"{traced.model_name} was traced for batch {traced.batch} only, and is called with batch "
                f"{inputs[0].shape[0]}: {traced.batch_specialised}. Compute sizes in forward with tensor methods "
                "(x.view(x.size(0), -1), x.flatten(1)) rather than Python numbers (len(x), int(...)), or compile "
                "one model per batch size (DataLoader(..., drop_last=True) keeps every batch the same).")

    def _runner_for(self, inputs: tuple) -> ScheduleRunner | None:
        """The runner of the plan for these inputs (planning anew if needed); ``None`` when no gradient is needed."""
        key, batches = describe_call(inputs, self._modules_list)
        input_grads = tuple(x.requires_grad for x in inputs)
        if not any(key.trainable) and not any(input_grads):
            return None
        entry = self._plan_cache.find(key, batches, input_grads, exact=self.compiled_stages is not None)
        if entry is None:
            plan = self._replan(inputs)
            runner = runner_for(self.traced, plan, self.original_model, self._sketch_ops, self.compiled_stages)
            entry = self._plan_cache.add(CachedPlan(key, batches, plan, runner, _charged_input_grads(plan)))
        self.__dict__["plan"], self.__dict__["runner"] = entry.plan, entry.runner
        return entry.runner

    def _replan(self, inputs: tuple) -> Plan:
        """Measure and plan for ``inputs`` under the budget of the first plan (see :mod:`anode_plan.compiler.plan_cache`)."""
        first = self._plan_cache.entries[0].plan  # every cached plan has the same budget
        shapes = [tuple(x.shape) for x in inputs]
        compiled = self.compiled_stages
        before = compiled.compile_seconds if compiled is not None else 0.0
        if compiled is not None and offers_units(self.planner, compiled):
            unit = unit_plan(self.original_model, self.traced, inputs, first.budget_bytes, compiled)
            if unit is not None:
                return with_backend(unit, compiled, compiled.compile_seconds - before)
        try:
            chain = measured_chain(self.original_model, self.traced, inputs, calibrate=self.calibrate,
                                   approximate=self.approximate, compiled=compiled)
        except AnodePlanError:
            raise
        except Exception as error:
            raise InputMismatchError(
                f"{self.traced.model_name} was compiled for inputs of shapes {list(first.input_shapes)} and is now "
                f"called with {shapes}; planning for the new shapes failed ({type(error).__name__}: {error}). Call it "
                "with inputs shaped like example_inputs (the batch size may change).") from error
        try:
            plan = plan_for_budget(chain, self.traced, inputs, first.budget_bytes, self.planner,
                                   workspace_margin=first.workspace_margin)
        except InfeasibleBudgetError as error:
            raise InfeasibleBudgetError(
                f"{self.traced.model_name} was planned for inputs {list(first.input_shapes)} under a budget of "
                f"{format_bytes(first.budget_bytes)} ({first.budget_bytes} bytes); this call (inputs {shapes}, "
                f"{', '.join(str(x.dtype) for x in inputs)}) needs at least {format_bytes(error.min_budget_bytes)}, "
                f"so no schedule fits. Split the batch (for example accumulate gradients over batches no larger than "
                f"planned), or compile with memory_budget of at least {error.min_budget_bytes} bytes.",
                budget_bytes=first.budget_bytes, min_budget_bytes=error.min_budget_bytes,
                breakdown=error.breakdown) from None
        if compiled is not None and offers_units(self.planner, compiled):
            plan = with_block_units(plan, self.original_model, self.traced, inputs, compiled, self.planner)
        return with_backend(plan, compiled, (compiled.compile_seconds - before) if compiled is not None else 0.0)

    def forward(self, *inputs: Any) -> Any:
        if torch.compiler.is_compiling():  # true only while TorchDynamo traces this frame
            self._under_dynamo()
        return self._run(*inputs)

    @torch.compiler.disable
    def _under_dynamo(self) -> None:
        """Say once that ``torch.compile(compiled)`` leaves the schedule to run as planned."""
        if self.__dict__.get("_said_dynamo"):
            return
        self.__dict__["_said_dynamo"] = True
        inductor = self.plan.backend == "inductor"
        warnings.warn(TorchCompileWrapWarning(
            f"torch.compile of an anode_plan.compile'd {self.traced.model_name}: TorchDynamo stops at its schedule "
            "(a graph break around it), which runs as planned, so the memory budget of "
            f"{format_bytes(self.plan.budget_bytes)} still holds (compiling the schedule as one graph would flatten "
            "its checkpoint regions and could go over it). "
            + ("Its stages already run as Inductor code (backend='inductor')." if inductor else
               "To run the stages as Inductor code under the budget, use anode_plan.compile(..., "
               "backend='inductor') instead of wrapping the result in torch.compile.")), stacklevel=4)

    @torch.compiler.disable
    def _run(self, *inputs: Any) -> Any:
        """The plan's step (outside TorchDynamo: see :meth:`_under_dynamo`)."""
        self._check_inputs(inputs)
        runner = self._runner_for(inputs) if torch.is_grad_enabled() else None
        if runner is not None and runner.unit is not None:  # the whole model as one compiled graph
            return runner.unit(tuple(inputs))
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
