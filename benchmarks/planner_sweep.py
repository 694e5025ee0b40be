"""Optimal planning: planning times, and landmark schedules against the DP on a heterogeneous ODE-ResNet.

Two parts, both written to ``benchmarks/RESULTS.md`` with ``--write``:

1. **Planning time** of the default planner on the three sizes the design asks for: an
   ODE-ResNet with 4 blocks of 100 steps (target < 1 s), one block of 10,000 steps
   (< 10 s), and CP-SAT on a 100-stage U-Net-shaped chain whose skip values nest
   (< 30 s). Each is planned at several budgets; the slowest is reported.
2. **Three curves** on one ODE-ResNet whose stages differ in resolution and width:
   at each budget from the minimum to store-all, the predicted step cost of
   (a) the landmark schedules only (``planners.Landmarks``, what the foundation had),
   (b) the two-level DP (``ChainDP(two_level=True)``), (c) CP-SAT (``CPSat()``, which
   must agree with the DP on a chain), and (d) the flat DP, the exact optimum under the
   model. The budgets run from the minimum to store-all, each end as
   ``anode_plan.budget_for_peak`` of its predicted peak (plans keep 0.01% of the budget
   free). For (a) and (d) it also measures the real peak of a training step with
   ``anode_plan.measure_peak_memory`` (the allocator's peak: on the CPU the profiler's
   allocation events, kernel workspaces included) beside the predicted one, and the step
   time relative to plain autograd (median of paired, interleaved runs).

3. With ``--depth``, instead: **planning time against depth** (``benchmarks/_depth.py``):
   ``compile``'s trace, measure and plan on ODE-MLPs of 10 to 1,000 blocks, at store-all and
   20% of it, with each plan's recompute overhead beside the DPs' where they run, and the
   growth exponent of the time in the depth (targets: 50 blocks × Nt 10 under 3 s, 200 ×
   4 under 10 s, 1,000 × 4 under 60 s).

    PYTHONPATH=. python benchmarks/planner_sweep.py [--quick] [--write]
    PYTHONPATH=. python benchmarks/planner_sweep.py --depth [--quick] [--write]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import anode_plan  # noqa: E402
import planners  # noqa: E402
from _common import (RESULTS_PATH, TRAIN_STEP_FORM, load_average, machine_info, mib, train_step,  # noqa: E402
                     write_section)
from _depth import depth_sweep, format_depth_section  # noqa: E402
from models import ode_resnet  # noqa: E402

SECTION_TITLE = "## Optimal planning: planning time and the DP against the landmarks (CPU)"


def _odenet_chain(*, stages: int, nt: int, batch: int, size: int) -> planners.Chain:
    model = ode_resnet(width=16, stages=stages, nt=nt, method="rk2")
    x = torch.randn(batch, 3, size, size)
    return anode_plan.lower_to_chain(model, anode_plan.trace_model(model, (x,)), (x,))


def _unet_like_chain(stages: int) -> planners.Chain:
    """A synthetic U-Net: the first half makes skip values that the second half consumes, nested."""
    half = stages // 2
    state_values, value_bytes, next_id, skips = [(0,)], [0], 1, []
    for i in range(stages):
        current = next_id
        next_id += 1
        size = 2**20 >> min(i, stages - 1 - i) // 10
        value_bytes.append(size)
        if i < half and i % 5 == 4:
            skips.append(current - 1)  # the previous output stays live as a skip
        if i >= half and skips and (stages - i) % 5 == 0:
            skips.pop()
        state_values.append(tuple(skips) + (current,))
    stage_list = []
    for i in range(stages):
        in_bytes = sum(value_bytes[v] for v in state_values[i])
        out_bytes = sum(value_bytes[v] for v in state_values[i + 1])
        stage_list.append(planners.Stage(f"s{i}", in_bytes, out_bytes, 3 * value_bytes[state_values[i + 1][-1]],
                                         fwd_cost=1.0, bwd_cost=2.0))
    return planners.Chain(tuple(stage_list), state_values=tuple(state_values), value_bytes=tuple(value_bytes),
                          name=f"U-Net-shaped chain of {stages} stages")


def planning_times(quick: bool) -> list[tuple[str, int, float, str, str]]:
    cases = [("ODE-ResNet, 4 blocks x 100 steps", _odenet_chain(stages=4, nt=25 if quick else 100, batch=8, size=32),
              "< 1 s"),
             ("one block x 10,000 steps", _odenet_chain(stages=1, nt=1000 if quick else 10_000, batch=8, size=16),
              "< 10 s"),
             ("U-Net-shaped DAG, 100 stages (CP-SAT)", _unet_like_chain(40 if quick else 100), "< 30 s")]
    rows = []
    for label, chain, target in cases:
        store_all = planners.simulate_plan(chain, planners.StoreAll().plan(chain, budget_bytes=1 << 60)).peak_bytes
        slowest, planner_name = 0.0, ""
        for fraction in (0.9, 0.5, 0.25, 0.1):
            began = time.perf_counter()
            try:
                schedule = planners.Auto().plan(chain, budget_bytes=int(store_all * fraction))
                planner_name = schedule.planner
            except planners.InfeasibleBudgetError:
                pass
            slowest = max(slowest, time.perf_counter() - began)
        rows.append((label, len(chain.stages), slowest, planner_name, target))
        print(f"  {label}: {len(chain.stages)} stages, slowest plan {slowest:.2f} s ({planner_name})", flush=True)
    return rows


def _step_ratio(compiled, model, x, y, repeats: int) -> float:
    def step(runner):
        model.zero_grad(set_to_none=True)
        train_step(runner, x, y)
    step(compiled), step(model)
    ratios = []
    for _ in range(repeats):
        began = time.perf_counter()
        step(compiled)
        mine = time.perf_counter() - began
        began = time.perf_counter()
        step(model)
        ratios.append(mine / (time.perf_counter() - began))
    return statistics.median(ratios)


def three_curves(quick: bool) -> tuple[str, list[str]]:
    torch.manual_seed(0)
    model = ode_resnet(width=16, stages=3, nt=4 if quick else 6, method="rk2")
    x, y = torch.randn(16 if quick else 32, 3, 32, 32), torch.randint(0, 10, (16 if quick else 32,))
    traced = anode_plan.trace_model(model, (x,))
    chain = anode_plan.lower_to_chain(model, traced, (x,))
    flat, two_level, landmarks = planners.ChainDP(two_level=False), planners.ChainDP(two_level=True), planners.Landmarks()
    cpsat = planners.CPSat()
    store_all = planners.simulate_plan(chain, planners.StoreAll().plan(chain, budget_bytes=1 << 60)).peak_bytes
    try:
        flat.plan(chain, budget_bytes=1)
    except planners.InfeasibleBudgetError as error:
        minimum = error.min_budget_bytes
    low, high = anode_plan.budget_for_peak(minimum), anode_plan.budget_for_peak(store_all)
    budgets = [low + (high - low) * k // 7 for k in range(8)]
    rows = []
    for budget in budgets:
        cells = [mib(budget)]
        for planner in (landmarks, two_level, cpsat, flat):
            try:
                plan = anode_plan.plan_for_budget(chain, traced, (x,), budget, planner)
            except anode_plan.InfeasibleBudgetError:
                cells.append("infeasible")
                continue
            text = f"+{plan.recompute_overhead:.1%}"
            if planner not in (two_level, cpsat):
                compiled = anode_plan.CompiledModel(model, traced, plan)
                compiled(x)
                model.zero_grad(set_to_none=True)
                measured = anode_plan.measure_peak_memory(lambda: train_step(compiled, x, y))
                ratio = _step_ratio(compiled, model, x, y, 3 if quick else 5)
                held = "ok" if measured.peak_bytes <= budget else "**OVER**"
                text += (f" · {mib(plan.predicted_peak_bytes)} / {mib(measured.peak_bytes)} MiB {held} · "
                         f"{ratio:.2f}x")
            cells.append(text)
        rows.append("| " + " | ".join(cells) + " |")
        print("  " + rows[-1], flush=True)
    header = (f"`ode_resnet(width=16, stages=3, nt={4 if quick else 6}, method='rk2')`, batch {x.shape[0]}, "
              f"{len(chain.stages)} stages; predicted peaks: store-all {mib(store_all)} MiB, flat-DP minimum "
              f"{mib(minimum)} MiB.")
    return header, rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--write", action="store_true", help=f"update the section in {RESULTS_PATH}")
    parser.add_argument("--depth", action="store_true", help="the depth sweep (part 3) instead of parts 1 and 2")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    load_before = load_average()
    if args.depth:
        return _depth_main(args, load_before)
    print("planning time:", flush=True)
    times = planning_times(args.quick)
    print("three curves:", flush=True)
    header, rows = three_curves(args.quick)
    lines = [SECTION_TITLE, "", f"Written by `benchmarks/planner_sweep.py`{' --quick' if args.quick else ''}. "
             f"{machine_info(2)}; 1-minute load average {load_before[0]:.1f} before, {load_average()[0]:.1f} after.",
             "", "**Planning time** of `planners.Auto` (the default), slowest of four budgets (90%, 50%, 25%, 10% "
             "of store-all):", "", "| chain | stages | slowest plan | planner | target |", "|---|---|---|---|---|"]
    lines += [f"| {label} | {n} | {seconds:.2f} s | {name} | {target} |" for label, n, seconds, name, target in times]
    lines += ["", f"**The DP against the landmarks.** {header} Each cell: predicted recompute overhead; for the "
              "landmarks and the flat DP also the predicted / measured peak of a training step (measured by "
              "`anode_plan.measure_peak_memory`: the CPU allocator's peak, from torch.profiler's allocation events, "
              "kernel workspaces included), whether the measured peak held the budget, and the step time relative "
              f"to plain autograd (median of paired runs). Each step is {TRAIN_STEP_FORM}.", "",
              "| budget (MiB) | landmarks only | two-level DP (predicted) | CP-SAT (predicted) | flat DP (exact optimum) |",
              "|---|---|---|---|---|", *rows, ""]
    section = "\n".join(lines)
    print(section)
    if args.write:
        write_section(RESULTS_PATH, SECTION_TITLE, section)
    return 0


DEPTH_TITLE = "## Planning time against depth (CPU)"


def _depth_main(args: argparse.Namespace, load_before: tuple[float, float, float]) -> int:
    depths, nts = ([10, 50], [4]) if args.quick else ([10, 50, 200, 1000], [4, 10])
    rows = depth_sweep(depths, nts, [1.0, 0.2])
    header = [f"Written by `benchmarks/planner_sweep.py --depth`{' --quick' if args.quick else ''}. {machine_info(2)}; "
              f"1-minute load average {load_before[0]:.1f} before, {load_average()[0]:.1f} after. "
              "`mlp_ode(features=64, hidden=64, blocks=L, nt=Nt, method='rk4')`, batch 32; times are wall clock in "
              "one process after an untimed warm-up compile, trace + measure includes calibration. Above 40 DP "
              "units `Auto` plans with `planners.Nested` (binomial checkpointing over the blocks, not proven "
              "optimal); the chain DP's overhead is given where it runs in about a minute or less (up to 60 units), "
              "the flat DP's, the exact optimum, up to 50 stages."]
    section = format_depth_section(rows, DEPTH_TITLE, header)
    print(section)
    if args.write:
        write_section(RESULTS_PATH, DEPTH_TITLE, section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
