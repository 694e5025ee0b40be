"""Budget sweep on ODE-ResNet (CPU): what each memory budget buys, predicted and measured.

For one ODE-ResNet and batch, this script finds the three landmark budgets — the
store-all peak (plain backprop, every tape kept), the ANODE peak (each ODE block
recomputed once in backward) and the smallest feasible budget — then compiles the model
with the default planner (:class:`planners.Auto`, the chain DP here) at about ten budgets from 1.1x
store-all down to the minimum, the three landmarks included exactly (a landmark's budget is
``anode_plan.budget_for_peak`` of its predicted peak: the smallest budget under which
``compile`` accepts that schedule, since plans keep 0.01% of the budget free). For each budget
it records:

* the chosen schedule, its predicted peak and predicted recompute overhead;
* the measured peak of one warm training step (forward, cross-entropy, backward) from
  :func:`anode_plan.measure_peak_memory`, the allocator's count (on the CPU the
  profiler's allocation events, kernel workspaces included), and whether it stays
  within the budget;
* the step time relative to plain autograd on the uncompiled model: the median of
  paired ratios over ``--repeats`` unmeasured runs, compiled and plain interleaved (the
  profiler behind the meter slows a step down, so timed runs do not use it);
* the largest parameter-gradient difference from plain autograd, relative to the
  largest gradient (a sanity check that the schedule computes the same step).

Run from the repository root::

    PYTHONPATH=. python benchmarks/budget_sweep.py            # full sweep, a few minutes
    PYTHONPATH=. python benchmarks/budget_sweep.py --quick    # smoke run, well under a minute
    PYTHONPATH=. python benchmarks/budget_sweep.py --write    # also update benchmarks/RESULTS.md

The markdown table goes to stdout, progress to stderr. ``--write`` replaces the section
``## Budget sweep on ODE-ResNet (CPU)`` of ``benchmarks/RESULTS.md`` (or creates it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

# Before torch starts OpenMP: with the default (spinning) wait policy, two threads on two
# cores that other processes also use slowed a step down 10-30x, in bursts, swamping the
# ratios measured here (0.8 s instead of 18-26 s per step under one competing busy
# process). It applies to the compiled and the plain runs alike. Set OMP_WAIT_POLICY
# yourself to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import anode_plan  # noqa: E402
from _common import (TRAIN_STEP_FORM, ModelRunConfig, log, machine_info, mib, min_budget_bytes,  # noqa: E402
                     percent, publish_section, source_version, train_step)
import planners  # noqa: E402
from models import example_input_shape  # noqa: E402

SECTION_TITLE = "## Budget sweep on ODE-ResNet (CPU)"
DEFAULT_RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HUGE_BUDGET_BYTES = 2**50
MIB = 2**20

# The targets the interpretation checks the numbers against.
STORE_ALL_TIME_RATIO_TARGET = 1.05
ANODE_TIME_RATIO_TARGET = 1.45
PREDICTION_TOLERANCE = 0.03  # a predicted peak further than this from the measured one is called out


@dataclass(frozen=True)
class SweepConfig(ModelRunConfig):
    """The model, batch and measurement settings of one sweep."""

    nt: int = 8
    points_above_anode: int = 2
    points_below_anode: int = 3
    quick: bool = False


@dataclass(frozen=True)
class LandmarkBudgets:
    """The three budgets every sweep includes exactly, and what the default planner does at the ANODE one.

    Attributes:
        store_all_bytes: predicted peak of :class:`planners.StoreAll`.
        anode_bytes: predicted peak of :class:`planners.Anode`.
        min_bytes: the smallest budget the default planner accepts.
        below_anode_bytes: predicted peak of the default planner's plan at the ANODE budget;
            every budget between its own budget and the ANODE one gets that same plan (the
            cheapest plan that fits the larger budget fits the smaller one), so the sweep's
            points below ANODE start here.

    The ``*_budget`` properties are the budgets the sweep gives ``compile`` for the
    predicted peaks: :func:`anode_plan.budget_for_peak`, the smallest that accepts them.
    """

    store_all_bytes: int
    anode_bytes: int
    min_bytes: int
    below_anode_bytes: int

    @property
    def store_all_budget(self) -> int:
        return anode_plan.budget_for_peak(self.store_all_bytes)

    @property
    def anode_budget(self) -> int:
        return anode_plan.budget_for_peak(self.anode_bytes)

    @property
    def below_anode_budget(self) -> int:
        return anode_plan.budget_for_peak(self.below_anode_bytes)


@dataclass(frozen=True)
class SweepBudget:
    label: str
    budget_bytes: int


@dataclass(frozen=True)
class BudgetResult:
    """What one budget's plan predicted and what its training step measured."""

    label: str
    budget_bytes: int
    planner: str
    description: str
    predicted_peak_bytes: int
    measured_peak_bytes: int
    recompute_overhead: float
    recomputed_forwards: int
    compiled_time_ms: float
    plain_time_ms: float
    time_ratio: float
    time_ratio_iqr: tuple[float, float]
    grad_rel_err: float
    predicted_time_ms: float = 0.0
    cost_source: str = "measured"
    predicted_slowdown: float = 1.0

    @property
    def time_error(self) -> float:
        """The predicted step time over the measured median step, less one."""
        return self.predicted_time_ms / self.compiled_time_ms - 1

    @property
    def fits(self) -> bool:
        return self.measured_peak_bytes <= self.budget_bytes

    @property
    def predicted_over_measured(self) -> float:
        return self.predicted_peak_bytes / self.measured_peak_bytes


@dataclass(frozen=True)
class SweepReport:
    config: SweepConfig
    landmarks: LandmarkBudgets
    plain_peak_bytes: int
    results: tuple[BudgetResult, ...]
    anode_reference: BudgetResult
    machine: str
    source: str
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    runtime_s: float


def timed_step(module: nn.Module, params: list[nn.Parameter], x: torch.Tensor, y: torch.Tensor) -> float:
    """One unmeasured training step from cleared gradients; returns its wall time in ms."""
    for param in params:
        param.grad = None
    began = time.perf_counter()
    train_step(module, x, y)
    return (time.perf_counter() - began) * 1e3


def gradients(params: list[nn.Parameter]) -> list[torch.Tensor]:
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]


def relative_grad_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    """max |got - want| over all parameters, divided by max |want|."""
    scale = max(float(w.abs().max()) for w in want)
    diff = max(float((g - w).abs().max()) for g, w in zip(got, want))
    return diff / scale if scale else diff


def find_landmarks(model: nn.Module, x: torch.Tensor) -> LandmarkBudgets:
    """Store-all and ANODE peaks from their planners, and the minimum from the default planner's error."""
    store_all = anode_plan.compile(model, HUGE_BUDGET_BYTES, (x,), planner=planners.StoreAll())
    anode = anode_plan.compile(model, HUGE_BUDGET_BYTES, (x,), planner=planners.Anode())
    at_anode = anode_plan.compile(model, anode_plan.budget_for_peak(anode.plan.predicted_peak_bytes), (x,))
    return LandmarkBudgets(store_all_bytes=store_all.plan.predicted_peak_bytes,
                           anode_bytes=anode.plan.predicted_peak_bytes, min_bytes=min_budget_bytes(model, x),
                           below_anode_bytes=at_anode.plan.predicted_peak_bytes)


def geometric_points(high: int, low: int, count: int) -> list[int]:
    """``count`` budgets strictly between ``high`` and ``low``, evenly spaced in log scale."""
    if count <= 0 or high <= low:
        return []
    ratio = low / high
    return [round(high * ratio ** (k / (count + 1))) for k in range(1, count + 1)]


def sweep_budgets(landmarks: LandmarkBudgets, config: SweepConfig) -> list[SweepBudget]:
    """1.1x store-all, store-all, points down to ANODE, ANODE, the peak of the plan chosen at ANODE,
    points down to the minimum, the minimum; largest first."""
    lm = landmarks
    budgets = [SweepBudget("1.1x store-all", round(1.1 * lm.store_all_bytes)),
               SweepBudget("store-all", lm.store_all_budget)]
    budgets += [SweepBudget("", b) for b in geometric_points(lm.store_all_budget, lm.anode_budget,
                                                             config.points_above_anode)]
    budgets.append(SweepBudget("ANODE", lm.anode_budget))
    budgets.append(SweepBudget("peak of plan at ANODE", lm.below_anode_budget))
    budgets += [SweepBudget("", b) for b in geometric_points(lm.below_anode_budget, lm.min_bytes,
                                                             config.points_below_anode)]
    budgets.append(SweepBudget("minimum", lm.min_bytes))
    unique: dict[int, SweepBudget] = {}
    for budget in budgets:  # landmarks that coincide keep the first label
        unique.setdefault(budget.budget_bytes, budget)
    return sorted(unique.values(), key=lambda b: -b.budget_bytes)


def measure_budget(model: nn.Module, x: torch.Tensor, y: torch.Tensor, budget: SweepBudget,
                   reference_grads: list[torch.Tensor], config: SweepConfig, planner=None) -> BudgetResult:
    """Compile ``model`` for ``budget`` (with ``planner``, default the compiler's) and measure one step."""
    params = [p for p in model.parameters() if p.requires_grad]
    compiled = anode_plan.compile(model, budget.budget_bytes, (x,), planner=planner)
    plan = compiled.plan

    timed_step(compiled, params, x, y)  # warm-up; its gradients are checked against plain autograd
    grad_rel_err = relative_grad_error(gradients(params), reference_grads)
    for param in params:
        param.grad = None
    measured = anode_plan.measure_peak_memory(lambda: train_step(compiled, x, y))

    compiled_ms: list[float] = []
    plain_ms: list[float] = []
    for repeat in range(config.repeats):  # interleaved, alternating which goes first, against drift
        order: list[tuple[nn.Module, list[float]]] = [(compiled, compiled_ms), (model, plain_ms)]
        for module, times in order if repeat % 2 == 0 else reversed(order):
            times.append(timed_step(module, params, x, y))
    for param in params:
        param.grad = None
    ratios = [c / p for c, p in zip(compiled_ms, plain_ms)]
    low_ratio, _, high_ratio = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
    return BudgetResult(
        label=budget.label, budget_bytes=budget.budget_bytes, planner=plan.schedule.planner,
        description=plan.schedule.description, predicted_peak_bytes=plan.predicted_peak_bytes,
        measured_peak_bytes=measured.peak_bytes, recompute_overhead=plan.recompute_overhead,
        recomputed_forwards=plan.simulation.recomputed_forwards, compiled_time_ms=statistics.median(compiled_ms),
        plain_time_ms=statistics.median(plain_ms), time_ratio=statistics.median(ratios),
        time_ratio_iqr=(low_ratio, high_ratio), grad_rel_err=grad_rel_err,
        predicted_time_ms=plan.predicted_step_seconds * 1e3, cost_source=plan.cost_source,
        predicted_slowdown=plan.predicted_slowdown)


def run_sweep(config: SweepConfig) -> SweepReport:
    began = time.perf_counter()
    load_before = os.getloadavg()
    torch.set_num_threads(config.num_threads)
    model = config.build_model()
    generator = torch.Generator().manual_seed(config.seed)
    x = torch.randn(example_input_shape("ode_resnet", config.batch_size), generator=generator)
    y = torch.randint(0, 10, (config.batch_size,), generator=generator)
    params = [p for p in model.parameters() if p.requires_grad]

    log(f"model: {config.model_call()}, batch {config.batch_size}")
    landmarks = find_landmarks(model, x)
    log(f"landmarks: store-all {mib(landmarks.store_all_bytes)} MiB, ANODE {mib(landmarks.anode_bytes)} MiB, "
        f"minimum {mib(landmarks.min_bytes)} MiB")

    timed_step(model, params, x, y)  # warm-up
    reference_grads = gradients(params)
    for param in params:
        param.grad = None
    plain_peak = anode_plan.measure_peak_memory(lambda: train_step(model, x, y)).peak_bytes
    for param in params:
        param.grad = None

    def measure(budget: SweepBudget, planner=None) -> BudgetResult:
        result = measure_budget(model, x, y, budget, reference_grads, config, planner)
        log(f"  {mib(result.budget_bytes):>9} MiB  {result.description:<55} measured {mib(result.measured_peak_bytes)}"
            f" MiB  x{result.time_ratio:.3f}  ({time.perf_counter() - began:.0f} s)")
        return result

    results = tuple(measure(budget) for budget in sweep_budgets(landmarks, config))
    log("reference: planners.Anode() forced at the ANODE peak")
    reference = measure(SweepBudget("ANODE (planner forced)", landmarks.anode_budget), planners.Anode())
    return SweepReport(config=config, landmarks=landmarks, plain_peak_bytes=plain_peak, results=results,
                       anode_reference=reference, machine=machine_info(config.num_threads), source=source_version(),
                       load_before=load_before, load_after=os.getloadavg(), runtime_s=time.perf_counter() - began)


# --- report --------------------------------------------------------------------------------------------------------

def results_table(results: tuple[BudgetResult, ...]) -> str:
    header = ("| budget | budget (bytes) | budget (MiB) | chosen plan | predicted peak (MiB) | measured peak (MiB) "
              "| fits | predicted / measured | predicted recompute | extra forward stages | predicted step (ms) "
              "| compiled step (ms) | predicted / measured step | plain step (ms) | predicted vs plain | step time vs plain "
              "| ratio IQR "
              "| grad rel. err |")
    rule = "|" + "---|" * (header.count("|") - 1)
    rows = [header, rule]
    for r in results:
        rows.append(
            f"| {r.label} | {r.budget_bytes} | {mib(r.budget_bytes)} | {r.description} | "
            f"{mib(r.predicted_peak_bytes)} | {mib(r.measured_peak_bytes)} | {'yes' if r.fits else '**NO**'} | "
            f"{r.predicted_over_measured:.4f} | {percent(r.recompute_overhead)} | {r.recomputed_forwards} | "
            f"{r.predicted_time_ms:.0f} | {r.compiled_time_ms:.0f} | {r.predicted_time_ms / r.compiled_time_ms:.3f} | "
            f"{r.plain_time_ms:.0f} | {r.predicted_slowdown:.3f}x | {r.time_ratio:.3f}x | "
            f"{r.time_ratio_iqr[0]:.2f}-{r.time_ratio_iqr[1]:.2f} | {r.grad_rel_err:.1e} |")
    return "\n".join(rows)


def verdict(time_ratio: float, target: float) -> str:
    if time_ratio <= target:
        return f"target <= {target:.2f}x met"
    return f"**target <= {target:.2f}x missed by {time_ratio - target:.3f}x**"


def interpretation(report: SweepReport) -> list[str]:
    """Bullet points that check the numbers against the targets, and say by how much any is missed."""
    lm, results = report.landmarks, report.results
    measured = results + (report.anode_reference,)
    lines = []

    over = [r for r in measured if not r.fits]
    if over:
        worst = max(over, key=lambda r: r.measured_peak_bytes / r.budget_bytes)
        lines.append(f"**Budget exceeded** at {len(over)} of {len(measured)} budgets; worst at "
                     f"{mib(worst.budget_bytes)} MiB: measured {mib(worst.measured_peak_bytes)} MiB, "
                     f"{100 * (worst.measured_peak_bytes / worst.budget_bytes - 1):.2f}% over.")
    else:
        lines.append(f"The measured peak stays within the budget at all {len(measured)} budgets (reference row "
                     "included).")
    ratios = [r.predicted_over_measured for r in measured]
    off = [r for r in measured if abs(r.predicted_over_measured - 1) > PREDICTION_TOLERANCE]
    lines.append(f"The predicted peak is {min(ratios):.4f}x to {max(ratios):.4f}x the measured one" +
                 (f" (**off by more than {PREDICTION_TOLERANCE:.0%}** at " +
                  ", ".join(f"{mib(r.budget_bytes)} MiB ({r.predicted_over_measured:.4f})" for r in off) + ")"
                  if off else "") +
                 f"; plain autograd measured {report.plain_peak_bytes} B against the store-all prediction of "
                 f"{lm.store_all_bytes} B ({lm.store_all_bytes / report.plain_peak_bytes:.5f}x).")

    high = [r for r in results if r.budget_bytes >= lm.store_all_budget]
    if high:
        worst = max(high, key=lambda r: r.time_ratio)
        recompute = max(r.recompute_overhead for r in high)
        lines.append(f"At and above the store-all peak the plan is {high[-1].description!r} with "
                     f"{percent(recompute)} predicted recompute; the step takes at most {worst.time_ratio:.3f}x "
                     f"plain autograd ({verdict(worst.time_ratio, STORE_ALL_TIME_RATIO_TARGET)}).")

    at_anode = next((r for r in results if r.budget_bytes == lm.anode_budget), None)
    if at_anode is not None:
        lines.append(f"At the ANODE peak ({mib(lm.anode_bytes)} MiB, {lm.anode_bytes / lm.store_all_bytes:.1%} of "
                     f"store-all) the plan is {at_anode.description!r}: {at_anode.recomputed_forwards} extra forward "
                     f"stages, {percent(at_anode.recompute_overhead)} predicted recompute, measured "
                     f"{at_anode.time_ratio:.3f}x plain ({verdict(at_anode.time_ratio, ANODE_TIME_RATIO_TARGET)}).")
        ref = report.anode_reference
        if at_anode.description != ref.description:
            lines.append(
                f"The default planner does not pick ANODE at ANODE's own peak: {at_anode.description!r} needs "
                f"{mib(at_anode.predicted_peak_bytes)} MiB and {at_anode.recomputed_forwards} extra forward stages, "
                f"ANODE {mib(ref.predicted_peak_bytes)} MiB and {ref.recomputed_forwards}, so it dominates ANODE in "
                f"memory and in compute. ANODE itself, forced (reference row), measures {ref.time_ratio:.3f}x plain "
                f"with {percent(ref.recompute_overhead)} predicted recompute "
                f"({verdict(ref.time_ratio, ANODE_TIME_RATIO_TARGET)}).")

    between = [r for r in results if lm.below_anode_budget <= r.budget_bytes < lm.store_all_budget]
    plans = list(dict.fromkeys(r.description for r in between))
    if len(between) > 1 and len(plans) == 1:
        lines.append(
            f"Every budget from {mib(lm.below_anode_bytes)} MiB up to just below store-all ({mib(lm.store_all_bytes)} "
            f"MiB) gets the same plan, {plans[0]!r}: a budget of {mib(between[0].budget_bytes)} MiB "
            f"({between[0].budget_bytes / lm.store_all_bytes:.0%} of store-all) pays the same "
            f"{percent(between[0].recompute_overhead)} predicted recompute as one of "
            f"{mib(lm.below_anode_bytes)} MiB. The default planner chooses among whole-network landmark families "
            "only, and none of them keeps the tapes of some ODE blocks while recomputing others, so the memory "
            "between the two goes unused.")

    low = [r for r in results if r.budget_bytes < lm.below_anode_budget]
    if low:
        overheads = [r.recompute_overhead for r in low]
        monotone = all(a <= b + 1e-12 for a, b in zip(overheads, overheads[1:]))
        plans = "; ".join(dict.fromkeys(r.description for r in low))
        lines.append(f"Below {mib(lm.below_anode_bytes)} MiB, down to the minimum of {mib(lm.min_bytes)} MiB "
                     f"({lm.min_bytes / lm.store_all_bytes:.1%} of store-all), the planner picks {plans}. Predicted "
                     f"recompute goes from {percent(overheads[0])} to {percent(overheads[-1])} "
                     f"({'never decreasing as the budget shrinks' if monotone else '**not monotone in the budget**'})"
                     f"; measured step time from {low[0].time_ratio:.3f}x to {low[-1].time_ratio:.3f}x plain.")
    every = list(results) + [report.anode_reference]
    errors = [r.time_error for r in every]
    worst = max(every, key=lambda r: abs(r.time_error))
    median_error = statistics.median(abs(e) for e in errors)
    lines.append(f"Predicted step time (`plan.predicted_step_seconds`, {every[0].cost_source} costs) against the "
                 f"measured median step: {min(errors):+.1%} to {max(errors):+.1%} over the {len(every)} rows, median "
                 f"|error| {median_error:.1%}; the worst is {worst.label or mib(worst.budget_bytes) + ' MiB'} "
                 f"({worst.time_error:+.1%}). Target: within 10% at every budget "
                 f"({'met' if max(abs(e) for e in errors) <= 0.10 else '**not met**'}), 5% in the median "
                 f"({'met' if median_error <= 0.05 else '**not met**'}).")
    relative = [r.predicted_slowdown / r.time_ratio - 1 for r in every]
    lines.append(f"As a ratio to plain autograd's step (`plan.predicted_slowdown` against the measured paired ratio, "
                 f"which the machine's speed cancels out of): {min(relative):+.1%} to {max(relative):+.1%}, median "
                 f"|error| {statistics.median(abs(e) for e in relative):.1%}.")

    worst_grad = max(r.grad_rel_err for r in measured)
    lines.append(f"Parameter gradients match plain autograd to {worst_grad:.1e} (relative to the largest gradient) "
                 "at every budget.")
    busy = max(report.load_before[0], report.load_after[0])
    if busy > report.config.num_threads:
        lines.append(f"The machine was shared while this ran (1-minute load average {report.load_before[0]:.1f} "
                     f"before, {report.load_after[0]:.1f} after, on {os.cpu_count()} CPUs), so step times are "
                     "noisy; the paired, interleaved ratios are more trustworthy than the absolute milliseconds, "
                     "and the IQR column shows how much they spread.")
    return lines


def render_section(report: SweepReport) -> str:
    config, lm = report.config, report.landmarks
    lines = [
        SECTION_TITLE,
        "",
        f"Written by `benchmarks/budget_sweep.py`{' --quick (a smoke run, not representative)' if config.quick else ''}"
        f" in {report.runtime_s:.0f} s.",
        "",
        f"- Machine: {report.machine}; 1-minute load average {report.load_before[0]:.2f} before, "
        f"{report.load_after[0]:.2f} after.",
        f"- Library: {report.source}.",
        f"- Model: `{config.model_call()}`, float32, train mode, batch {config.batch_size}, input "
        f"{example_input_shape('ode_resnet', config.batch_size)}, cross-entropy loss; each step is {TRAIN_STEP_FORM}.",
        f"- Landmarks (predicted peaks): store-all {mib(lm.store_all_bytes)} MiB ({lm.store_all_bytes} B), ANODE "
        f"{mib(lm.anode_bytes)} MiB ({lm.anode_bytes} B); minimum feasible budget {mib(lm.min_bytes)} MiB "
        f"({lm.min_bytes} B); plain autograd measured {mib(report.plain_peak_bytes)} MiB "
        f"({report.plain_peak_bytes} B). A landmark's budget in the table is `anode_plan.budget_for_peak` of its "
        f"predicted peak (store-all {lm.store_all_budget} B, ANODE {lm.anode_budget} B), the smallest budget "
        "`compile` accepts for it: plans keep 0.01% of the budget free.",
        "- Planner: the default of `anode_plan.compile` (`planners.Auto`: the optimal chain DP on this chain).",
        "- Measured peak: `anode_plan.measure_peak_memory` over one training step (forward, loss, backward) of the "
        "warm model, gradients cleared with `set_to_none` first: the CPU allocator's peak, from torch.profiler's "
        "allocation and free events replayed in time order (kernel workspaces included). Predicted peak: "
        "`plan.predicted_peak_bytes` of the calibrated plan (`compile`'s default, `calibrate=True`).",
        f"- Step time: median over {config.repeats} runs after one warm-up, not under the profiler, compiled and "
        "plain interleaved (alternating which runs first); \"step time vs plain\" is the median of the paired "
        "ratios.",
        "- Predicted recompute: `plan.recompute_overhead`, the extra compute over a step without recompute. "
        "Predicted step: `plan.predicted_step_seconds`, the whole step in the milliseconds `compile`'s calibration "
        "measured on this machine (stages timed one by one, scaled to whole measured steps); \"predicted / measured "
        "step\" divides it by the compiled step's measured median. Grad rel. err: max |grad - plain grad| / "
        "max |plain grad| over all parameters.",
        "",
        results_table(report.results),
        "",
        "Reference, not part of the sweep: the ANODE planner forced (`planner=planners.Anode()`) at its own peak.",
        "",
        results_table((report.anode_reference,)),
        "",
        "Interpretation:",
        "",
        *(f"- {line}" for line in interpretation(report)),
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> tuple[SweepConfig, Path | None]:
    defaults = SweepConfig()
    parser = argparse.ArgumentParser(
        description="Sweep memory budgets from 1.1x store-all down to the minimum on an ODE-ResNet; report the "
                    "chosen plan, predicted and measured peak, and step time against plain autograd (CPU).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--width", type=int, default=defaults.width, help="channels of the first stage")
    parser.add_argument("--stages", type=int, default=defaults.stages, help="resolution stages, one ODE block each")
    parser.add_argument("--nt", type=int, default=defaults.nt, help="time steps per ODE block")
    parser.add_argument("--method", default=defaults.method, choices=["euler", "rk2", "rk4"], help="ODE solver")
    parser.add_argument("--norm", default=defaults.norm, choices=["batch", "group"], help="normalisation layer")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="images per training step")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the weights and the batch")
    parser.add_argument("--repeats", type=int, default=defaults.repeats,
                        help="timed runs per budget, each of the compiled and the plain model")
    parser.add_argument("--threads", type=int, default=defaults.num_threads, help="torch.set_num_threads")
    parser.add_argument("--points-above-anode", type=int, default=defaults.points_above_anode,
                        help="budgets strictly between the store-all and ANODE peaks")
    parser.add_argument("--points-below-anode", type=int, default=defaults.points_below_anode,
                        help="budgets strictly between the peak of the plan chosen at the ANODE budget and "
                             "the minimum")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: width 4, nt 4, batch 8, 3 repeats, one point below ANODE (< 1 min)")
    parser.add_argument("--write", nargs="?", type=Path, const=DEFAULT_RESULTS, default=None, metavar="PATH",
                        help=f"also replace the section {SECTION_TITLE[3:]!r} of PATH; PATH defaults to "
                             f"{DEFAULT_RESULTS.name} next to this script")
    args = parser.parse_args(argv)
    config = SweepConfig(width=args.width, stages=args.stages, nt=args.nt, method=args.method, norm=args.norm,
                         batch_size=args.batch_size, seed=args.seed, repeats=args.repeats, num_threads=args.threads,
                         points_above_anode=args.points_above_anode, points_below_anode=args.points_below_anode)
    if args.quick:
        config = replace(config, width=4, nt=4, batch_size=8, repeats=3, points_above_anode=0,
                         points_below_anode=1, quick=True)
    if args.quick and args.write is not None and args.write.resolve() == DEFAULT_RESULTS:
        parser.error(f"--quick results are a smoke test; give --write another PATH than {DEFAULT_RESULTS}")
    if config.repeats < 1:
        parser.error(f"--repeats {config.repeats}: give at least 1 (5 or more for reportable timings)")
    return config, args.write


def main(argv: list[str] | None = None) -> int:
    config, write_path = parse_args(argv)
    report = run_sweep(config)
    publish_section(render_section(report), write_path, report.runtime_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
