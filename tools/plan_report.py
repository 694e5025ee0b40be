#!/usr/bin/env python
"""Inspect the schedule anode-plan picks for a model and a memory budget; draw it, measure it, save it.

    python tools/plan_report.py                                   # the default ODE-ResNet, a sweep of budgets
    python tools/plan_report.py --kwargs nt=16 method=rk4 --batch 64 --budget 300MB
    python tools/plan_report.py --budget 20MB:80MB:7              # a range: 7 budgets from 20MB to 80MB
    python tools/plan_report.py --budget 30MB 40MB,60MB --measure # a list, with a real step per budget
    python tools/plan_report.py --model mypkg.nets:build --kwargs depth=4 --input-shape 3,64,64 --budget 1GiB
    python tools/plan_report.py --budget 30MB --save plan.yaml --plot out.png
    python tools/plan_report.py --plan plan.yaml                  # report on a saved plan
    python tools/plan_report.py --plan plan.yaml --model ode_resnet --measure   # check it on the model and run it
    python tools/plan_report.py --budget 16GB --max-batch         # the largest batch that fits, and its plan
    python tools/plan_report.py --budget 60MB --max-batch --max-overhead 0.3 --plot batch.png

For one budget it prints the schedule, the memory at the predicted peak (fixed costs,
states, tapes, gradients, transients), the recompute overhead, the landmarks (store-all,
ANODE and minimum budgets) and a table per ODE block. For several budgets it prints the
trade-off curve (budget against predicted step cost) and the report of the median
budget (all of them with --details). --plot out.png writes out-tradeoff.png and
out-timeline.png (needs matplotlib). With --max-batch (one budget), --batch is where the
search starts: it prints the largest batch that fits (with --max-overhead, within that
recompute overhead), the batches it measured, the batch/overhead curve and the report of
the plan at that batch; --plot out.png then writes out-batch.png and out-timeline.png.
Each batch it measures is shown on stderr as it starts, with the time it is expected to
take; a batch that would need more memory than the machine has free is not measured: the
search stops there and prints the largest batch confirmed (exit status 1).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import replace

import torch
from torch.utils._pytree import tree_flatten

from _common import input_shape, load_model, parse_budgets, parse_kwargs

import anode_plan
from anode_plan import PLANNER_NAMES as PLANNERS
from anode_plan.compiler.chains import measured_chain, with_backend
from anode_plan.stages.inductor import check_backend, compiled_stages_for
from anode_plan.plans.serialise import structure_digest
from planners import format_bytes

DEFAULT_MODEL = "ode_resnet"
DEFAULT_BATCH = 32
CURVE_POINTS = 48


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    known = ", ".join(sorted(__import__("models").MODELS))
    parser.add_argument("--model", help=f"a model name ({known}) or package.module:factory (default {DEFAULT_MODEL})")
    parser.add_argument("--kwargs", nargs="*", default=[], metavar="KEY=VALUE", help="arguments of the model factory")
    parser.add_argument("--batch", type=int, help=f"batch size of the example input (default {DEFAULT_BATCH})")
    parser.add_argument("--input-shape", help="input shape without the batch, e.g. 3,32,32 (default: the model's)")
    parser.add_argument("--dtype", choices=["float32", "float64"],
                        help="dtype of the model and input (default float32, or a saved plan's)")
    parser.add_argument("--budget", nargs="*", default=[], metavar="BUDGET",
                        help="budgets: 300MB, 512MiB or bytes; lists (30MB 40MB or 30MB,40MB) and ranges "
                             "start:stop:count (20MB:80MB:7). Default: the landmarks and points between")
    parser.add_argument("--planner", choices=sorted(PLANNERS), default="auto")
    parser.add_argument("--xconv", type=int, metavar="PROBES",
                        help="let the planner sketch convolutions with XConv(probes=PROBES) where it pays (inexact: "
                             "the report flags every sketched layer); the sweep's landmarks stay exact")
    parser.add_argument("--backend", choices=["eager", "inductor"], default="eager",
                        help="inductor: compile every stage with torch.compile and plan on the compiled stages' "
                             "memory and times, measured on the device (slow the first time: it compiles)")
    parser.add_argument("--plan", metavar="PLAN.yaml",
                        help="report on a saved plan; with --model, check it against that model first")
    parser.add_argument("--measure", action="store_true",
                        help="run a real training step per budget and print its measured peak and time")
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="with --measure, time N steps and report the fastest (default 1)")
    parser.add_argument("--plot", metavar="OUT.png",
                        help="draw the trade-off curve and the step's memory timeline to OUT-tradeoff.png and "
                             "OUT-timeline.png (needs matplotlib)")
    parser.add_argument("--save", metavar="PLAN.yaml", help="save the plan (the reported budget's) as YAML")
    parser.add_argument("--dump", action="store_true", help="print the plan file of the reported plan")
    parser.add_argument("--details", action="store_true", help="for a sweep, print the full report of every budget")
    parser.add_argument("--max-batch", action="store_true",
                        help="find the largest batch that fits the (one) budget, and report its plan")
    parser.add_argument("--max-overhead", type=float, metavar="F",
                        help="with --max-batch: the largest predicted recompute overhead allowed, e.g. 0.3")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the tool; long measuring and planning report their progress on stderr (``anode_plan`` logging)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("anode_plan")
    logger.addHandler(handler)
    previous = logger.level
    logger.setLevel(logging.INFO)
    try:
        return _main(argv)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        budgets = parse_budgets(args.budget)
    except ValueError as error:
        parser.error(str(error))
    if args.repeat < 1:
        parser.error(f"--repeat {args.repeat}: give a positive number of timed steps")
    if args.plan and budgets:
        parser.error("--plan reports on the saved plan at its own budget; leave out --budget")
    if args.plan and args.measure and not args.model:
        parser.error("--measure runs the saved plan on a model: give --model (and --kwargs) as well")
    if args.max_overhead is not None and not args.max_batch:
        parser.error("--max-overhead limits the --max-batch search; add --max-batch")
    if args.max_batch and (len(budgets) != 1 or args.plan):
        parser.error("--max-batch finds the largest batch for one budget: give exactly one --budget, and no --plan")
    planner = PLANNERS[args.planner]()
    try:
        if args.plan:
            return _report_saved(args, planner)
        if args.max_batch:
            return _report_max_batch(args, planner, budgets[0])
        return _report_budgets(args, planner, budgets)
    except anode_plan.AnodePlanError as error:
        print(f"{type(error).__name__}: {error}")
        return 1


# ------------------------------------------------------------------------------- model and budgets


def _build(args: argparse.Namespace) -> tuple[torch.nn.Module, str, dict]:
    kwargs = parse_kwargs(args.kwargs)
    model, label = load_model(args.model or DEFAULT_MODEL, kwargs)
    return model.to(getattr(torch, args.dtype)), label, kwargs


def _report_budgets(args: argparse.Namespace, planner, budgets: list[int]) -> int:
    args.dtype = args.dtype or "float32"
    model, label, kwargs = _build(args)
    torch.manual_seed(0)
    shape = input_shape(args.model or DEFAULT_MODEL, args.batch or DEFAULT_BATCH, args.input_shape, kwargs)
    x = torch.randn(shape, dtype=getattr(torch, args.dtype))
    traced = anode_plan.trace_model(model, (x,))
    approximate = None if args.xconv is None else anode_plan.XConv(probes=args.xconv)
    stages = None
    if check_backend(args.backend, approximate=approximate) == "inductor":
        stages = compiled_stages_for(model, traced, structure_digest(traced))
    chain = measured_chain(model, traced, (x,), calibrate=True, approximate=approximate, compiled=stages)
    marks = anode_plan.find_landmarks(chain, planner)
    sweep = not budgets or len(budgets) > 1
    budgets = budgets or anode_plan.default_budgets(marks)
    print(f"model {label}{' ' + str(kwargs) if kwargs else ''}, input {tuple(x.shape)} {args.dtype}, "
          f"{len(chain.stages)} stages, {len(chain.blocks)} ODE blocks, planner {args.planner}")
    points = list(anode_plan.tradeoff_curve(chain, budgets, planner))
    compile_s = stages.compile_seconds if stages is not None else 0.0  # what measuring the chain compiled
    plans = {p.budget_bytes: with_backend(anode_plan.plan_for_budget(chain, traced, (x,), p.budget_bytes, planner),
                                          stages, compile_s) for p in points if p.feasible}
    if not plans:
        print()
        print(anode_plan.format_landmarks(marks))
        for point in points:
            print(f"\nbudget {format_bytes(point.budget_bytes)} ({point.budget_bytes} bytes) is infeasible: the "
                  f"smallest schedule of {args.planner} needs {format_bytes(point.min_budget_bytes)} "
                  f"({point.min_budget_bytes} bytes). Give at least that, or lower the batch size.")
        return 1
    feasible = sorted(plans)
    chosen = plans[feasible[len(feasible) // 2]]
    plain = None
    if args.measure:
        plain = _measure_step(model, model, x, args.repeat)
        for index, point in enumerate(points):
            if point.feasible:
                compiled = anode_plan.CompiledModel(model, traced, plans[point.budget_bytes], compiled=stages)
                step = _measure_step(compiled, model, x, args.repeat)
                points[index] = replace(point, measured_peak_bytes=step.peak_bytes, measured_time_ms=step.time_ms)
    if sweep:
        print()
        print(anode_plan.format_landmarks(marks))
        print()
        print(anode_plan.format_tradeoff(points, chain.cost_unit))
        if plain is not None:
            print(f"  plain autograd (no plan): measured peak {format_bytes(plain.peak_bytes)}, step time "
                  f"{plain.time_ms:.1f} ms")
    shown = [plans[b] for b in feasible] if (args.details or not sweep) else [chosen]
    for plan in shown:
        print()
        if sweep and not args.details:
            print("the median feasible budget of the sweep, in detail (--details for every budget):")
        print(anode_plan.format_report(plan, None if sweep else marks))
        point = next((p for p in points if p.budget_bytes == plan.budget_bytes), None)
        if plain is not None and point is not None:
            print(_format_measured(plan, point, plain))
    _outputs(args, chosen, chain, marks, planner, budgets)
    return 0


# ------------------------------------------------------------------------------- the largest batch

# Why a batch does not fit, from BatchPoint.excluded_by and BatchSearch.limited_by.
_EXCLUDED = {"budget": "over the budget", "max_overhead": "over the recompute cap"}


def _report_max_batch(args: argparse.Namespace, planner, budget: int) -> int:
    args.dtype = args.dtype or "float32"
    model, label, kwargs = _build(args)
    torch.manual_seed(0)
    shape = input_shape(args.model or DEFAULT_MODEL, args.batch or DEFAULT_BATCH, args.input_shape, kwargs)
    x = torch.randn(shape, dtype=getattr(torch, args.dtype))
    found = anode_plan.search_batch_size(model, budget, (x,), max_overhead=args.max_overhead, planner=planner)
    limit = "" if args.max_overhead is None else f" within {args.max_overhead:.0%} recompute overhead"
    print(f"model {label}{' ' + str(kwargs) if kwargs else ''}, input {tuple(x.shape[1:])} per sample, "
          f"{args.dtype}, planner {args.planner}")
    measured_at = ", ".join(map(_format_measurement, found.measurements))
    if found.stopped is not None:
        print(f"\nthe search stopped at this machine's memory, not the budget: {found.stopped.describe()}, so it "
              f"was not measured")
        print(f"  largest batch confirmed under {format_bytes(budget)} ({budget} bytes){limit}: {found.batch} "
              f"(chains measured at batches {measured_at})")
        print(f"  a larger batch may fit {format_bytes(budget)} on a device with more memory; "
              f"{found.stopped.advice()}")
        return 1
    print(f"\nlargest batch under {format_bytes(budget)} ({budget} bytes){limit}: {found.batch}")
    measured = {p.batch: p for p in found.points if p.measured}
    if found.limited_by == "max_batch":
        fits = f"batch {found.batch} fits, and the search goes no higher"
    elif found.batch:
        fits = f"batch {found.batch} fits, batch {found.batch + 1} does not ({_EXCLUDED[found.limited_by]})"
    else:
        fits = f"batch 1 does not fit ({_EXCLUDED[found.limited_by]})"
    print(f"  confirmed on measured chains: {fits}; chains measured at batches {measured_at}")
    batches = sorted({max(1, round(found.batch * k / 8)) for k in range(1, 11)} | {found.batch, found.batch + 1})
    curve = anode_plan.batch_curve(found, batches, planner)
    print("\n  batch    predicted peak  recompute overhead  fits")
    for point in curve:
        point = measured.get(point.batch, point)
        peak = format_bytes(point.peak_bytes) if point.peak_bytes is not None else \
            f"needs {format_bytes(point.min_budget_bytes)}"
        overhead = f"{point.overhead:+.1%}" if point.overhead is not None else "-"
        mark = ("yes" if point.fits else f"no, {_EXCLUDED[point.excluded_by]}") + \
            (" (measured)" if point.measured else "")
        print(f"  {point.batch:>5}  {peak:>16}  {overhead:>18}  {mark}")
    if found.plan is None:
        print(f"\nnot one sample fits {format_bytes(budget)}: give a larger budget")
        return 1
    print()
    print(anode_plan.format_report(found.plan))
    if args.plot:
        stem, suffix = os.path.splitext(args.plot)
        batch_path, timeline_path = f"{stem}-batch{suffix or '.png'}", f"{stem}-timeline{suffix or '.png'}"
        anode_plan.plot_batch_curve(curve, batch=found.batch, budget_bytes=budget, max_overhead=args.max_overhead,
                                    title=f"{label}: the largest batch under {format_bytes(budget)}{limit}"
                                    ).savefig(batch_path)
        anode_plan.plot_timeline(found.plan).savefig(timeline_path)
        print(f"\ndrew {batch_path} and {timeline_path}")
    if args.save:
        anode_plan.save_plan(found.plan, args.save)
        print(f"\nsaved the plan for batch {found.batch} to {args.save}")
    return 0


def _format_measurement(measurement: anode_plan.analysis.batch.BatchMeasurement) -> str:
    """``48 (4.1 s, 45.60 MiB at the peak)``: a measured batch, how long measuring took and the most it allocated."""
    peak = "" if measurement.peak_bytes is None else f", {format_bytes(measurement.peak_bytes)} at the peak"
    return f"{measurement.batch} ({measurement.seconds:.1f} s{peak})"


# ------------------------------------------------------------------------------- a saved plan


def _report_saved(args: argparse.Namespace, planner) -> int:
    plan = anode_plan.load_plan(args.plan)
    saved_dtype = plan.input_dtypes[0].removeprefix("torch.")
    args.dtype = args.dtype or (saved_dtype if saved_dtype in ("float32", "float64") else "float32")
    print(f"saved plan {args.plan}: planner {plan.schedule.planner}, inputs "
          + ", ".join(f"{shape} {dtype}" for shape, dtype in zip(plan.input_shapes, plan.input_dtypes))
          + f", structure digest {plan.fingerprint}")
    measured = None
    if args.model:
        model, label, kwargs = _build(args)
        inputs = None  # by default the file's shapes; --batch or --input-shape checks the plan against others
        if args.batch or args.input_shape:
            shape = input_shape(args.model, args.batch or plan.input_shapes[0][0], args.input_shape, kwargs)
            inputs = (torch.randn(shape, dtype=getattr(torch, args.dtype)),)
        compiled = anode_plan.compile(model, example_inputs=inputs, plan=args.plan)
        print(f"checked against model {label}{' ' + str(kwargs) if kwargs else ''}: same structure and inputs; "
              f"re-measured, the schedule fits its budget")
        plan = compiled.plan
        if args.measure:
            torch.manual_seed(0)
            x = torch.randn(plan.input_shapes[0], dtype=getattr(torch, plan.input_dtypes[0].removeprefix("torch.")))
            plain = _measure_step(model, model, x, args.repeat)
            step = _measure_step(compiled, model, x, args.repeat)
            point = anode_plan.TradeoffPoint(plan.budget_bytes, plan.predicted_peak_bytes,
                                             plan.predicted_step_seconds * 1e3, plan.recompute_overhead, "",
                                             measured_peak_bytes=step.peak_bytes, measured_time_ms=step.time_ms,
                                             cost_source=plan.cost_source)
            measured = _format_measured(plan, point, plain)
    marks = anode_plan.find_landmarks(plan.chain, planner)
    print()
    print(anode_plan.format_report(plan, marks))
    if measured:
        print(measured)
    _outputs(args, plan, plan.chain, marks, planner, [plan.budget_bytes])
    return 0


# ------------------------------------------------------------------------------- measuring


def _loss(output) -> torch.Tensor:
    tensors = [t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return sum(t.square().mean() for t in tensors)


def _clear_grads(model: torch.nn.Module) -> None:
    for parameter in model.parameters():
        parameter.grad = None


def _measure_step(module: torch.nn.Module, model: torch.nn.Module, x: torch.Tensor,
                  repeat: int = 1) -> anode_plan.MemoryMeasurement:
    """One warm-up step, one step under the memory tracker (the peak), then the fastest of ``repeat`` timed steps."""
    def step() -> None:
        _loss(module(x)).backward()

    _clear_grads(model)
    step()
    _clear_grads(model)
    peak = anode_plan.measure_peak_memory(step, device=x.device)
    times_ms = []
    for _ in range(repeat):
        _clear_grads(model)
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        began = time.perf_counter()
        step()
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        times_ms.append((time.perf_counter() - began) * 1e3)
    _clear_grads(model)
    return anode_plan.MemoryMeasurement(peak.peak_bytes, min(times_ms), peak.method)


def _format_measured(plan, point, plain) -> str:
    peak, predicted = point.measured_peak_bytes, plan.predicted_peak_bytes
    within = "within" if peak <= plan.budget_bytes else "OVER"
    return (f"  measured     peak {format_bytes(peak)} ({within} budget; prediction {(predicted - peak) / peak:+.1%} "
            f"of it), step time {point.measured_time_ms:.1f} ms (predicted {plan.predicted_step_seconds * 1e3:.1f} ms), "
            f"{point.measured_time_ms / plain.time_ms - 1:+.1%} against plain autograd's {plain.time_ms:.1f} ms "
            f"(predicted {plan.predicted_slowdown - 1:+.1%})")


# ------------------------------------------------------------------------------- files and pictures


def _outputs(args, plan, chain, marks, planner, budgets: list[int]) -> None:
    """--save, --dump and --plot, for ``plan``; ``budgets`` are marked on the curve's sweep too."""
    if args.save:
        anode_plan.save_plan(plan, args.save)
        print(f"\nsaved the plan for budget {format_bytes(plan.budget_bytes)} to {args.save}; reuse it with "
              f"anode_plan.compile(model, plan={args.save!r})")
    if args.dump:
        print()
        print(anode_plan.dump_plan(plan), end="")
    if args.plot:
        low, high = marks.minimum_bytes, int(marks.store_all_bytes * 1.08)
        dense = {low + (high - low) * k // (CURVE_POINTS - 1) for k in range(CURVE_POINTS)}
        dense |= {marks.anode_bytes, marks.store_all_bytes, *budgets}
        curve = anode_plan.tradeoff_curve(chain, sorted(dense), planner)
        chosen = anode_plan.TradeoffPoint(plan.budget_bytes, plan.predicted_peak_bytes,
                                          plan.predicted_step_seconds * 1e3, plan.recompute_overhead,
                                          plan.schedule.description, cost_source=plan.cost_source)
        tradeoff_path, timeline_path = figure_paths(args.plot)
        title = f"{chain.name}: memory / compute trade-off"
        anode_plan.plot_tradeoff(curve, marks, chosen=chosen, title=title).savefig(tradeoff_path)
        anode_plan.plot_timeline(plan).savefig(timeline_path)
        print(f"\ndrew {tradeoff_path} and {timeline_path}")


def figure_paths(path: str) -> tuple[str, str]:
    """``out.png`` -> ``("out-tradeoff.png", "out-timeline.png")``."""
    stem, suffix = os.path.splitext(path)
    return f"{stem}-tradeoff{suffix or '.png'}", f"{stem}-timeline{suffix or '.png'}"


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except BrokenPipeError:
        # The reader stopped early (``plan_report.py | head``): end quietly, as Unix tools do.
        # stdout goes to devnull so that the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(1) from None
