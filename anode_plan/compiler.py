"""``anode_plan.compile``: trace → measure → plan → check → rewrite.

The budget, ``memory_budget``, bounds the peak memory one training step (forward and
backward) allocates on top of what is already allocated when forward starts.
Parameters, optimizer state and the input batch do not count; activations, recompute
temporaries and parameter gradients do. On CUDA that is ``max_memory_allocated()``
minus ``memory_allocated()`` at forward start; on the CPU the same as the profiler's
allocation events count it. Memory kernels allocate inside themselves counts, which is
why each distinct stage is calibrated on the device (:mod:`anode_plan.calibrate`).
:func:`anode_plan.measure_peak_memory` measures it on either device.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch
from torch import nn

from anode_plan.budget import PREDICTION_RESERVE, budget_for_peak, parse_memory_budget, usable_bytes
from anode_plan.adaptive_stage import adaptive_checkpoints, extra_checkpoint_bytes, plan_sharing_adaptive
from anode_plan.calibrate import UNCALIBRATED_MARGIN
from anode_plan.costmodel import lower_to_chain
from anode_plan.errors import (AnodePlanError, InfeasibleBudgetError, InputMismatchError,
                               PlanMismatchError, PlannerSpecError)
from anode_plan.plan_cache import CachedPlan, PlanCache, describe_call, describe_plan
from anode_plan.planfile import (check_plan_fits, check_plan_matches, example_inputs_for, read_plan_file,
                                 structure_digest)
from anode_plan.runtime import ScheduleRunner
from anode_plan.compiled_chain import compiled_chain_for
from anode_plan.inductor import CompiledStages, check_backend, compiled_stages_for
from anode_plan.sketch import SketchedLayers, XConv, check_approximation
from anode_plan.trace import TracedModel, trace_model
import planners
from planners import Chain, Schedule, Simulation, format_bytes, simulate_plan
from planners.sketch import plan_with_sketches


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
        workspace_margin: the share of the budget kept free for kernel workspaces that
            were not measured (``compile(..., calibrate=False)``); 0 for a calibrated plan.
        adaptive_checkpoints: per adaptive ODE block (its qualified name), the checkpoints
            its solves keep (:mod:`anode_plan.adaptive_stage`).
        backend: how the stages run: ``"eager"``, or ``"inductor"`` (each stage compiled,
            its memory and cost measured on the device: :mod:`anode_plan.inductor`).
        compile_seconds: with ``"inductor"``, the time the model's stages took to compile
            (0 when they were compiled already, for an earlier plan of the same model).
        eager_stages: with ``"inductor"``, (stage, why) for each stage that runs eager.
    """

    schedule: Schedule
    chain: Chain
    budget_bytes: int
    simulation: Simulation
    input_shapes: tuple[tuple[int, ...], ...]
    input_dtypes: tuple[str, ...]
    fingerprint: str
    workspace_margin: float = 0.0
    adaptive_checkpoints: tuple[tuple[str, int], ...] = ()
    backend: str = "eager"
    compile_seconds: float = 0.0
    eager_stages: tuple[tuple[str, str], ...] = ()

    @property
    def predicted_peak_bytes(self) -> int:
        """The simulated peak, plus the adaptive blocks' checkpoints beyond the first (an upper bound on them)."""
        return self.simulation.peak_bytes + self.adaptive_extra_bytes

    @property
    def adaptive_extra_bytes(self) -> int:
        """What the adaptive blocks' checkpoints beyond the first can add to the simulated peak."""
        return extra_checkpoint_bytes(self.chain, self.adaptive_checkpoints)

    @property
    def recompute_overhead(self) -> float:
        """Predicted extra compute, as a fraction of a step without recompute."""
        return self.simulation.recompute_overhead

    @property
    def exact(self) -> bool:
        """Whether the gradients are plain autograd's; ``False`` when some layer is sketched (:attr:`approximated`)."""
        return not self.schedule.sketched

    @property
    def approximated(self) -> tuple["ApproximatedLayer", ...]:
        """Every layer whose weight gradient the plan estimates (XConv), with its measured relative error."""
        found: dict[str, ApproximatedLayer] = {}
        for index in self.schedule.sketched:
            offer = self.chain.stages[index].sketch
            for layer, error in zip(offer.layers, offer.relative_errors):
                seen = found.get(layer)
                found[layer] = ApproximatedLayer(layer, (seen.stages if seen else 0) + 1, error, offer.probes)
        return tuple(found.values())


@dataclass(frozen=True)
class ApproximatedLayer:
    """A convolution a plan sketches (XConv): its weight gradient is an unbiased estimate.

    Attributes:
        layer: its qualified name.
        stages: in how many stages it runs sketched (an ODE block's steps each count).
        relative_error: ``‖ĝ - g‖ / ‖g‖`` of its weight gradient, measured on the example
            batch (:func:`anode_plan.approximate.measure_errors`).
        probes: the sketch's number of probes.
    """

    layer: str
    stages: int
    relative_error: float
    probes: int


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
    return ScheduleRunner(traced, plan.schedule.ops, model, random_stages, sketch, dict(plan.adaptive_checkpoints),
                          compiled=compiled.view(plan.chain) if compiled is not None and plan.backend == "inductor"
                          else None)


def approximation_of(plan: Plan) -> XConv | None:
    """The approximation a plan's chain was measured with (its sketch offers'), or ``None``."""
    offer = next((stage.sketch for stage in plan.chain.stages if stage.sketch is not None), None)
    return None if offer is None else XConv(offer.probes, offer.seed)


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
    (see :mod:`anode_plan.plan_cache`); ``plan`` is then the plan of the last training
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
        """Measure and plan for ``inputs`` under the budget of the first plan (see :mod:`anode_plan.plan_cache`)."""
        first = self._plan_cache.entries[0].plan  # every cached plan has the same budget
        shapes = [tuple(x.shape) for x in inputs]
        compiled = self.compiled_stages
        before = compiled.compile_seconds if compiled is not None else 0.0
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
            return with_backend(plan_for_budget(chain, self.traced, inputs, first.budget_bytes, self.planner,
                                                workspace_margin=first.workspace_margin), compiled,
                                (compiled.compile_seconds - before) if compiled is not None else 0.0)
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


def compile(model: nn.Module, memory_budget: int | float | str | None = None,
            example_inputs: Sequence[torch.Tensor] | None = None, *, planner: Any = None,
            leaf_modules: Sequence[type] = (), plan: "str | os.PathLike | Plan | None" = None,
            calibrate: bool = True, approximate: XConv | None = None, backend: str | None = None) -> CompiledModel:
    """Plan ``model``'s training step to fit ``memory_budget`` and return the compiled model.

    Args:
        model: an ``nn.Module`` with its ODE blocks built from :class:`anode_plan.ODEBlock`,
            as written: it is traced with torch.fx on fake tensors of the example's shapes,
            so Python that reads shapes traces (:mod:`anode_plan.capture`); only control
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
        calibrate: run each distinct stage once for real on the inputs' device to measure
            what its kernels allocate inside themselves (convolution and cuDNN
            workspaces), which count against the budget; see :mod:`anode_plan.calibrate`
            for what it costs (2.6 training steps on the demo model). ``False`` skips it and
            plans under ``1 - UNCALIBRATED_MARGIN`` (75%) of the budget instead, which
            is no guarantee.
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
            those (:mod:`anode_plan.inductor`). The first compile of a model pays for
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
    chain = measured_chain(model, traced, example_inputs, calibrate=calibrate, approximate=approximate,
                           compiled=compiled)
    plan = plan_for_budget(chain, traced, example_inputs, memory_budget, planner,
                           workspace_margin=0.0 if calibrate else UNCALIBRATED_MARGIN)
    plan = with_backend(plan, compiled, compiled.compile_seconds - before if compiled is not None else 0.0)
    return CompiledModel(model, traced, plan, planner=planner, calibrate=calibrate, approximate=approximate,
                         compiled=compiled)


def measured_chain(model: nn.Module, traced: TracedModel, inputs: Sequence[torch.Tensor], *, calibrate: bool,
                   approximate: XConv | None, compiled: CompiledStages | None = None) -> Chain:
    """The chain a plan is made on: the cost model's, or, with ``compiled`` stages, each stage measured on the
    device as it runs compiled (:mod:`anode_plan.compiled_chain`), once per input key of the model."""
    if compiled is None:
        return lower_to_chain(model, traced, inputs, calibrate=calibrate, approximate=approximate)
    return compiled_chain_for(model, traced, inputs, compiled)


def with_backend(plan: Plan, compiled: CompiledStages | None, compile_seconds: float = 0.0) -> Plan:
    """``plan`` marked as run by ``compiled`` stages (``backend="inductor"``), or as it is for eager."""
    if compiled is None:
        return plan
    return replace(plan, backend="inductor", compile_seconds=compile_seconds, eager_stages=compiled.describe_eager())


PLANNER_NAMES = {
    "auto": planners.Auto,
    "chain-dp": planners.ChainDP,
    "cp-sat": planners.CPSat,
    "landmarks": planners.Landmarks,
    "store-all": planners.StoreAll,
    "anode": planners.Anode,
    "revolve": planners.Revolve,
    "nested": planners.Nested,
    "reconstruct": planners.Reconstructed,
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


def plan_schedule(chain: Chain, usable: int, planner: Any) -> Schedule:
    """``planner``'s schedule for ``usable`` bytes, with the strategies the chain offers beyond it: XConv sketches
    where they pay (:mod:`planners.sketch`), and the adaptive blocks' share of the budget
    (:mod:`anode_plan.adaptive_stage`). Raises :class:`InfeasibleBudgetError` when nothing fits."""
    def exact(c: Chain, b: int) -> Schedule:
        return planner.plan(c, budget_bytes=b)

    def sketched(c: Chain, b: int) -> Schedule:
        return plan_with_sketches(c, b, exact)

    return plan_sharing_adaptive(chain, usable, sketched if chain.sketchable_stages else exact)


def plan_for_budget(chain: Chain, traced: TracedModel, example_inputs: Sequence[torch.Tensor],
                    memory_budget: int | float | str, planner: Any = None, *, workspace_margin: float = 0.0) -> Plan:
    """Plan an already measured chain for one budget (what :func:`compile` does after tracing).

    Use it to compare several budgets or planners without tracing again.
    ``workspace_margin``: the share of the budget to keep free, for a chain lowered
    without calibration (:data:`anode_plan.calibrate.UNCALIBRATED_MARGIN`).
    """
    budget_bytes = parse_memory_budget(memory_budget)
    if not 0.0 <= workspace_margin < 1.0:
        raise ValueError(f"workspace_margin={workspace_margin!r} must be a fraction in [0, 1)")
    planner = resolve_planner(planner)
    usable = usable_bytes(budget_bytes, workspace_margin)
    try:
        schedule = plan_schedule(chain, usable, planner)
    except InfeasibleBudgetError as error:
        needed = budget_for_peak(error.min_budget_bytes, workspace_margin)
        kept = f"{PREDICTION_RESERVE:.2%}" + (f" and, since calibration was skipped, {workspace_margin:.0%} for kernel "
                                              "workspaces (compile with calibrate=True to measure them instead)"
                                              if workspace_margin else "")
        message = str(error).replace(f"Give at least {error.min_budget_bytes} bytes",
                                     f"Give at least {needed} bytes (a plan keeps {kept} of the budget free)")
        raise InfeasibleBudgetError(f"memory_budget={memory_budget!r}: {message}", budget_bytes=budget_bytes,
                                    min_budget_bytes=needed, breakdown=error.breakdown) from None
    simulation = simulate_plan(chain, schedule, timeline=True)
    return Plan(schedule=schedule, chain=chain, budget_bytes=budget_bytes, simulation=simulation,
                input_shapes=tuple(tuple(x.shape) for x in example_inputs),
                input_dtypes=tuple(str(x.dtype) for x in example_inputs),
                fingerprint=structure_digest(traced), workspace_margin=workspace_margin,
                adaptive_checkpoints=adaptive_checkpoints(chain, simulation, usable))


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
    simulation = check_plan_fits(saved.schedule, saved.chain, saved.budget_bytes, saved.source, saved.workspace_margin)
    return Plan(schedule=saved.schedule, chain=saved.chain, budget_bytes=saved.budget_bytes, simulation=simulation,
                input_shapes=saved.input_shapes, input_dtypes=saved.input_dtypes, fingerprint=saved.fingerprint,
                workspace_margin=saved.workspace_margin, backend=saved.backend,
                adaptive_checkpoints=adaptive_checkpoints(saved.chain, simulation,
                                                          usable_bytes(saved.budget_bytes, saved.workspace_margin)))


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
    chain = measured_chain(model, traced, inputs, calibrate=calibrate, approximate=approximate, compiled=compiled)
    margin = 0.0 if calibrate else UNCALIBRATED_MARGIN
    simulation = check_plan_fits(saved.schedule, chain, budget_bytes, source, margin)
    fresh = Plan(schedule=saved.schedule, chain=chain, budget_bytes=budget_bytes, simulation=simulation,
                 input_shapes=saved.input_shapes, input_dtypes=saved.input_dtypes, fingerprint=saved.fingerprint,
                 workspace_margin=margin,
                 adaptive_checkpoints=adaptive_checkpoints(chain, simulation, usable_bytes(budget_bytes, margin)))
    fresh = with_backend(fresh, compiled, compiled.compile_seconds - before if compiled is not None else 0.0)
    return CompiledModel(model, traced, fresh, calibrate=calibrate, approximate=approximate, compiled=compiled)
