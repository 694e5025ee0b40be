"""Describe a plan for people: per-block strategy, snapshots, recompute, peaks and landmarks.

``summarize_blocks`` and ``find_landmarks`` return plain data (frozen dataclasses);
``format_report`` renders them as text. ``tools/plan_report.py`` and the demo print it.
"""

from __future__ import annotations

from dataclasses import dataclass

from planners import (Anode, Chain, InfeasibleBudgetError, Landmarks, Region, Run, StoreAll, format_bytes,
                      simulate_plan)
from planners.schedule import Op, nesting_depth


@dataclass(frozen=True)
class BlockSummary:
    """What the plan does with one ODE block.

    Attributes:
        name: the block's module name.
        nt: its time steps; ``method`` its solver.
        strategy: ``"store tapes"``, ``"ANODE"``, ``"ANODE+revolve"`` or ``"checkpointed"``.
        snapshot_steps: the steps whose input state is kept through the forward pass.
        recomputed_steps: forward step evaluations beyond the first, over the whole step.
        peak_bytes: the predicted peak while this block's stages run or are differentiated.
    """

    name: str
    nt: int
    method: str
    strategy: str
    snapshot_steps: tuple[int, ...]
    recomputed_steps: int
    peak_bytes: int


@dataclass(frozen=True)
class BudgetLandmarks:
    """The budgets where the schedule changes character, for one chain.

    ``store_all_bytes``: every tape kept (no recompute). ``anode_bytes``: ANODE.
    ``minimum_bytes``: the smallest budget any schedule of ``planner`` fits in.
    """

    store_all_bytes: int
    anode_bytes: int
    minimum_bytes: int


def _top_level_ops(ops: tuple[Op, ...], start: int, stop: int) -> list[Op]:
    return [op for op in ops if (op.stage if isinstance(op, Run) else op.start) in range(start, stop)]


def summarize_blocks(plan) -> list[BlockSummary]:
    """One :class:`BlockSummary` per ODE block of ``plan`` (an :class:`anode_plan.Plan`)."""
    chain, sim = plan.chain, plan.simulation
    summaries = []
    for block in chain.blocks:
        ops = _top_level_ops(plan.schedule.ops, block.start, block.stop)
        if all(isinstance(op, Run) for op in ops):
            strategy, kept = "store tapes", ()
        elif len(ops) == 1 and isinstance(ops[0], Region) and (ops[0].start, ops[0].stop) == (block.start, block.stop):
            strategy = "ANODE" if nesting_depth(ops[0].body) == 0 else "ANODE+revolve"
            kept = (0,)
        else:
            strategy = "checkpointed"
            kept = tuple(op.start - block.start for op in ops if isinstance(op, Region))
        counts = sim.forward_counts[block.start:block.stop]
        peaks = [event.peak_bytes for event in sim.timeline if block.start <= event.stage < block.stop]
        summaries.append(BlockSummary(block.name, block.nt, block.method, strategy, kept,
                                      sum(counts) - block.nt, max(peaks, default=0)))
    return summaries


def find_landmarks(chain: Chain, planner=None) -> BudgetLandmarks:
    """Store-all and ANODE peaks, and the smallest budget ``planner`` (default Landmarks) accepts."""
    huge = 1 << 62
    store_all = simulate_plan(chain, StoreAll().plan(chain, budget_bytes=huge)).peak_bytes
    anode = simulate_plan(chain, Anode().plan(chain, budget_bytes=huge)).peak_bytes
    try:
        schedule = (planner or Landmarks()).plan(chain, budget_bytes=0)
        minimum = simulate_plan(chain, schedule).peak_bytes
    except InfeasibleBudgetError as error:
        minimum = error.min_budget_bytes
    return BudgetLandmarks(store_all, anode, minimum)


def format_report(plan, landmarks: BudgetLandmarks | None = None) -> str:
    """A text report of ``plan``: summary, peak breakdown, landmarks and a per-block table."""
    sim, chain = plan.simulation, plan.chain
    used = sim.peak_bytes / plan.budget_bytes
    lines = [
        f"anode-plan: {chain.name}, budget {format_bytes(plan.budget_bytes)} ({plan.budget_bytes} bytes)",
        f"  schedule     {plan.schedule.planner}: {plan.schedule.description}"
        + ("  [proven optimal]" if plan.schedule.proven_optimal else ""),
        f"  predicted    peak {format_bytes(sim.peak_bytes)} ({used:.0%} of budget), recompute overhead "
        f"{sim.recompute_overhead:+.1%} ({sim.recomputed_forwards} extra stage forwards)",
        "  at the peak  " + ", ".join(f"{kind} {format_bytes(nbytes)}" for kind, nbytes in sim.peak_breakdown),
    ]
    if landmarks is not None:
        lines.append(f"  landmarks    store-all {format_bytes(landmarks.store_all_bytes)} | ANODE "
                     f"{format_bytes(landmarks.anode_bytes)} | minimum {format_bytes(landmarks.minimum_bytes)}")
    summaries = summarize_blocks(plan)
    if summaries:
        header = ("block", "nt", "method", "strategy", "kept states (steps)", "recomputed steps", "peak")
        rows = [(s.name, str(s.nt), s.method, s.strategy, ",".join(map(str, s.snapshot_steps)) or "-",
                 str(s.recomputed_steps), format_bytes(s.peak_bytes)) for s in summaries]
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        lines.append("")
        for row in [header, *rows]:
            lines.append("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    else:
        lines.append("  (no ODE blocks: the model is planned as a plain chain of layers)")
    return "\n".join(lines)
