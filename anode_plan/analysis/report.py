"""Describe plans for people: per-block strategy, memory at the peak, landmarks, the trade-off curve.

``summarize_blocks``, ``find_landmarks`` and ``tradeoff_curve`` return plain data (frozen
dataclasses); ``format_report``, ``format_landmarks`` and ``format_tradeoff`` render them
as text. ``tools/plan_report.py`` and the demo print them; :mod:`anode_plan.analysis.plot` draws
them. Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from anode_plan.budget import budget_for_peak, usable_bytes
from anode_plan.plans.adaptive_share import adaptive_checkpoints, adaptive_saving
from anode_plan.plans.plan import plan_schedule
from planners import (
    Anode,
    Auto,
    Chain,
    InfeasibleBudgetError,
    Reconstruct,
    Region,
    Run,
    StoreAll,
    format_bytes,
    simulate_plan,
)
from planners.schedule import Op, nesting_depth
from planners.simulate import Simulation

# The simulator's kinds of memory, as a report names and explains them.
_KINDS = (
    ("parameter gradients", "fixed", "parameter gradients (every schedule pays them)"),
    ("states", "states", "snapshots kept for backward, the current state and the output"),
    ("tapes", "tapes", "tensors autograd saved for backward"),
    ("gradients", "gradients", "gradients of states, flowing back"),
    ("transient", "transients", "temporaries of the operation running at the peak"),
    ("workspace", "workspace", "what the kernel running at the peak allocates inside itself"),
)


@dataclass(frozen=True)
class BlockSummary:
    """What the plan does with one ODE block's steps.

    Every step is either *taped* (run once with its tape kept until its backward) or
    inside a checkpoint region (run without a tape, then recomputed in backward).

    Attributes:
        name: the block's module name.
        nt: its time steps; ``method`` its solver.
        strategy: ``"store tapes"`` (every step taped), ``"ANODE"`` (one region over
            exactly the block, its steps taped when recomputed), ``"ANODE+revolve"`` (that
            region with checkpoints nested inside), ``"checkpointed"`` (regions within the
            block), ``"checkpointed + tapes"`` (some steps taped, some in regions) or
            ``"inside a region"`` (a region that starts before the block or ends after it
            holds some of its steps: they are recomputed from a state outside the block),
            ``"reconstruct"`` (every step rebuilt backwards from the block's output; with
            tapes or regions for some steps, joined with ``+``).
        taped_steps: the steps whose tape the forward pass keeps.
        snapshot_steps: the steps whose input state is kept through the forward pass
            (where a region starts).
        recomputed_steps: forward step evaluations beyond the first, over the whole step.
        region: for ``"inside a region"``, the first and last stage of that region.
        reconstructed_steps: the steps rebuilt backwards (``Reconstruct``), and
            ``segments`` how many runs of them (each keeps its own output: an anchor).
        rebuild_error: the expected relative round-off of a rebuilt state: the measured
            error per inverted step times the longest run inverted in a row.
        peak_bytes: the predicted peak while this block's stages run or are differentiated.
    """

    name: str
    nt: int
    method: str
    strategy: str
    snapshot_steps: tuple[int, ...]
    recomputed_steps: int
    peak_bytes: int
    taped_steps: tuple[int, ...] = ()
    region: tuple[str, str] | None = None
    reconstructed_steps: tuple[int, ...] = ()
    segments: int = 0
    rebuild_error: float = 0.0


@dataclass(frozen=True)
class BudgetLandmarks:
    """The budgets where the schedule changes character, for one chain.

    ``store_all_bytes``: every tape kept (no recompute). ``anode_bytes``: ANODE.
    ``minimum_bytes``: the smallest budget any schedule of ``planner`` fits in.
    """

    store_all_bytes: int
    anode_bytes: int
    minimum_bytes: int


def _overlapping(ops: tuple[Op, ...], start: int, stop: int) -> list[Op]:
    """The top-level operations that run some of the stages ``[start, stop)``."""
    return [op for op in ops if (op.stage in range(start, stop) if isinstance(op, Run)
                                 else op.start < stop and start < op.stop)]


def summarize_blocks(plan) -> list[BlockSummary]:
    """One :class:`BlockSummary` per ODE block of ``plan`` (an :class:`anode_plan.Plan`)."""
    chain, sim = plan.chain, plan.simulation
    summaries = []
    for block in chain.blocks:
        ops = _overlapping(plan.schedule.ops, block.start, block.stop)
        regions = [op for op in ops if isinstance(op, Region)]
        rebuilt_ops = [op for op in ops if isinstance(op, Reconstruct)]
        rebuilt = tuple(step - block.start for op in rebuilt_ops for step in range(op.start, op.stop))
        taped = tuple(op.stage - block.start for op in ops if isinstance(op, Run))
        kept = tuple(op.start - block.start for op in regions if op.start >= block.start)
        outer = next((op for op in regions if op.start < block.start or op.stop > block.stop), None)
        region = None
        if outer is not None:
            strategy = "inside a region"
            region = (chain.stages[outer.start].name, chain.stages[outer.stop - 1].name)
        elif rebuilt:
            strategy = " + ".join(["reconstruct"] + (["tapes"] if taped else []) + (["checkpointed"] if regions else []))
        elif not regions:
            strategy = "store tapes"
        elif len(regions) == 1 and not taped and (regions[0].start, regions[0].stop) == (block.start, block.stop):
            strategy = "ANODE" if nesting_depth(regions[0].body) == 0 else "ANODE+revolve"
        else:
            strategy = "checkpointed + tapes" if taped else "checkpointed"
        counts = sim.forward_counts[block.start:block.stop]
        peaks = [event.peak_bytes for event in sim.timeline if block.start <= event.stage < block.stop]
        error = max((chain.stages[op.start].reconstruct.error_per_step * (op.stop - op.start) for op in rebuilt_ops),
                    default=0.0)
        summaries.append(BlockSummary(block.name, block.nt, block.method, strategy, kept, sum(counts) - block.nt,
                                      max(peaks, default=0), taped_steps=taped, region=region,
                                      reconstructed_steps=rebuilt, segments=len(rebuilt_ops), rebuild_error=error))
    return summaries


def _steps(steps: Sequence[int]) -> str:
    """``0-3,5``: step numbers as ranges."""
    if not steps:
        return "-"
    parts, first, last = [], steps[0], steps[0]
    for step in (*steps[1:], None):
        if step is not None and step == last + 1:
            last = step
            continue
        parts.append(str(first) if first == last else f"{first}-{last}")
        if step is not None:
            first = last = step
    return ",".join(parts)


def find_landmarks(chain: Chain, planner=None) -> BudgetLandmarks:
    """The budgets store-all and ANODE need, and the smallest ``planner`` (default :class:`planners.Auto`) accepts.

    Budgets, not peaks: each holds its schedule's predicted peak in the part of the budget
    a plan uses (:func:`anode_plan.budget_for_peak`).
    """
    huge = 1 << 62
    store_all = simulate_plan(chain, StoreAll().plan(chain, budget_bytes=huge)).peak_bytes
    anode = simulate_plan(chain, Anode().plan(chain, budget_bytes=huge)).peak_bytes
    try:
        schedule = (planner or Auto()).plan(chain, budget_bytes=0)
        minimum = simulate_plan(chain, schedule).peak_bytes
    except InfeasibleBudgetError as error:
        minimum = error.min_budget_bytes
    return BudgetLandmarks(budget_for_peak(store_all), budget_for_peak(anode), budget_for_peak(minimum))




@dataclass(frozen=True)
class TradeoffPoint:
    """One budget of a sweep and what the planner's schedule for it is predicted to cost.

    ``peak_bytes``, ``compute_cost`` and ``recompute_overhead`` are ``None`` when nothing
    fits (``min_budget_bytes`` then says what would). ``compute_cost`` is the predicted
    training step (stages, regions, loss; the adaptive blocks at their checkpoints) in ms,
    measured on the device when ``cost_source`` is ``"measured"``. ``measured_peak_bytes``
    and ``measured_time_ms`` are filled in by callers that run a real step.
    """

    budget_bytes: int
    peak_bytes: int | None
    compute_cost: float | None
    recompute_overhead: float | None
    schedule: str
    min_budget_bytes: int | None = None
    measured_peak_bytes: int | None = None
    measured_time_ms: float | None = None
    cost_source: str = "nominal"

    @property
    def feasible(self) -> bool:
        return self.peak_bytes is not None


def default_budgets(landmarks: BudgetLandmarks, count: int = 5) -> list[int]:
    """A sweep that shows the trade-off: the three landmarks and points between, largest first."""
    low, middle, high = landmarks.minimum_bytes, landmarks.anode_bytes, landmarks.store_all_bytes
    points = {low, middle, high}
    for k in range(1, count):
        points.add(low + (high - low) * k // count)
    return sorted(points, reverse=True)


def tradeoff_curve(chain: Chain, budgets: Sequence[int], planner=None) -> tuple[TradeoffPoint, ...]:
    """Plan ``chain`` for every budget (bytes) with ``planner`` (default :class:`planners.Auto`) and simulate the result.

    Each budget is planned as :func:`anode_plan.compile` plans it (its usable part,
    :func:`anode_plan.budget.usable_bytes`, by :func:`anode_plan.plans.plan.plan_schedule`).
    """
    planner = planner if planner is not None else Auto()
    points = []
    for budget in budgets:
        try:
            schedule = plan_schedule(chain, usable_bytes(budget), planner)
        except InfeasibleBudgetError as error:
            points.append(TradeoffPoint(budget, None, None, None, "infeasible",
                                        min_budget_bytes=budget_for_peak(error.min_budget_bytes)))
            continue
        sim = simulate_plan(chain, schedule)
        step = sim.step_cost - adaptive_saving(chain, adaptive_checkpoints(chain, sim, usable_bytes(budget)))
        points.append(TradeoffPoint(budget, sim.peak_bytes, step, sim.recompute_overhead,
                                    f"{schedule.planner}: {schedule.description}", cost_source=chain.cost_source))
    return tuple(points)


def format_landmarks(landmarks: BudgetLandmarks, indent: str = "  ") -> str:
    """The three landmark budgets, each in MiB and exact bytes, with what it means."""
    rows = [("store-all", landmarks.store_all_bytes, "every tape kept, no recompute"),
            ("ANODE", landmarks.anode_bytes, "each ODE block keeps its input and is recomputed once"),
            ("minimum", landmarks.minimum_bytes, "the smallest budget any schedule of the planner fits")]
    lines = [f"{indent}landmarks"]
    for name, nbytes, meaning in rows:
        lines.append(f"{indent}  {name:<10}{format_bytes(nbytes):>12}  ({_count(nbytes, 'byte')})  {meaning}")
    return "\n".join(lines)


def format_breakdown(simulation: Simulation, indent: str = "  ") -> str:
    """What is live at the predicted peak, by kind: fixed, states, tapes, gradients, transients, workspace."""
    found = simulation.breakdown()
    lines = [f"{indent}memory at the predicted peak"]
    for kind, label, meaning in _KINDS:
        lines.append(f"{indent}  {label:<11}{format_bytes(found.get(kind, 0)):>12}  {meaning}")
    total = simulation.peak_bytes
    lines.append(f"{indent}  {'total':<11}{format_bytes(total):>12}  ({_count(total, 'byte')})")
    return "\n".join(lines)


def format_tradeoff(points: Sequence[TradeoffPoint], cost_unit: str = "ms") -> str:
    """The budget/compute trade-off as a table, largest budget first as given; measured columns when present."""
    measured = any(p.measured_peak_bytes is not None for p in points)
    nominal = any(p.cost_source == "nominal" for p in points)
    header = ["budget", "predicted peak", f"predicted step ({'nominal ' if nominal else ''}{cost_unit})", "overhead"]
    if measured:
        header += ["measured peak", "step time"]
    header.append("schedule")
    rows = []
    for p in points:
        if not p.feasible:
            need = f" (needs {format_bytes(p.min_budget_bytes)})" if p.min_budget_bytes is not None else ""
            rows.append([format_bytes(p.budget_bytes), "infeasible", "-", "-"] + (["-", "-"] if measured else [])
                        + [f"no schedule fits{need}"])
            continue
        row = [format_bytes(p.budget_bytes), format_bytes(p.peak_bytes), f"{p.compute_cost:.1f}",
               _percent(p.recompute_overhead)]
        if measured:
            row += ["-" if p.measured_peak_bytes is None else format_bytes(p.measured_peak_bytes),
                    "-" if p.measured_time_ms is None else f"{p.measured_time_ms:.1f} ms"]
        rows.append(row + [p.schedule])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["trade-off: budget -> predicted step time"]
    for row in [header, *rows]:
        cells = [cell.rjust(width) for cell, width in zip(row[:-1], widths)] + [row[-1]]
        lines.append("  " + "  ".join(cells).rstrip())
    return "\n".join(lines)


def _source(plan: Any) -> str:
    if plan.cost_source == "nominal":
        return "nominal: FLOP counts at fixed rates, calibrate=False"
    return "measured on the device"


def format_report(plan, landmarks: BudgetLandmarks | None = None) -> str:
    """A text report of ``plan``: schedule, predicted cost, memory at the peak, landmarks, and per block."""
    sim, chain = plan.simulation, plan.chain
    used = sim.peak_bytes / plan.budget_bytes
    lines = [
        f"anode-plan: {chain.name}, budget {format_bytes(plan.budget_bytes)} ({_count(plan.budget_bytes, 'byte')})",
        f"  schedule     {plan.schedule.planner}: {plan.schedule.description}"
        + ("  [proven optimal]" if plan.schedule.proven_optimal else ""),
        f"  predicted    peak {format_bytes(sim.peak_bytes)} ({used:.0%} of budget), step "
        f"{plan.predicted_step_seconds * 1e3:.1f} {chain.cost_unit} ({_source(plan)}), {plan.predicted_slowdown:.2f}x "
        f"plain autograd's {plan.plain_step_seconds * 1e3:.1f} {chain.cost_unit}",
        f"  recompute    {_count(sim.recomputed_forwards, 'extra stage forward')}, overhead "
        f"{_percent(sim.recompute_overhead)} over a step without recompute ({sim.baseline_cost:.1f} {chain.cost_unit})",
    ]
    unit = getattr(plan, "unit", None)
    if unit is not None:
        lines[-2:] = [
            f"  predicted    peak {format_bytes(plan.predicted_peak_bytes)} "
            f"({plan.predicted_peak_bytes / plan.budget_bytes:.0%} of budget), step "
            f"{unit.step_ms:.1f} ms, both measured on the device",
            f"  unit         the whole model as one Inductor graph, the partitioner at activation_memory_budget="
            f"{unit.fraction:g} (what it keeps for backward; it recomputes the rest inside the graph); units tried: "
            + ", ".join(f"{f:g} -> {format_bytes(b)}" for f, b in unit.tried)
            + (f"; the per-stage plan was predicted at {unit.staged_step_ms:.1f} ms" if unit.staged_step_ms else ""),
            f"  backend      inductor: one unit compiled by torch.compile (compile {plan.compile_seconds:.1f} s for "
            "this plan" + (", compiled already)" if plan.compile_seconds == 0 else ")")]
    elif getattr(plan, "segments", ()):
        lines.append(f"  backend      inductor: the model's {_count(plan.segments[-1][1], 'stage')} as "
                     f"{_count(len(plan.segments), 'compiled unit')} (runs of stages fused into one graph each, the "
                     f"partitioner at activation_memory_budget={plan.segment_fraction:g}), each measured on the "
                     f"device (compile {plan.compile_seconds:.1f} s for this plan"
                     + (", compiled already)" if plan.compile_seconds == 0 else ")"))
        lines += [f"    unit {name}" for name in (stage.name for stage in chain.stages) if " .. " in name]
    elif _backend(plan) == "inductor":
        compiled = len(chain.stages) - len(plan.eager_stages)
        lines.append(f"  backend      inductor: {compiled} of {_count(len(chain.stages), 'stage')} compiled by "
                     f"torch.compile, each measured on the device (compile {plan.compile_seconds:.1f} s for this plan"
                     + (", the stages were compiled already)" if plan.compile_seconds == 0 else ")"))
        lines += [f"    eager: {name} ({why})" for name, why in plan.eager_stages]
    else:
        lines.append("  backend      eager")
    if plan.schedule.sketched:
        lines.append("  INEXACT      weight gradients estimated by XConv sketches (approximate=XConv); input, bias "
                     "and other gradients exact:")
        lines += [f"    {layer.layer}: {_count(layer.probes, 'probe')}, in {_count(layer.stages, 'stage')}, relative "
                  f"weight-gradient error {layer.relative_error:.2f} on the example batch" for layer in plan.approximated]
    for name, checkpoints in getattr(plan, "adaptive_checkpoints", ()):
        method = next(b.method for b in chain.blocks if b.name == name)
        lines.append(f"  adaptive     {name} ({method}): solved with {_count(checkpoints, 'checkpoint')} of (y, f), "
                     "placed online whatever its step count")
    if chain.unsketchable_layers:
        lines.append(f"  exact convs  XConv cannot sketch (groups, dilation, not 2-d): {', '.join(chain.unsketchable_layers)}")
    if unit is not None:  # one graph, measured as a whole: no simulated breakdown or per-block schedule to show
        return "\n".join(lines + ["", "  memory at the peak: measured as one training step of the compiled graph "
                                   "(the allocator's peak); what is live inside it is Inductor's"])
    lines += [
        "",
        format_breakdown(sim),
    ]
    if landmarks is not None:
        lines += ["", format_landmarks(landmarks)]
    summaries = summarize_blocks(plan)
    lines.append("")
    if summaries:
        header = ("block", "nt", "method", "strategy", "taped steps", "kept states (steps)", "recomputed steps",
                  "peak")
        rows = [(s.name, str(s.nt), s.method, s.strategy + (f" from {s.region[0]} to {s.region[1]}" if s.region else ""),
                 _steps(s.taped_steps), _steps(s.snapshot_steps), str(s.recomputed_steps), format_bytes(s.peak_bytes))
                for s in summaries]
        if any(s.reconstructed_steps for s in summaries):
            header = (*header, "rebuilt steps (segments, round-off)")
            rows = [(*row, f"{_steps(s.reconstructed_steps)} ({s.segments}, {s.rebuild_error:.1e})"
                     if s.reconstructed_steps else "-") for row, s in zip(rows, summaries)]
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        for row in [header, *rows]:
            lines.append("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    elif getattr(plan, "segments", ()):
        lines.append("  (ODE blocks run inside the compiled units: the planner keeps or recomputes each unit whole)")
    else:
        lines.append("  (no ODE blocks: the model is planned as a plain chain of layers)")
    return "\n".join(lines)


def _backend(plan) -> str:
    return getattr(plan, "backend", "eager")


def _count(number: int, noun: str) -> str:
    """``1 stage``, ``0 stages``, ``3 extra stage forwards``: the number and the noun, plural unless it is one."""
    return f"{number} {noun if number == 1 else noun + 's'}"


def _percent(fraction: float) -> str:
    """``+25.9%`` (overheads are exactly 0.0 without recompute, never negative)."""
    return f"{fraction:+.1%}"
