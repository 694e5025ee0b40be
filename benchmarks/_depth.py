"""Planning time against depth: ``anode_plan.compile`` on ODE-MLPs of 10 to 1,000 blocks.

The part of ``benchmarks/planner_sweep.py`` run by ``--depth``. For each depth ``L`` and
step count ``Nt`` it times, in one process, tracing, measuring (fake tensors and
calibration, with blocks built alike sharing one measurement) and planning at store-all
and at 20% of it, on ``mlp_ode(features=64, hidden=64, blocks=L, nt=Nt, method="rk4")``
with a batch of 32. Beside each plan's predicted recompute overhead it gives the chain
DP's where the DP runs in reasonable time (at most :data:`DP_REFERENCE_UNITS` units): the
gap of the fast path (``planners.Nested``, which ``Auto`` uses above 40 units) to it.
The growth exponent of the total time in ``L`` is the least-squares slope of
log(time) against log(L) over the depths, per ``Nt`` and budget.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

import anode_plan
import planners
from _common import log
from models import mlp_ode
from planners.rotor import dp_cuts

DP_REFERENCE_UNITS = 60
FLAT_REFERENCE_STAGES = 50


@dataclass(frozen=True)
class DepthRow:
    depth: int
    nt: int
    fraction: float
    stages: int
    lower_s: float
    plan_s: float
    planner: str
    overhead: float
    dp_overhead: float | None
    flat_overhead: float | None

    @property
    def total_s(self) -> float:
        return self.lower_s + self.plan_s


def depth_sweep(depths: list[int], nts: list[int], fractions: list[float], *, batch: int = 32,
                width: int = 64) -> list[DepthRow]:
    warm = mlp_ode(features=width, hidden=width, blocks=2, nt=2, method="rk4")
    anode_plan.compile(warm, 1 << 40, (torch.randn(batch, width),))  # the imports and caches, untimed
    rows = []
    for nt in nts:
        for depth in depths:
            model = mlp_ode(features=width, hidden=width, blocks=depth, nt=nt, method="rk4")
            x = torch.randn(batch, width)
            began = time.perf_counter()
            traced = anode_plan.trace_model(model, (x,))
            chain = anode_plan.lower_to_chain(model, traced, (x,))
            lower_s = time.perf_counter() - began
            store_all = anode_plan.budget_for_peak(
                planners.simulate_plan(chain, planners.StoreAll().plan(chain, budget_bytes=1 << 62)).peak_bytes)
            _, cuts = dp_cuts(chain)
            for fraction in fractions:
                budget = int(store_all * fraction)
                began = time.perf_counter()
                plan = anode_plan.plan_for_budget(chain, traced, (x,), budget)
                plan_s = time.perf_counter() - began
                dp_overhead = plan.recompute_overhead if plan.schedule.planner == "chain-dp" else None
                if dp_overhead is None and len(cuts) - 1 <= DP_REFERENCE_UNITS:
                    dp_overhead = anode_plan.plan_for_budget(chain, traced, (x,), budget,
                                                             planners.ChainDP()).recompute_overhead
                flat_overhead = None
                if len(chain.stages) <= FLAT_REFERENCE_STAGES:
                    flat_overhead = anode_plan.plan_for_budget(chain, traced, (x,), budget,
                                                               planners.ChainDP(two_level=False)).recompute_overhead
                rows.append(DepthRow(depth, nt, fraction, len(chain.stages), lower_s, plan_s,
                                     plan.schedule.planner, plan.recompute_overhead, dp_overhead, flat_overhead))
                log(f"  L={depth} Nt={nt} at {fraction:.0%} of store-all: {lower_s + plan_s:.2f} s "
                    f"({plan.schedule.planner}, overhead {plan.recompute_overhead:.3f})")
    return rows


def growth_exponent(rows: list[DepthRow]) -> float:
    """The slope of log(total time) against log(depth)."""
    xs = [math.log(r.depth) for r in rows]
    ys = [math.log(r.total_s) for r in rows]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def format_depth_section(rows: list[DepthRow], title: str, header_lines: list[str]) -> str:
    lines = [title, "", *header_lines, "",
             "| blocks L | Nt | stages | budget | trace + measure (s) | plan (s) | total (s) | planner | "
             "recompute overhead | chain DP's overhead | flat DP's overhead (the optimum) | gap to the best DP |",
             "|---:|---:|---:|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        budget = "store-all" if r.fraction >= 1 else f"{r.fraction:.0%} of store-all"
        dp = "—" if r.dp_overhead is None else f"{r.dp_overhead:.3f}"
        flat = "—" if r.flat_overhead is None else f"{r.flat_overhead:.3f}"
        gap = "—" if _best(r) is None else f"{(1 + r.overhead) / (1 + _best(r)) - 1:+.2%}"
        lines.append(f"| {r.depth} | {r.nt} | {r.stages} | {budget} | {r.lower_s:.2f} | {r.plan_s:.2f} | "
                     f"{r.total_s:.2f} | {r.planner} | {r.overhead:.3f} | {dp} | {flat} | {gap} |")
    lines += ["", "Growth of the total time in L (least-squares slope of log time on log L):"]
    for nt in sorted({r.nt for r in rows}):
        for fraction in sorted({r.fraction for r in rows}, reverse=True):
            subset = [r for r in rows if r.nt == nt and r.fraction == fraction]
            if len(subset) >= 2:
                budget = "store-all" if fraction >= 1 else f"{fraction:.0%}"
                lines.append(f"- Nt {nt}, {budget}: exponent {growth_exponent(subset):.2f}")
    gaps = [(1 + r.overhead) / (1 + _best(r)) - 1 for r in rows if _best(r) is not None]
    if gaps:
        lines.append(f"- Worst gap of a plan's predicted step cost to the best DP's (flat where it ran, else "
                     f"two-level), where one ran: {max(gaps):+.2%}")
    return "\n".join(lines) + "\n"


def _best(row: DepthRow) -> float | None:
    """The reference overhead: the flat DP's (the optimum) where it ran, else the chain DP's."""
    return row.flat_overhead if row.flat_overhead is not None else row.dp_overhead
