"""Draw plans: the memory/compute trade-off curve, and the memory timeline of one training step.

Every function returns a ``matplotlib.figure.Figure`` (made without ``pyplot``, so no
global state or GUI backend is touched); save it with ``figure.savefig("out.png")``.
matplotlib is an optional extra: ``pip install "anode-plan[plot]"``. Without it, the
functions raise :class:`~anode_plan.errors.PlotUnavailableError`; the rest of
anode-plan never imports it.

* :func:`plot_tradeoff` — predicted step cost against the memory budget, from
  :func:`anode_plan.tradeoff_curve`, with the landmarks (minimum, ANODE, store-all)
  drawn as vertical lines and the infeasible budgets shaded.
* :func:`plot_timeline` — live memory over one simulated training step of a plan
  (``plan.simulation.timeline``), the x axis in the cost model's time, each operation
  coloured by phase (forward, loss, recompute, backward), with the budget and the
  predicted peak as lines told apart in the legend.
* :func:`plot_batch_curve` — recompute overhead and peak against the batch size, from
  :func:`anode_plan.batch_curve`, the batches that do not fit shaded by why.
"""

from __future__ import annotations

import textwrap
from typing import Any, Sequence

from anode_plan.analysis.report import BudgetLandmarks, TradeoffPoint
from anode_plan.errors import PlotUnavailableError
from planners import format_bytes

PHASE_COLORS = {"forward": "#4C72B0", "loss": "#8172B3", "recompute": "#DD8452", "reconstruct": "#C44E52",
                "backward": "#55A868"}
# The budget and the predicted peak, in every plot: told apart by colour and line style as well as by the legend.
BUDGET_COLOR, PEAK_COLOR = "#C44E52", "#333333"
# Batches left out of the largest batch, by why (BatchPoint.excluded_by): shade and legend label.
EXCLUDED_SHADES = {"budget": ("#DDDDDD", "excluded: over the budget (no schedule fits)"),
                   "max_overhead": ("#F2E2C4", "excluded: fits, but recomputes over the cap")}
_MIB = 2**20


def _new_figure(width: float, height: float) -> Any:
    try:
        from matplotlib.figure import Figure  # optional: the [plot] extra
    except ImportError as error:
        raise PlotUnavailableError(
            f"drawing a plan needs matplotlib, which is not installed ({error}); install the optional extra with "
            "pip install \"anode-plan[plot]\" (or pip install matplotlib), or leave out --plot") from error
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def plot_tradeoff(points: Sequence[TradeoffPoint], landmarks: BudgetLandmarks, *,
                  chosen: TradeoffPoint | None = None, title: str = "") -> Any:
    """The trade-off curve: the predicted step time (ms) against the budget.

    ``points`` come from :func:`anode_plan.tradeoff_curve`; a dense sweep from the minimum
    to past store-all gives the clearest curve. ``chosen`` (a plan's point) is marked with a star.
    """
    figure = _new_figure(8.0, 4.5)
    ax = figure.subplots()
    feasible = sorted((p for p in points if p.feasible), key=lambda p: p.budget_bytes)
    xs = [p.budget_bytes / _MIB for p in feasible]
    ys = [p.compute_cost for p in feasible]
    nominal = any(p.cost_source == "nominal" for p in feasible)
    right = max([landmarks.store_all_bytes * 1.18 / _MIB] + [p.budget_bytes / _MIB for p in points])
    if feasible:
        ax.step(xs + [right], ys + [ys[-1]], where="post", color="#4C72B0", linewidth=2,
                label="predicted step time of the planner's schedule")
        ax.plot(xs, ys, "o", color="#4C72B0", markersize=3.5)
    ax.axvspan(0, landmarks.minimum_bytes / _MIB, color="#DDDDDD", zorder=0, label="infeasible: no schedule fits")
    marks = [("minimum", landmarks.minimum_bytes, "#C44E52"), ("ANODE", landmarks.anode_bytes, "#8172B3"),
             ("store-all", landmarks.store_all_bytes, "#55A868")]
    label_at = ax.get_xaxis_transform()  # x in data, y in axes fractions: labels sit in the headroom on top
    for name, nbytes, color in marks:
        ax.axvline(nbytes / _MIB, color=color, linestyle="--", linewidth=1.3)
        ax.text(nbytes / _MIB, 0.97, f" {name}\n {format_bytes(nbytes)}", transform=label_at, color=color,
                fontsize=9, va="top", ha="left")
    if chosen is not None and chosen.feasible:
        ax.plot([chosen.budget_bytes / _MIB], [chosen.compute_cost], "*", color="#DD8452",
                markersize=15, markeredgecolor="black", zorder=5,
                label=f"the plan: budget {format_bytes(chosen.budget_bytes)}, {chosen.recompute_overhead:+.0%}")
    low, high = min(ys, default=1.0), max(ys, default=1.0)
    span = max(high - low, 0.1 * high)
    ax.set_xlim(0, right)
    ax.set_ylim(low - 0.08 * span, high + 0.3 * span)
    ax.set_xlabel("memory budget (MiB)")
    ax.set_ylabel("predicted training step (ms)\n" + ("nominal: FLOP counts" if nominal else "measured on the device"))
    ax.set_title(title or "memory / compute trade-off")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=3, fontsize=8.5, frameon=False)
    return figure


def plot_timeline(plan: Any, *, title: str = "") -> Any:
    """Memory over one simulated training step of ``plan`` (an :class:`anode_plan.Plan`).

    Each operation is a bar as wide as its predicted cost and as tall as its peak, coloured
    by phase; the black steps are what stays live after each operation. The budget and the
    predicted peak are horizontal lines.
    """
    chain, sim = plan.chain, plan.simulation
    if getattr(plan, "unit", None) is not None:
        raise ValueError("this plan runs one compiled unit of the whole model (plan.unit), measured as one step on "
                         "the device; it has no simulated timeline to plot. plot_timeline a per-stage plan (compile "
                         "with backend='eager', or a named planner)")
    if not sim.timeline:
        raise ValueError("plan.simulation has no timeline; simulate with simulate_plan(..., timeline=True)")
    loss_cost = 0.01 * sim.baseline_cost or 1.0
    edges, heights, lives, colors = [0.0], [], [], []
    for event in sim.timeline:
        if event.phase == "loss":
            cost = loss_cost
        elif event.phase == "backward":
            cost = chain.stages[event.stage].bwd_cost
        elif event.phase == "reconstruct":
            stage = chain.stages[event.stage]
            cost = stage.reconstruct.inverse_cost + stage.fwd_cost + stage.bwd_cost
        else:
            cost = chain.stages[event.stage].fwd_cost
        edges.append(edges[-1] + max(cost, 1e-9))
        heights.append(event.peak_bytes / _MIB)
        lives.append(event.live_bytes / _MIB)
        colors.append(PHASE_COLORS[event.phase])
    figure = _new_figure(8.0, 4.2)
    ax = figure.subplots()
    widths = [b - a for a, b in zip(edges, edges[1:])]
    ax.bar(edges[:-1], heights, width=widths, align="edge", color=colors, linewidth=0)
    ax.stairs(lives, edges, color="black", linewidth=1.0, label="live after each operation")
    budget = plan.budget_bytes / _MIB
    ax.axhline(budget, color=BUDGET_COLOR, linestyle="--", linewidth=1.5,
               label=f"budget {format_bytes(plan.budget_bytes)}")
    ax.axhline(sim.peak_bytes / _MIB, color=PEAK_COLOR, linestyle=":", linewidth=1.5,
               label=f"predicted peak {format_bytes(sim.peak_bytes)}")
    for phase, color in PHASE_COLORS.items():
        if any(event.phase == phase for event in sim.timeline):
            ax.bar([0], [0], color=color, label=phase)
    ax.set_xlim(0, edges[-1])
    ax.set_ylim(0, max(budget, sim.peak_bytes / _MIB) * 1.3)
    ax.set_xlabel(f"time in the training step (predicted, {chain.cost_unit}, "
                  + ("nominal: FLOP counts)" if chain.cost_source == "nominal" else "measured on the device)"))
    ax.set_ylabel("memory (MiB)")
    default = f"{chain.name}: one training step under the {plan.schedule.planner} schedule"
    ax.set_title(textwrap.fill(title or default, 90), fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="upper left", fontsize=8.5, ncols=3, framealpha=0.95)
    return figure


def plot_batch_curve(points: Sequence[Any], *, batch: int, budget_bytes: int, max_overhead: float | None = None,
                     title: str = "") -> Any:
    """Predicted recompute overhead and peak against the batch size, under one budget.

    ``points`` are :class:`anode_plan.BatchPoint` (from :func:`anode_plan.batch_curve`);
    ``batch`` is the largest batch that fits (:func:`anode_plan.max_batch_size`), marked
    with a line. Batches that do not fit are shaded by why (``BatchPoint.excluded_by``):
    grey over the budget, sand where a plan fits but recomputes more than ``max_overhead``
    (the search's cap, drawn as a line when given). The legend names the budget, the peak,
    the cap and each shade.
    """
    figure = _new_figure(8.0, 5.0)
    ax = figure.subplots()
    ordered = sorted(points, key=lambda p: p.batch)
    feasible = [p for p in ordered if p.overhead is not None]
    ax.plot([p.batch for p in feasible], [100.0 * p.overhead for p in feasible], "o-", color="#DD8452",
            markersize=3.5, linewidth=2, label="predicted recompute overhead")
    if max_overhead is not None:
        ax.axhline(100.0 * max_overhead, color="#DD8452", linestyle="--", linewidth=1.0,
                   label=f"recompute cap: {max_overhead:.0%}")
    ax.set_xlabel("batch size")
    ax.set_ylabel("recompute overhead (% of a step without recompute)")
    labelled = set()
    for index, point in enumerate(ordered):
        if point.fits:
            continue
        # Each excluded batch shades the half-way marks to its neighbours on the curve.
        left = (ordered[index - 1].batch + point.batch) / 2 if index else point.batch - 0.5
        right = (point.batch + ordered[index + 1].batch) / 2 if index + 1 < len(ordered) else point.batch + 0.5
        color, label = EXCLUDED_SHADES[point.excluded_by]
        ax.axvspan(left, right, color=color, zorder=0, linewidth=0,
                   label=None if point.excluded_by in labelled else label)
        labelled.add(point.excluded_by)
    ax.axvline(batch, color="#55A868", linestyle="-", linewidth=1.5, label=f"largest batch: {batch}")
    twin = ax.twinx()
    twin.plot([p.batch for p in feasible], [p.peak_bytes / _MIB for p in feasible], ":", color=PEAK_COLOR,
              label="predicted peak")
    twin.axhline(budget_bytes / _MIB, color=BUDGET_COLOR, linestyle="--", linewidth=1.0,
                 label=f"budget {format_bytes(budget_bytes)}")
    twin.set_ylabel("predicted peak (MiB)")
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    # Below the axes, as the trade-off plot's: over them it would hide the curves at the budget.
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncols=3, fontsize=8, frameon=False)
    ax.set_title(title or f"the largest batch under {format_bytes(budget_bytes)}")
    return figure
