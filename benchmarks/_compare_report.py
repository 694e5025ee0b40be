"""The data and the report of ``benchmarks/compare.py``: records, tables, interpretation, plot.

Private to ``benchmarks/``; may change without notice. ``compare.py`` measures and fills a
:class:`CompareReport`; everything here only reads it.
"""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch

from anode_plan import budget_for_peak
from anode_plan.budget import PREDICTION_RESERVE
from _common import MIB, TRAIN_STEP_FORM, ModelRunConfig, log, mib, percent
from models import example_input_shape

SECTION_TITLE = "## Compared with the alternatives (CPU)"
CUDA_SECTION_TITLE = "## Compared with the alternatives (CUDA)"
SPEED_TOLERANCE = 1.03  # a median paired step-time ratio within 3% counts as "as fast" on this noisy machine
PREDICTION_TOLERANCE = 0.03  # a predicted peak further than this from the measured one is called out
PLAIN = "plain autograd"
ADJOINT = "torchdiffeq odeint_adjoint"
INDUCTOR_FAMILY = "anode-plan inductor"  # the compiled mode at a torch.compile peer's peak
BELOW_FAMILY = "anode-plan below"  # either mode at a budget below every torch.compile peak


@dataclass(frozen=True)
class CompareConfig(ModelRunConfig):
    """The model, batch and measurement settings of one comparison."""

    compile_budgets: tuple[float, ...] = (1.0, 0.5, 0.1)
    device: str = "cpu"
    quick: bool = False


@dataclass(frozen=True)
class Measured:
    """What one candidate's warm training step measured (timings are in :class:`Timing`)."""

    name: str
    family: str
    budget_of: str | None
    budget_bytes: int | None
    plan: str
    first_step_s: float
    setup_s: float | None
    compile_fraction: float | None
    peak_bytes: int  # anode_plan.measure_peak_memory of one warm step: the allocator's peak
    peak_method: str  # "cpu-allocator" or "cuda-allocator"
    kernel_at_peak: str | None  # the ATen op whose allocation made the peak (CPU only)
    kept_bytes: int  # still allocated when forward (and the loss) returns: what the method keeps for backward
    grad_rel_err: float
    predicted_peak_bytes: int | None = None
    predicted_recompute: float | None = None
    backend: str = "eager"
    predicted_ms: float | None = None
    predicted_slowdown: float | None = None
    cold_setup_s: float | None = None  # the compiled mode: a first compile at this budget, cold (fresh model, cache)

    @property
    def predicted_over_measured(self) -> float | None:
        return None if self.predicted_peak_bytes is None else self.predicted_peak_bytes / self.peak_bytes

    @property
    def held(self) -> bool | None:
        return None if self.budget_bytes is None else self.peak_bytes <= self.budget_bytes


@dataclass(frozen=True)
class Infeasible:
    """anode-plan given a peer's peak that is below its smallest schedule."""

    budget_of: str
    budget_bytes: int
    min_budget_bytes: int


@dataclass(frozen=True)
class Timing:
    median_ms: float
    ratio: float  # median over rounds of this step's time / plain autograd's in the same round
    ratio_iqr: tuple[float, float]
    samples_ms: tuple[float, ...]


@dataclass(frozen=True)
class FirstCompile:
    """anode-plan's first ``compile(..., backend="inductor")`` of the model, before any torch.compile peer."""

    setup_s: float  # the whole call: trace, eager structure, compile and measure every stage, plan
    compile_s: float  # of it, the stages' first runs (compiling): plan.compile_seconds
    stages: int
    eager_stages: tuple[tuple[str, str], ...]
    compiled: str = ""  # what it compiled: "one unit of the whole model at activation_memory_budget=1", "19 stages"


@dataclass(frozen=True)
class CompareReport:
    config: CompareConfig
    results: tuple[Measured, ...]
    infeasible: tuple[Infeasible, ...]
    timings: dict[str, Timing]
    min_budget_bytes: int
    store_all_predicted_bytes: int
    solver_match: dict[str, float]
    skipped: tuple[str, ...]
    plain64_err: float
    machine: str
    source: str
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    runtime_s: float
    notes: tuple[str, ...] = field(default_factory=tuple)
    first_compile: FirstCompile | None = None
    inductor_min_bytes: int | None = None

    def result(self, name: str) -> Measured:
        return next(r for r in self.results if r.name == name)

    def anode_for(self, peer: str) -> Measured | None:
        return next((r for r in self.results if r.family == "anode-plan" and r.budget_of == peer), None)


def paired_ratio(timings: dict[str, Timing], name: str, other: str) -> tuple[float, float, float]:
    """Quartiles (25%, median, 75%) over rounds of ``name``'s step time / ``other``'s in the same round."""
    ratios = [a / b for a, b in zip(timings[name].samples_ms, timings[other].samples_ms)]
    if len(ratios) == 1:
        return ratios[0], ratios[0], ratios[0]
    low, median, high = statistics.quantiles(ratios, n=4)
    return low, statistics.median(ratios), high


# --- report --------------------------------------------------------------------------------------------------------

def short_name(name: str) -> str:
    """A peer's name for narrow places, e.g. ``checkpoint_sequential (4 segments)``."""
    if name.startswith("checkpoint_sequential"):
        return f"checkpoint_sequential ({name.split()[1]} segments)"
    return (name.replace("torch.compile, activation_memory_budget=", "torch.compile budget=")
            .replace("checkpoint every ODE block (ANODE by hand)", "checkpoint every block")
            .replace("torchdiffeq ", ""))


def fmt_err(err: float) -> str:
    return f"{err:.1e}"


def _predicted_ms(r: Measured) -> str:
    return "—" if r.predicted_ms is None else f"{r.predicted_ms:.0f}"


def _time_ratio(r: Measured, measured_ms: float) -> str:
    return "—" if r.predicted_ms is None else f"{r.predicted_ms / measured_ms:.3f}"


def _slowdown(r: Measured) -> str:
    return "—" if r.predicted_slowdown is None else f"{r.predicted_slowdown:.3f}x"


def ratio_errors(report: CompareReport) -> list[float]:
    """Per anode-plan row: its predicted slowdown over plain autograd against the measured paired ratio, less one."""
    return [r.predicted_slowdown / report.timings[r.name].ratio - 1 for r in report.results
            if r.predicted_slowdown is not None]


def prediction_errors(report: CompareReport) -> list[tuple[str, float]]:
    """(row, predicted step / measured median step - 1) for every anode-plan row."""
    return [(r.name, r.predicted_ms / report.timings[r.name].median_ms - 1) for r in report.results
            if r.predicted_ms is not None]


def results_table(report: CompareReport) -> str:
    header = ("| method | budget | plan | measured peak (MiB) | predicted peak (MiB) | predicted / measured | kernel "
              "at the peak | kept after forward (MiB) | budget held | predicted step (ms) | step (ms) | predicted / "
              "measured step | predicted vs plain | vs plain | ratio IQR | max rel. "
              "grad error vs float64 | first step / setup (s) |")
    rows = [header, "|" + "---|" * (header.count("|") - 1)]
    timings = report.timings
    for r in report.results:
        t = timings[r.name]
        budget = "—" if r.budget_bytes is None else f"{mib(r.budget_bytes)} MiB"
        if r.compile_fraction is not None:
            budget = f"fraction {r.compile_fraction:g}"
        predicted = "—" if r.predicted_peak_bytes is None else mib(r.predicted_peak_bytes)
        ratio = "—" if r.predicted_over_measured is None else f"{r.predicted_over_measured:.4f}"
        kernel = f"`{r.kernel_at_peak}`" if r.kernel_at_peak else "—"
        held = "—" if r.held is None else ("yes" if r.held else "**NO**")
        if r.compile_fraction is not None:
            setup = f"{r.first_step_s:.0f} (compile)"
        elif r.setup_s is not None:
            setup = f"{r.setup_s:.1f} (plan)"
        else:
            setup = f"{r.first_step_s:.1f}"
        name = f"**{r.name}**" if r.family.startswith("anode-plan") else r.name
        rows.append(f"| {name} | {budget} | {r.plan or '—'} | {mib(r.peak_bytes)} | {predicted} | {ratio} | "
                    f"{kernel} | {mib(r.kept_bytes)} | {held} | {_predicted_ms(r)} | {t.median_ms:.0f} | "
                    f"{_time_ratio(r, t.median_ms)} | {_slowdown(r)} | {t.ratio:.3f}x | "
                    f"{t.ratio_iqr[0]:.2f}-{t.ratio_iqr[1]:.2f} | {fmt_err(r.grad_rel_err)} | {setup} |")
    for inf in report.infeasible:
        peer = report.result(inf.budget_of)
        rows.append(f"| **anode-plan at the peak of: {inf.budget_of}** | {mib(inf.budget_bytes)} MiB | does not fit: "
                    f"minimum is {mib(inf.min_budget_bytes)} MiB | " + "— | " * 13 +
                    f"(the peer pays {fmt_err(peer.grad_rel_err)}) | — |")
    return "\n".join(rows)


@dataclass(frozen=True)
class HeadToHead:
    peer: Measured
    anode: Measured | None
    speed: float | None  # median over rounds of anode-plan's step time / the peer's
    speed_iqr: tuple[float, float] | None
    infeasible: Infeasible | None

    @property
    def verdict(self) -> str:
        """``"holds"``: median ratio <= SPEED_TOLERANCE; ``"noise"``: above it, but anode-plan was at least as fast
        in a quarter of the rounds or more; ``"missed"``: slower in more than three rounds of four."""
        if self.speed is None:
            return "infeasible"
        if self.speed <= SPEED_TOLERANCE:
            return "holds"
        return "noise" if self.speed_iqr[0] <= 1.0 else "missed"


def head_to_head(report: CompareReport) -> list[HeadToHead]:
    out = []
    for peer in (r for r in report.results if r.family == "peer"):
        anode = report.anode_for(peer.name)
        speed = speed_iqr = None
        if anode is not None:
            low, speed, high = paired_ratio(report.timings, anode.name, peer.name)
            speed_iqr = (low, high)
        infeasible = next((i for i in report.infeasible if i.budget_of == peer.name), None)
        out.append(HeadToHead(peer, anode, speed, speed_iqr, infeasible))
    return out


def headline_table(report: CompareReport) -> str:
    """The compact version: each peer beside anode-plan at the peer's peak."""
    header = ("| peer | peer peak (MiB) | peer time vs plain | peer grad error | anode-plan at that peak: time vs "
              "plain | anode-plan / peer time (IQR) | anode-plan grad error | held |")
    rows = [header, "|" + "---|" * (header.count("|") - 1)]
    for h in head_to_head(report):
        p = h.peer
        left = (f"| {short_name(p.name)} | {mib(p.peak_bytes)} | {report.timings[p.name].ratio:.2f}x | "
                f"{fmt_err(p.grad_rel_err)} |")
        if h.anode is None:
            rows.append(left + f" does not fit (minimum {mib(h.infeasible.min_budget_bytes)} MiB) | — | — | — |")
        else:
            a = h.anode
            rows.append(left + f" {report.timings[a.name].ratio:.2f}x | {h.speed:.2f} ({h.speed_iqr[0]:.2f}-"
                        f"{h.speed_iqr[1]:.2f}) | {fmt_err(a.grad_rel_err)} | {'yes' if a.held else '**NO**'} |")
    return "\n".join(rows)


def why_slower(report: CompareReport, h: HeadToHead) -> str:
    """A sentence on why anode-plan is slower than the peer ``h``, where the numbers say; else empty."""
    a = h.anode
    store_all_budget = budget_for_peak(report.store_all_predicted_bytes)
    if a.budget_bytes < store_all_budget <= 1.02 * a.budget_bytes:
        predicted = report.store_all_predicted_bytes
        where = (f"{predicted - a.budget_bytes} B above this budget" if predicted > a.budget_bytes else
                 f"within this budget, but a plan keeps {PREDICTION_RESERVE:.2%} of the budget free, so store-all "
                 f"needs {store_all_budget} B, {store_all_budget - a.budget_bytes} B more than this one")
        return (f" At {short_name(h.peer.name)}'s peak, store-all is predicted at {predicted} B (plain autograd "
                f"measured {report.result(PLAIN).peak_bytes} B), {where}; so the planner recomputes "
                f"({percent(a.predicted_recompute)} predicted) instead of storing every tape.")
    if a.predicted_recompute == 0.0:
        return (f" At {short_name(h.peer.name)}'s peak anode-plan stores every tape and recomputes nothing, so its "
                "step is plain eager autograd's; the peer takes "
                f"{paired_ratio(report.timings, h.peer.name, PLAIN)[1]:.2f}x plain autograd's time, faster than eager "
                "PyTorch itself.")
    return ""


def interpretation(report: CompareReport) -> list[str]:
    lines = []
    pairs = head_to_head(report)
    fitted = [h for h in pairs if h.anode is not None]
    faster = [h for h in fitted if h.verdict == "holds"]
    noisy = [h for h in fitted if h.verdict == "noise"]
    slower = [h for h in fitted if h.verdict == "missed"]
    over = [h for h in fitted if not h.anode.held]
    lines.append(f"anode-plan fits the measured peak of {len(fitted)} of {len(pairs)} peers; its measured peak stays "
                 f"within the budget at {len(fitted) - len(over)} of them" +
                 ("." if not over else f" (**over** at: {', '.join(short_name(h.peer.name) for h in over)})."))
    worst_anode = max((h.anode.grad_rel_err for h in fitted), default=float("nan"))
    lines.append(f"Gradient error against float64: plain autograd in float32 {fmt_err(report.plain64_err)} (float32 "
                 f"rounding); anode-plan at most {fmt_err(worst_anode)} over all its rows.")
    if faster:
        lines.append("**Headline holds** (anode-plan / peer paired step time <= "
                     f"{SPEED_TOLERANCE:.2f}) at: " +
                     "; ".join(f"{short_name(h.peer.name)} ({h.speed:.2f})" for h in faster) + ".")
    if noisy:
        lines.append(f"Within noise (median ratio above {SPEED_TOLERANCE:.2f}, but anode-plan was at least as fast in "
                     "a quarter of the rounds or more) at: " +
                     "; ".join(f"{short_name(h.peer.name)} ({h.speed:.2f}, IQR {h.speed_iqr[0]:.2f}-"
                               f"{h.speed_iqr[1]:.2f}, plan '{h.anode.plan}')" for h in noisy) + "." +
                     "".join(why_slower(report, h) for h in noisy))
    for h in slower:
        a = h.anode
        lines.append(f"**Headline missed** at {short_name(h.peer.name)} ({mib(a.budget_bytes)} MiB): anode-plan takes "
                     f"{h.speed:.2f}x the peer's time (IQR {h.speed_iqr[0]:.2f}-{h.speed_iqr[1]:.2f}), with the plan "
                     f"'{a.plan}': predicted peak {mib(a.predicted_peak_bytes)} MiB, predicted recompute "
                     f"{percent(a.predicted_recompute)}, measured peak {mib(a.peak_bytes)} MiB.{why_slower(report, h)}")
    if not any(h.infeasible for h in pairs):
        lowest = min((h.peer for h in pairs), key=lambda r: r.peak_bytes)
        line = (f"No peer's peak is below anode-plan's minimum budget, {mib(report.min_budget_bytes)} MiB; the lowest "
                f"is {short_name(lowest.name)} at {mib(lowest.peak_bytes)} MiB.")
        adjoint = next((h for h in pairs if h.peer.name == ADJOINT), None)
        if adjoint is not None and adjoint.anode is not None:
            p, a = adjoint.peer, adjoint.anode
            line += (f" Nor is the adjoint's: its forward keeps only {mib(p.kept_bytes)} MiB, but its reverse solve "
                     "(torchdiffeq's augmented state, and a vector-Jacobian product through f at every RK stage) "
                     f"peaks at {mib(p.peak_bytes)} MiB, "
                     f"{p.peak_bytes / report.min_budget_bytes:.2f}x anode-plan's minimum. At that peak anode-plan "
                     f"takes {adjoint.speed:.2f}x the adjoint's time with gradient error {fmt_err(a.grad_rel_err)} "
                     f"against the adjoint's {fmt_err(p.grad_rel_err)}.")
        lines.append(line)
    for h in pairs:
        if h.infeasible is not None:
            lines.append(f"{short_name(h.peer.name)} peaks at {mib(h.peer.peak_bytes)} MiB, below anode-plan's minimum "
                         f"of {mib(h.infeasible.min_budget_bytes)} MiB; it pays a gradient error of "
                         f"{fmt_err(h.peer.grad_rel_err)} (relative to the largest float64 gradient of a parameter).")
    compiled = [r for r in report.results if r.compile_fraction is not None]
    if compiled:
        lines.append("torch.compile: " + "; ".join(
            f"budget {r.compile_fraction:g}: compile {r.first_step_s:.0f} s, peak {mib(r.peak_bytes)} MiB, "
            f"{report.timings[r.name].ratio:.2f}x plain" for r in compiled) + ". anode-plan's own setup (trace, "
            "measure on fake tensors, calibrate the kernels' workspaces for real, plan) took " +
            ", ".join(sorted({f"{r.setup_s:.1f}" for r in report.results if r.family == "anode-plan"})) + " s.")
    predicted = [r for r in report.results if r.predicted_over_measured is not None]
    if predicted:
        ratios = [r.predicted_over_measured for r in predicted]
        off = [r for r in predicted if abs(r.predicted_over_measured - 1) > PREDICTION_TOLERANCE]
        lines.append(f"anode-plan's predicted peak is {min(ratios):.4f}x to {max(ratios):.4f}x its measured peak over "
                     f"its {len(predicted)} rows" + (
                         f"; **off by more than {PREDICTION_TOLERANCE:.0%}** at: " + ", ".join(
                             f"{short_name(r.budget_of)} ({r.predicted_over_measured:.4f})" for r in off) + "."
                         if off else f", within {PREDICTION_TOLERANCE:.0%} at every one."))
    errors = prediction_errors(report)
    if errors:
        values = [e for _, e in errors]
        worst = max(errors, key=lambda pair: abs(pair[1]))
        median_error = statistics.median(abs(e) for e in values)
        lines.append(f"anode-plan's predicted step (`plan.predicted_step_seconds`) is {min(values):+.1%} to "
                     f"{max(values):+.1%} off its measured median step over its {len(values)} rows, median |error| "
                     f"{median_error:.1%}, the worst at '{worst[0]}' ({worst[1]:+.1%}); target within 10% at every row "
                     f"({'met' if max(abs(e) for e in values) <= 0.10 else '**not met**'}) and 5% in the median "
                     f"({'met' if median_error <= 0.05 else '**not met**'}).")
        relative = ratio_errors(report)
        lines.append(f"As a ratio to plain autograd's step (predicted slowdown against the measured paired ratio, "
                     f"which the machine's speed cancels out of): {min(relative):+.1%} to {max(relative):+.1%}, median "
                     f"|error| {statistics.median(abs(e) for e in relative):.1%}.")
    busy = max(report.load_before[0], report.load_after[0])
    if busy > report.config.num_threads:
        lines.append(f"The machine was shared while this ran (1-minute load average {report.load_before[0]:.1f} "
                     f"before, {report.load_after[0]:.1f} after, on {os.cpu_count()} CPUs): step times are noisy, the "
                     "per-round paired ratios are more trustworthy than the milliseconds, and the IQR column shows "
                     "the spread.")
    return lines


def section_title(config: CompareConfig) -> str:
    return CUDA_SECTION_TITLE if config.device.startswith("cuda") else SECTION_TITLE


def render_section(report: CompareReport, plot_name: str | None, extra: list[str] | tuple[str, ...] = ()) -> str:
    """The RESULTS.md section; ``extra``: lines appended at its end (the compiled mode's part)."""
    config = report.config
    solver = ", ".join(f"{name} {diff:.1e}" for name, diff in report.solver_match.items())
    lines = [
        section_title(config),
        "",
        f"Written by `benchmarks/compare.py`{' --quick (a smoke run, not representative)' if config.quick else ''} "
        f"in {report.runtime_s:.0f} s.",
        "",
        f"- Machine: {report.machine}; 1-minute load average {report.load_before[0]:.2f} before, "
        f"{report.load_after[0]:.2f} after.",
        f"- Library: {report.source}.",
        f"- Model: `{config.model_call()}`, float32, train mode, batch {config.batch_size}, input "
        f"{example_input_shape('ode_resnet', config.batch_size)}, cross-entropy loss; every method runs this model "
        f"object (same parameters and batch), each step as {TRAIN_STEP_FORM}.",
        (f"- Same ODE: torchdiffeq's fixed-grid '{'midpoint' if config.method == 'rk2' else config.method}' on the "
         f"blocks' own time grid; its forward output matches the ODE blocks' in float64 to {solver} (relative)."
         if report.solver_match else "- torchdiffeq is not installed: its peers were not run."),
        ("- Measured peak: `anode_plan.measure_peak_memory(device=cuda)` of one warm training step, that is "
         "`torch.cuda.max_memory_allocated()` over the step minus `memory_allocated()` before it, for every row."
         if config.device.startswith("cuda") else
         "- Measured peak: `anode_plan.measure_peak_memory` of one warm training step, the same meter for every "
         "row, peers and anode-plan alike: the CPU allocator's allocations and frees, recorded by torch.profiler "
         "(`profile_memory=True`) and replayed in time order, on top of what was allocated before the step. It "
         "counts what kernels allocate inside themselves (workspaces) and the buffers of inductor's generated code; "
         "the profiler leaves TorchDynamo running the compiled code. \"Kernel at the peak\" is the ATen op whose "
         "allocation made the peak. \"Kept after forward\": what is still allocated right after the forward and "
         "the loss (`anode_plan.AllocatorMeter`, a mark after the loss and `allocated_bytes` there)."),
        f"- Step time: median over {config.repeats} rounds, each running every method once in a rotated order; "
        "\"vs plain\" is the median of the per-round ratios to plain autograd.",
        "- Grad error: max over parameters of max|g - g64| / max|g64|, against plain autograd in float64 on the same "
        "weights and batch (the float32 methods cannot go below float32 rounding, about 1e-6).",
        "- anode-plan: `anode_plan.compile(model, memory_budget=<the peer's measured peak in bytes>, "
        "example_inputs=(x,))`, default planner, calibrated (each distinct stage run once for real to measure its "
        "kernels' workspaces); \"budget held\": measured peak <= budget; predicted peak: "
        "`plan.predicted_peak_bytes`. \"setup\" is the time of that call, calibration included.",
    ]
    if not config.device.startswith("cuda"):
        lines.append("- CUDA: `python benchmarks/compare.py --device cuda --write` on a GPU machine writes the section "
                     f"\"{CUDA_SECTION_TITLE[3:]}\" and `compare-cuda.png`, every peak from "
                     "`torch.cuda.max_memory_allocated`" + ("." if torch.cuda.is_available() else
                                                           "; the machine of this run had no CUDA device."))
    lines.append("")
    if report.skipped:
        lines += [f"Skipped: {s}." for s in report.skipped] + [""]
    lines += [results_table(report), "", "Each peer beside anode-plan at the peer's measured peak (\"anode-plan / "
              "peer time\" is the median of the per-round paired ratios):", "", headline_table(report), ""]
    if plot_name:
        lines += [f"![Measured peak against step time for every method; anode-plan at each peer's peak]({plot_name})",
                  ""]
    lines += ["Interpretation:", "", *(f"- {line}" for line in interpretation(report)), ""]
    lines += extra
    return "\n".join(lines)


def plot(report: CompareReport, path: Path) -> bool:
    """Peak against step time: peers, and anode-plan at each peer's peak; a second panel with the gradient errors."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed; no plot (pip install -e \".[bench]\")")
        return False
    fig, (ax, ax_err) = plt.subplots(1, 2, figsize=(13, 5.6), gridspec_kw={"width_ratios": [1.45, 1]})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    pairs = head_to_head(report)
    for k, h in enumerate(pairs):
        color = colors[k % len(colors)]
        p = h.peer
        px, py = p.peak_bytes / MIB, report.timings[p.name].ratio
        ax.scatter([px], [py], color=color, s=60, zorder=3, label=short_name(p.name))
        if h.anode is not None:
            qx, qy = h.anode.peak_bytes / MIB, report.timings[h.anode.name].ratio
            ax.scatter([qx], [qy], color=color, marker="*", s=170, edgecolor="black", linewidth=0.6, zorder=4)
            ax.annotate("", xy=(qx, qy), xytext=(px, py),
                        arrowprops=dict(arrowstyle="->", color=color, lw=1.1, alpha=0.7, shrinkA=4, shrinkB=6))
        if p.grad_rel_err > 1e-3:
            ax.annotate(f"grad error {p.grad_rel_err:.1e}", (px, py), textcoords="offset points", xytext=(6, 7),
                        fontsize=8, color=color)
    ax.margins(x=0.12, y=0.1)
    ax.axvline(report.min_budget_bytes / MIB, color="gray", ls="--", lw=1)
    ax.annotate("anode-plan\nminimum budget", (report.min_budget_bytes / MIB, 1), xycoords=("data", "axes fraction"),
                xytext=(3, -3), textcoords="offset points", va="top", fontsize=8, color="gray")
    ax.scatter([], [], marker="*", s=150, color="white", edgecolor="black", label="anode-plan at that peer's peak")
    inductor = [r for r in report.results if r.backend == "inductor"]
    if inductor:
        ax.scatter([r.peak_bytes / MIB for r in inductor], [report.timings[r.name].ratio for r in inductor],
                   marker="D", s=55, color="tab:purple", edgecolor="black", linewidth=0.6, zorder=5,
                   label="anode-plan backend=\"inductor\"")
    ax.set_xlabel("measured peak memory of a training step (MiB, allocator)")
    ax.set_ylabel("step time / plain autograd (median of paired ratios)")
    ax.set_title("Each peer (dot) and anode-plan given the peer's peak as budget (star)", fontsize=10)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()

    rows = list(report.results)
    names = [(("anode-plan inductor @ " if r.backend == "inductor" else "anode-plan @ ") + short_name(r.budget_of))
             if r.budget_of is not None and r.family != "peer" else short_name(r.name) for r in rows]
    errors = [max(r.grad_rel_err, 1e-17) for r in rows]
    bar_colors = ["tab:purple" if r.backend == "inductor" else "tab:green" if r.family != "peer" else
                  ("tab:red" if r.name == ADJOINT else "tab:gray") for r in rows]
    ax_err.barh(range(len(rows)), errors, color=bar_colors)
    ax_err.set_yticks(range(len(rows)), names, fontsize=8)
    ax_err.invert_yaxis()
    ax_err.set_xscale("log")
    ax_err.axvline(report.plain64_err, color="black", lw=0.8, ls=":")
    ax_err.set_xlabel("max relative gradient error vs float64")
    ax_err.set_title("Gradient error (dotted: plain autograd, float32)", fontsize=10)
    ax_err.grid(axis="x", alpha=0.3)
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8.5, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True
