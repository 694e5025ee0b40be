"""A :class:`Plan`: the schedule for one model and input shape, and what it is predicted to cost; and planning one.

:func:`plan_for_budget` turns a measured chain and a budget into a plan, with the planner
the user named (:data:`PLANNER_NAMES`) and the strategies the chain offers beyond it
(XConv sketches, the adaptive blocks' share of the budget).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

import planners
from anode_plan.budget import PREDICTION_RESERVE, budget_for_peak, parse_memory_budget, usable_bytes
from anode_plan.errors import InfeasibleBudgetError, PlannerSpecError
from anode_plan.plans.adaptive_share import (
    adaptive_checkpoints,
    adaptive_saving,
    extra_checkpoint_bytes,
    plan_sharing_adaptive,
)
from anode_plan.plans.serialise import structure_digest
from anode_plan.stages.sketch import XConv
from anode_plan.tracing.trace import TracedModel
from planners import Chain, Schedule, Simulation, simulate_plan
from planners.chain import tie_tolerance
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
            its solves keep (:mod:`anode_plan.plans.adaptive_share`).
        backend: how the stages run: ``"eager"``, or ``"inductor"`` (each stage compiled,
            its memory and cost measured on the device: :mod:`anode_plan.stages.inductor`).
        compile_seconds: with ``"inductor"``, the time the model's stages took to compile
            (0 when they were compiled already, for an earlier plan of the same model).
        eager_stages: with ``"inductor"``, (stage, why) for each stage that runs eager.
        unit: with ``"inductor"``, the compiled unit that runs the whole model as one graph
            (:class:`CompiledUnit`), or ``None`` when the stages run compiled one by one
            under :attr:`schedule`. With a unit, the predicted peak and step are the unit's,
            measured on the device, and :attr:`schedule` is store-all (anode-plan recomputes
            nothing; the partitioner recomputes inside the graph).
        segments: with ``"inductor"``, the runs of the model's stages compiled as one graph each
            (``(start, stop)`` positions: :mod:`anode_plan.tracing.segments`), when :attr:`chain` and
            :attr:`schedule` are over those units; empty when they are over the model's own stages.
        segment_fraction: with :attr:`segments`, the partitioner's ``activation_memory_budget`` the
            units are compiled at (1: it saves what backward reads; below, it recomputes inside).

    Times: :attr:`predicted_step_seconds` is the whole training step (forward, the loss,
    backward), in the milliseconds calibration measured on the device when
    :attr:`cost_source` is ``"measured"`` (:mod:`anode_plan.measure.timing`), and a
    nominal figure from FLOP counts when it is ``"nominal"`` (``calibrate=False``).
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
    unit: "CompiledUnit | None" = None
    segments: tuple[tuple[int, int], ...] = ()
    segment_fraction: float = 1.0

    @property
    def predicted_peak_bytes(self) -> int:
        """The simulated peak, plus the adaptive blocks' checkpoints beyond the first (an upper bound on them);
        with a :attr:`unit`, the unit's measured step peak."""
        if self.unit is not None:
            return self.unit.peak_bytes
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
    def cost_source(self) -> str:
        """``"measured"``: the costs were timed on the device; ``"nominal"``: FLOP counts at fixed rates."""
        return "measured" if self.unit is not None else self.chain.cost_source

    @property
    def predicted_step_seconds(self) -> float:
        """The predicted time of one training step (forward, loss and backward) under this plan, in seconds.

        Measured stage, region and step costs when :attr:`cost_source` is ``"measured"``
        (nominal ones otherwise); the adaptive blocks at their checkpoints.
        """
        if self.unit is not None:
            return self.unit.step_ms / 1e3
        saving = adaptive_saving(self.chain, self.adaptive_checkpoints)
        return (self.simulation.step_cost - saving) / 1e3

    @property
    def plain_step_seconds(self) -> float:
        """The predicted time of plain autograd's step (every stage once, every tape kept), in seconds.

        With a :attr:`unit`, the unit's own measured step: whatever its graph recomputes is fused
        into its kernels and cannot be priced apart.
        """
        if self.unit is not None:
            return self.unit.step_ms / 1e3
        kept_all = tuple((self.chain.blocks[self.chain.stages[stage].block].name, steps)
                         for stage, steps in self.chain.adaptive_steps)
        return (self.simulation.baseline_step_cost - adaptive_saving(self.chain, kept_all)) / 1e3

    @property
    def predicted_slowdown(self) -> float:
        """:attr:`predicted_step_seconds` over :attr:`plain_step_seconds` (1.0 for no recompute)."""
        plain = self.plain_step_seconds
        return self.predicted_step_seconds / plain if plain > 0 else 1.0

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
class CompiledUnit:
    """The whole model compiled as one Inductor graph at a partitioner budget (:mod:`anode_plan.stages.unit`).

    Attributes:
        fraction: ``torch._functorch.config.activation_memory_budget`` it was compiled at:
            the share of the save-everything partition's activations its graph keeps.
        peak_bytes: its training step's peak, measured by the allocator
            (:mod:`anode_plan.measure.unit_step`).
        step_ms: its training step's median time, measured on the device.
        staged_step_ms: the per-stage compiled plan's predicted step at this budget, in
            ms, when it was measured (0 when it was not, because the unit fitted first).
        tried: ``(fraction, measured peak bytes)`` of every unit measured for this plan,
            including those that did not fit.
    """

    fraction: float
    peak_bytes: int
    step_ms: float
    staged_step_ms: float = 0.0
    tried: tuple[tuple[float, int], ...] = ()


@dataclass(frozen=True)
class ApproximatedLayer:
    """A convolution a plan sketches (XConv): its weight gradient is an unbiased estimate.

    Attributes:
        layer: its qualified name.
        stages: in how many stages it runs sketched (an ODE block's steps each count).
        relative_error: ``‖ĝ - g‖ / ‖g‖`` of its weight gradient, measured on the example
            batch (:func:`anode_plan.measure.sketch_offers.measure_errors`).
        probes: the sketch's number of probes.
    """

    layer: str
    stages: int
    relative_error: float
    probes: int


def approximation_of(plan: Plan) -> XConv | None:
    """The approximation a plan's chain was measured with (its sketch offers'), or ``None``."""
    offer = next((stage.sketch for stage in plan.chain.stages if stage.sketch is not None), None)
    return None if offer is None else XConv(offer.probes, offer.seed)


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
    (:mod:`anode_plan.plans.adaptive_share`). Raises :class:`InfeasibleBudgetError` when nothing fits.

    On measured costs, ties are settled toward a plan that timing noise cannot move: the
    schedule planned on the same chain priced by the FLOP model
    (:meth:`planners.Chain.nominal`, the least recomputed work) is taken instead when its
    predicted step is within the timings' noise (:func:`planners.chain.tie_tolerance`) of
    the measured plan's and it sketches nothing more. So two calibrations of one model,
    whose timings differ by noise, choose the same plan unless the measured times really
    prefer another.
    """
    def exact(c: Chain, b: int) -> Schedule:
        return planner.plan(c, budget_bytes=b)

    def sketched(c: Chain, b: int) -> Schedule:
        return plan_with_sketches(c, b, exact)

    choose = sketched if chain.sketchable_stages else exact
    schedule = plan_sharing_adaptive(chain, usable, choose)
    if chain.cost_source != "measured":
        return schedule
    try:
        reference = plan_sharing_adaptive(chain.nominal(), usable, choose)
    except planners.AnodePlanError:  # a planner that found nothing on the FLOP model's costs (a time limit)
        return schedule
    if reference.ops == schedule.ops and reference.sketched == schedule.sketched:
        return schedule
    if not set(reference.sketched) <= set(schedule.sketched):
        return schedule
    times = [_predicted_ms(chain, candidate, usable) for candidate in (schedule, reference)]
    if times[1] is not None and times[0] is not None and times[1] <= times[0] * (1 + tie_tolerance(chain)):
        return reference
    return schedule


def _predicted_ms(chain: Chain, schedule: Schedule, usable: int) -> float | None:
    """The schedule's predicted step on ``chain`` (its adaptive blocks at the checkpoints it leaves them), or
    ``None`` when it does not fit ``usable`` bytes."""
    simulation = simulate_plan(chain, schedule)
    if simulation.peak_bytes > usable:
        return None
    return simulation.step_cost - adaptive_saving(chain, adaptive_checkpoints(chain, simulation, usable))


def plan_for_budget(chain: Chain, traced: TracedModel, example_inputs: Sequence[torch.Tensor],
                    memory_budget: int | float | str, planner: Any = None, *, workspace_margin: float = 0.0) -> Plan:
    """Plan an already measured chain for one budget (what :func:`compile` does after tracing).

    Use it to compare several budgets or planners without tracing again.
    ``workspace_margin``: the share of the budget to keep free, for a chain lowered
    without calibration (:data:`anode_plan.measure.calibrate.UNCALIBRATED_MARGIN`).
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
