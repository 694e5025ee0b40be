"""ANODE's gradient claim, reproduced: the adjoint's gradients are inconsistent, checkpointing's are exact.

ANODE (Gholami, Keutzer and Biros, arXiv 1902.10298) shows that the Neural-ODE adjoint,
which reconstructs the forward states by solving the ODE backwards in time, gives
gradients that differ from the gradient of the network that was actually run, badly so
for conv + ReLU + norm blocks, while checkpointing (discretize-then-optimize) is exact.
This script measures both on an ODE-ResNet (f = conv3x3-norm-ReLU-conv3x3-norm):

1. **Training.** Three runs from the same initial weights over the same batches of a
   synthetic image-classification set (class prototypes plus noise; nothing is
   downloaded): plain autograd; anode-plan at its tightest budget (the minimum,
   ``InfeasibleBudgetError.min_budget_bytes``); and torchdiffeq's ``odeint_adjoint`` on
   the same blocks (same fixed-step method and grid, same parameters). Loss per step,
   held-out accuracy at the end, and the measured peak of one step of each
   (``anode_plan.measure_peak_memory``: the allocator's peak, on the CPU from the
   profiler's allocation events, kernel workspaces included).
2. **Gradient error, in float64.** At several points of the plain run (training
   progress) and for several step counts Nt, the relative gradient error of
   ``odeint_adjoint``, of ``odeint`` (backprop through torchdiffeq's solver, a sanity
   check that the solvers agree) and of anode-plan at every landmark budget (store-all,
   ANODE, minimum and points between; a landmark's budget is ``anode_plan.budget_for_peak``
   of its predicted peak) against plain autograd: max over parameters of
   max|g - g_exact| / max|g_exact|.

Run from the repository root::

    PYTHONPATH=. python benchmarks/gradient_accuracy.py --quick   # smoke run, about a minute
    PYTHONPATH=. python benchmarks/gradient_accuracy.py --write   # full run; RESULTS.md + gradient_accuracy.png
    PYTHONPATH=. python benchmarks/gradient_accuracy.py --device cuda --write   # the training runs on a GPU

Needs torchdiffeq (``pip install -e ".[bench]"``); without it, only anode-plan's rows are measured.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP; see budget_sweep.py

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import anode_plan  # noqa: E402
import planners  # noqa: E402
from _common import (RESULTS_PATH, clear_grads, gradients, load_average, log, machine_info,  # noqa: E402
                     max_relative_grad_error, mib, min_budget_bytes, publish_section, source_version)
from _peers import torchdiffeq_missing, torchdiffeq_model  # noqa: E402
from models import ode_resnet  # noqa: E402

SECTION_TITLE = "## Gradient accuracy: the adjoint against exact backprop"
DEFAULT_PLOT = Path(__file__).resolve().parent / "gradient_accuracy.png"
HUGE_BUDGET_BYTES = 2**50
CPU_METER = ("the CPU allocator's peak: torch.profiler's allocation and free events replayed in time order, "
             "kernel workspaces included")


@dataclass(frozen=True)
class AccuracyConfig:
    width: int = 8
    stages: int = 2
    train_nts: tuple[int, ...] = (1, 4)  # of the training runs; the last one's plain run gives the weights
    nts: tuple[int, ...] = (1, 2, 4, 8, 16)  # of the float64 error table
    method: str = "rk2"
    norm: str = "batch"
    image_size: int = 16
    batch_size: int = 32
    train_size: int = 2048
    test_size: int = 512
    steps: int = 200
    lr: float = 0.05
    momentum: float = 0.9
    snapshots: int = 4  # points of training progress in the error table, step 0 and the last included
    budgets_between: int = 3  # budgets between store-all and the minimum, besides the landmarks
    seed: int = 0
    num_threads: int = 2
    device: str = "cpu"
    quick: bool = False

    def model_call(self, nt: int | str = "Nt") -> str:
        return (f"ode_resnet(width={self.width}, stages={self.stages}, nt={nt}, method={self.method!r}, "
                f"norm={self.norm!r}, in_channels=1, seed={self.seed})")

    def build(self, nt: int) -> nn.Module:
        return ode_resnet(width=self.width, stages=self.stages, nt=nt, method=self.method, norm=self.norm,
                          in_channels=1, seed=self.seed).train()


# --- data ----------------------------------------------------------------------------------------------------------

def synthetic_images(count: int, size: int, seed: int, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` one-channel ``size`` x ``size`` images in ``classes`` classes, from ``seed`` alone.

    Each class has a smooth random prototype (4x4 noise upsampled); an image is its
    class's prototype at a random contrast, shifted by up to 2 pixels, plus white noise
    of about the prototype's size, so a small network learns it in a few hundred steps
    and does not reach 100% at once. The prototypes depend only on ``classes`` and
    ``size``, so sets drawn with different seeds are the same task.
    """
    prototypes = F.interpolate(torch.randn(classes, 1, 4, 4, generator=torch.Generator().manual_seed(1234)),
                               size=(size, size), mode="bilinear", align_corners=False)
    prototypes = prototypes / prototypes.flatten(1).std(dim=1).view(-1, 1, 1, 1)
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (count,), generator=generator)
    contrast = 0.5 + torch.rand(count, 1, 1, 1, generator=generator)
    shifts = torch.randint(-2, 3, (count, 2), generator=generator)
    images = torch.stack([torch.roll(prototypes[c], (int(dy), int(dx)), dims=(1, 2))
                          for c, (dy, dx) in zip(labels.tolist(), shifts)])
    images = contrast * images + 1.0 * torch.randn(count, 1, size, size, generator=generator)
    return images, labels


# --- training ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainingRun:
    name: str
    nt: int
    losses: tuple[float, ...]
    test_accuracy: float
    peak_bytes: int
    peak_method: str
    time_s: float
    snapshots: tuple[tuple[int, dict], ...] = ()  # (step, state_dict) of the plain run


def train(name: str, nt: int, model: nn.Module, forward: nn.Module, config: AccuracyConfig, data: tuple, test: tuple,
          snapshot_steps: tuple[int, ...] = ()) -> TrainingRun:
    """SGD with momentum over the same batches as every other run; ``forward`` shares ``model``'s parameters."""
    device = torch.device(config.device)
    images, labels = (t.to(device) for t in data)
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(config.seed + 1)).to(device)
    batches_per_epoch = len(labels) // config.batch_size
    losses, snapshots = [], []
    peak = None
    began = time.perf_counter()
    for step in range(config.steps):
        if step in snapshot_steps:
            snapshots.append((step, copy.deepcopy(model.state_dict())))
        k = step % batches_per_epoch
        idx = order[k * config.batch_size:(k + 1) * config.batch_size]
        x, y = images[idx], labels[idx]
        optimizer.zero_grad(set_to_none=True)
        if step == 1:  # a warm step: measure its peak (gradients cleared, as in every step)
            holder = {}
            peak = anode_plan.measure_peak_memory(
                lambda: holder.setdefault("loss", _loss_backward(forward, x, y)), device=device)
            loss = holder["loss"]
        else:
            loss = _loss_backward(forward, x, y)
        optimizer.step()
        losses.append(loss)
        if not math.isfinite(loss):
            log(f"  {name}: loss is {loss} at step {step}; stopping this run")
            break
    if config.steps in snapshot_steps:
        snapshots.append((config.steps, copy.deepcopy(model.state_dict())))
    elapsed = time.perf_counter() - began
    with torch.no_grad():  # batch statistics, as in training: the adjoint's reverse solve also moved the running ones
        test_x, test_y = (t.to(device) for t in test)
        correct = sum(int((forward(test_x[i:i + 256]).argmax(1) == test_y[i:i + 256]).sum())
                      for i in range(0, len(test_y), 256))
    return TrainingRun(name, nt, tuple(losses), correct / len(test_y), peak.peak_bytes if peak else 0,
                       peak.method if peak else "", elapsed, tuple(snapshots))


def _loss_backward(forward: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    loss = F.cross_entropy(forward(x), y)
    loss.backward()
    return float(loss.detach())


# --- gradient errors in float64 ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ErrorPoint:
    """Relative gradient errors against plain autograd, float64, at one step count and training step."""

    nt: int
    train_step: int
    adjoint: float | None
    odeint: float | None
    anode_plan: tuple[float, ...]  # one per budget
    exact_grad_max: float


@dataclass(frozen=True)
class BudgetSet:
    nt: int
    budgets_bytes: tuple[int, ...]
    plans: tuple[str, ...]


def landmark_budgets(model: nn.Module, x: torch.Tensor, between: int) -> list[int]:
    """The store-all, ANODE and minimum budgets, and ``between`` more, geometrically from store-all to the minimum.

    The store-all and ANODE budgets are :func:`anode_plan.budget_for_peak` of those schedules' predicted peaks.
    """
    store_all = anode_plan.compile(model, HUGE_BUDGET_BYTES, (x,), planner=planners.StoreAll()).plan
    anode = anode_plan.compile(model, HUGE_BUDGET_BYTES, (x,), planner=planners.Anode()).plan
    high, low = anode_plan.budget_for_peak(store_all.predicted_peak_bytes), min_budget_bytes(model, x)
    points = [round(high * (low / high) ** (k / (between + 1))) for k in range(1, between + 1)] if high > low else []
    return sorted({high, anode_plan.budget_for_peak(anode.predicted_peak_bytes), low, *points}, reverse=True)


def error_table(config: AccuracyConfig, snapshots: tuple[tuple[int, dict], ...], x: torch.Tensor,
                y: torch.Tensor) -> tuple[list[ErrorPoint], list[BudgetSet]]:
    """For every Nt: plan at every budget once, then for every snapshot compare the gradients in float64."""
    has_torchdiffeq = torchdiffeq_missing() is None
    x64 = x.double()
    points, budget_sets = [], []
    for nt in config.nts:
        model = config.build(nt).double()
        params = list(model.parameters())
        budgets = landmark_budgets(model, x64, config.budgets_between)
        compiled = [anode_plan.compile(model, b, (x64,)) for b in budgets]
        budget_sets.append(BudgetSet(nt, tuple(budgets), tuple(c.plan.schedule.description for c in compiled)))
        variants = {}
        if has_torchdiffeq:
            variants = {"adjoint": torchdiffeq_model(model, adjoint=True),
                        "odeint": torchdiffeq_model(model, adjoint=False)}
        for step, state in snapshots:
            model.load_state_dict(state)  # in place: the compiled models and variants share these parameters

            def grads_of(forward: nn.Module) -> list[torch.Tensor]:
                clear_grads(params)
                F.cross_entropy(forward(x64), y).backward()
                return gradients(params)

            exact = grads_of(model)
            errors = {name: max_relative_grad_error(grads_of(v), exact) for name, v in variants.items()}
            planned = tuple(max_relative_grad_error(grads_of(c), exact) for c in compiled)
            points.append(ErrorPoint(nt, step, errors.get("adjoint"), errors.get("odeint"), planned,
                                     max(float(g.abs().max()) for g in exact)))
            log(f"  nt={nt:<3} step {step:<4} adjoint {errors.get('adjoint', float('nan')):.2e}  odeint "
                f"{errors.get('odeint', float('nan')):.1e}  anode-plan max {max(planned):.1e} over {len(planned)} "
                "budgets")
    return points, budget_sets


# --- report --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AccuracyReport:
    config: AccuracyConfig
    runs: tuple[TrainingRun, ...]
    tight: dict[int, tuple[int, str]]  # Nt -> (anode-plan's minimum budget in bytes, its plan)
    points: tuple[ErrorPoint, ...]
    budget_sets: tuple[BudgetSet, ...]
    skipped: str | None
    machine: str
    source: str
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    runtime_s: float


def fmt(err: float | None) -> str:
    return "—" if err is None else f"{err:.1e}"


def error_markdown(report: AccuracyReport) -> str:
    steps = sorted({p.train_step for p in report.points})
    header = ("| Nt | " + " | ".join(f"adjoint, step {s}" for s in steps) + " | odeint (backprop), max | "
              "anode-plan, max over budgets and steps | budgets |")
    rows = [header, "|" + "---|" * (header.count("|") - 1)]
    for budget_set in report.budget_sets:
        nt_points = {p.train_step: p for p in report.points if p.nt == budget_set.nt}
        odeint = [p.odeint for p in nt_points.values() if p.odeint is not None]
        planned = max(max(p.anode_plan) for p in nt_points.values())
        rows.append(f"| {budget_set.nt} | " + " | ".join(fmt(nt_points[s].adjoint) for s in steps) +
                    f" | {fmt(max(odeint) if odeint else None)} | {fmt(planned)} | {len(budget_set.budgets_bytes)}: "
                    f"{mib(min(budget_set.budgets_bytes))}-{mib(max(budget_set.budgets_bytes))} MiB |")
    return "\n".join(rows)


TAIL_STEPS = 20


def final_loss(run: TrainingRun) -> float:
    """The mean loss of the last :data:`TAIL_STEPS` steps (one step's loss is noisy)."""
    tail = run.losses[-TAIL_STEPS:]
    return sum(tail) / len(tail)


def plain_run(report: AccuracyReport, nt: int) -> TrainingRun:
    return next(r for r in report.runs if r.nt == nt and r.name == "plain autograd")


def loss_gap(run: TrainingRun, plain: TrainingRun) -> float:
    n = min(len(plain.losses), len(run.losses))
    return max(abs(a - b) for a, b in zip(plain.losses[:n], run.losses[:n]))


def training_markdown(report: AccuracyReport) -> str:
    header = (f"| Nt | run | final loss (mean of last {TAIL_STEPS} steps) | held-out accuracy | max abs loss "
              "difference from plain, any step | measured peak (MiB) | time (s) |")
    rows = [header, "|" + "---|" * (header.count("|") - 1)]
    for run in report.runs:
        rows.append(f"| {run.nt} | {run.name} | {final_loss(run):.4f} | {100 * run.test_accuracy:.1f}% | "
                    f"{loss_gap(run, plain_run(report, run.nt)):.2e} | {mib(run.peak_bytes)} | {run.time_s:.1f} |")
    return "\n".join(rows)


def budget_note(report: AccuracyReport, run: TrainingRun) -> str:
    """For anode-plan's run: whether its measured peak held its budget; else empty."""
    if run.nt not in report.tight or not run.name.startswith("anode-plan"):
        return ""
    budget = report.tight[run.nt][0]
    if run.peak_bytes <= budget:
        return f", within its budget of {budget} B ({run.peak_bytes} B measured)"
    return f", **over its budget** of {budget} B by {run.peak_bytes - budget} B"


def interpretation(report: AccuracyReport) -> list[str]:
    lines = []
    adjoint = [p for p in report.points if p.adjoint is not None]
    planned = max(max(p.anode_plan) for p in report.points)
    budgets = sum(len(b.budgets_bytes) for b in report.budget_sets)
    lines.append(f"anode-plan's gradients match plain autograd in float64 to {planned:.1e} at all {budgets} budgets of "
                 f"{len(report.budget_sets)} step counts and {len({p.train_step for p in report.points})} points of "
                 "training (0 means bit-for-bit: the same operations in the same order, only recomputed).")
    if adjoint:
        odeint = max(p.odeint for p in adjoint)
        lo, hi = min(adjoint, key=lambda p: p.adjoint), max(adjoint, key=lambda p: p.adjoint)
        lines.append(f"torchdiffeq's `odeint` (backprop through the same solver) matches to {odeint:.1e}, so the "
                     "solvers agree; the adjoint's error comes from the adjoint alone. It ranges from "
                     f"{lo.adjoint:.1e} (Nt={lo.nt}, step {lo.train_step}) to {hi.adjoint:.1e} (Nt={hi.nt}, step "
                     f"{hi.train_step}).")
        by_nt = {}
        for p in adjoint:
            by_nt.setdefault(p.nt, []).append(p.adjoint)
        nts = sorted(by_nt)
        trend = ", ".join(f"Nt={nt}: {max(by_nt[nt]):.1e}" for nt in nts)
        lines.append(f"Worst adjoint error per Nt over training: {trend}.")
        steps = sorted({p.train_step for p in adjoint})
        first = [p.adjoint for p in adjoint if p.train_step == steps[0]]
        last = [p.adjoint for p in adjoint if p.train_step == steps[-1]]
        first_median, last_median = sorted(first)[len(first) // 2], sorted(last)[len(last) // 2]
        lines.append(f"Along training, the adjoint's error (median over Nt) goes from {first_median:.1e} at step "
                     f"{steps[0]} to {last_median:.1e} at step {steps[-1]}.")
    for run in report.runs:
        if run.name == "plain autograd":
            continue
        plain = plain_run(report, run.nt)
        lines.append(f"Nt={run.nt}, {run.name}: loss differs from plain autograd by at most {loss_gap(run, plain):.2e} "
                     f"over {len(run.losses)} steps; final loss {final_loss(run):.4f} vs {final_loss(plain):.4f}, "
                     f"held-out accuracy {100 * run.test_accuracy:.1f}% vs {100 * plain.test_accuracy:.1f}%; measured "
                     f"peak {mib(run.peak_bytes)} MiB vs {mib(plain.peak_bytes)} MiB" + budget_note(report, run) + ".")
    busy = max(report.load_before[0], report.load_after[0])
    if busy > report.config.num_threads:
        lines.append(f"The machine was shared (1-minute load average {report.load_before[0]:.1f} before, "
                     f"{report.load_after[0]:.1f} after, on {os.cpu_count()} CPUs); only the times are affected.")
    return lines


def render_section(report: AccuracyReport, plot_name: str | None) -> str:
    c = report.config
    title = SECTION_TITLE + (" (CUDA training runs)" if c.device.startswith("cuda") else "")
    lines = [
        title, "",
        f"Written by `benchmarks/gradient_accuracy.py`{' --quick (a smoke run, not representative)' if c.quick else ''}"
        f" in {report.runtime_s:.0f} s.", "",
        f"- Machine: {report.machine}; 1-minute load average {report.load_before[0]:.2f} before, "
        f"{report.load_after[0]:.2f} after.",
        f"- Library: {report.source}.",
        f"- Model: `{c.model_call()}` (f = conv3x3-BatchNorm-ReLU-conv3x3-BatchNorm), train mode, on synthetic "
        f"{c.image_size}x{c.image_size} one-channel images in 10 classes (class prototypes at random contrast and "
        f"shift plus noise; {c.train_size} for training, {c.test_size} held out; generated from a seed).",
        f"- Training: at Nt = {', '.join(map(str, c.train_nts))}, {c.steps} steps of SGD (lr {c.lr}, momentum "
        f"{c.momentum}), batch {c.batch_size}, float32 on {c.device}, the same initial weights and batches for every "
        "run. anode-plan runs at its minimum budget: " + "; ".join(
            f"Nt={nt}: {mib(b)} MiB ({b} B), '{plan}'" for nt, (b, plan) in report.tight.items()) + ". The adjoint "
        f"is torchdiffeq's `odeint_adjoint` on the same blocks "
        f"({'fixed-grid midpoint = RK2' if c.method == 'rk2' else 'Euler'}, "
        "the blocks' time grid). Peaks: `anode_plan.measure_peak_memory` of step 1"
        f" ({'torch.cuda.max_memory_allocated' if c.device.startswith('cuda') else CPU_METER})" + ". "
        "Held-out accuracy uses batch statistics (train-mode BatchNorm), since the adjoint's reverse solve also "
        "updates the running ones.",
        f"- Error table: float64, batch {c.batch_size} of the training set; the weights of the Nt={c.train_nts[-1]} "
        "plain run at "
        f"{c.snapshots} points of training, each with the ODE blocks set to Nt = {', '.join(map(str, c.nts))} steps. "
        "Error = max over parameters of max|g - g_exact| / max|g_exact|, exact = plain autograd in float64. "
        "anode-plan (default planner): the store-all, ANODE and minimum budgets and "
        f"{c.budgets_between} spaced geometrically between store-all and the minimum.",
    ]
    if not c.device.startswith("cuda"):
        lines.append("- CUDA: `--device cuda --write` runs the training comparison on a GPU (peaks from "
                     "`torch.cuda.max_memory_allocated`) and writes its own section" +
                     ("." if torch.cuda.is_available() else "; the machine of this run had no CUDA device."))
    lines.append("")
    if report.skipped:
        lines += [f"Skipped: {report.skipped}.", ""]
    lines += ["Relative gradient error against exact backprop (float64):", "", error_markdown(report), "",
              "Training runs:", "", training_markdown(report), ""]
    if plot_name:
        lines += [f"![Adjoint gradient error against Nt and training step; loss curves of plain, anode-plan and the "
                  f"adjoint]({plot_name})", ""]
    lines += ["Interpretation:", "", *(f"- {line}" for line in interpretation(report)), ""]
    return "\n".join(lines)


SMOOTHING_STEPS = 10


def moving_average(values: tuple[float, ...], window: int) -> list[float]:
    """Means of every ``window`` consecutive values (all of them, if there are fewer)."""
    window = min(window, len(values))
    return [sum(values[i:i + window]) / window for i in range(len(values) - window + 1)]


def plot(report: AccuracyReport, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed; no plot (pip install -e \".[bench]\")")
        return False
    floor = 1e-17
    nts_trained = sorted({r.nt for r in report.runs})
    fig, (ax_err, *loss_axes) = plt.subplots(1, 1 + len(nts_trained), figsize=(5.2 * (1 + len(nts_trained)), 4.8))
    steps = sorted({p.train_step for p in report.points})
    cmap = plt.get_cmap("Reds")
    for k, step in enumerate(steps):
        pts = sorted((p for p in report.points if p.train_step == step and p.adjoint is not None), key=lambda p: p.nt)
        if pts:
            shade = 0.35 + 0.65 * k / max(1, len(steps) - 1)
            ax_err.plot([p.nt for p in pts], [p.adjoint for p in pts], "o-", color=cmap(shade),
                        label=f"odeint_adjoint, weights at step {step}")
    nts = [b.nt for b in report.budget_sets]
    odeint = [max((p.odeint or 0.0) for p in report.points if p.nt == nt) for nt in nts]
    if any(p.odeint is not None for p in report.points):
        ax_err.plot(nts, [max(e, floor) for e in odeint], "s--", color="tab:gray", label="odeint (backprop), max")
    planned = [max(max(p.anode_plan) for p in report.points if p.nt == nt) for nt in nts]
    ax_err.plot(nts, [max(e, floor) for e in planned], "*-", color="tab:green", markersize=11,
                label="anode-plan, max over all budgets and steps")
    ax_err.axhline(2.2e-16, color="black", lw=0.7, ls=":")
    ax_err.text(nts[0], 2.2e-16, " float64 eps", va="bottom", fontsize=8)
    ax_err.set_xscale("log", base=2)
    ax_err.set_yscale("log")
    ax_err.set_ylim(floor / 3, 10)
    ax_err.set_xticks(nts, [str(n) for n in nts])
    ax_err.set_xlabel("time steps per ODE block (Nt)")
    ax_err.set_ylabel("max relative gradient error vs exact (float64)")
    ax_err.set_title("Gradient error against exact backprop\n(0 is drawn at 1e-17)", fontsize=10)
    ax_err.grid(alpha=0.3)
    ax_err.legend(fontsize=7.5, loc="center right")

    styles = {"plain autograd": dict(color="tab:blue", lw=2.4, alpha=0.8),
              "anode-plan, minimum budget": dict(color="tab:green", lw=1.2, ls="--"),
              "odeint_adjoint": dict(color="tab:red", lw=1.2)}
    for ax_loss, nt in zip(loss_axes, nts_trained):
        for run in (r for r in report.runs if r.nt == nt):
            smooth = moving_average(run.losses, SMOOTHING_STEPS)
            ax_loss.plot(range(SMOOTHING_STEPS - 1, SMOOTHING_STEPS - 1 + len(smooth)), smooth,
                         label=f"{run.name} (held-out {100 * run.test_accuracy:.0f}%)", **styles.get(run.name, {}))
        ax_loss.set_xlabel("training step")
        ax_loss.set_ylabel(f"training loss, mean of the last {SMOOTHING_STEPS} steps")
        ax_loss.set_title(f"Training at Nt={nt} ({report.config.method}), float32", fontsize=10)
        ax_loss.grid(alpha=0.3)
        ax_loss.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


# --- main ----------------------------------------------------------------------------------------------------------

def run(config: AccuracyConfig) -> AccuracyReport:
    began = time.perf_counter()
    load_before = load_average()
    torch.set_num_threads(config.num_threads)
    device = torch.device(config.device)
    data = synthetic_images(config.train_size, config.image_size, seed=config.seed)
    test = synthetic_images(config.test_size, config.image_size, seed=config.seed + 10_000)
    skipped = torchdiffeq_missing()
    if skipped:
        log(skipped)

    snapshot_steps = tuple(sorted({round(k * config.steps / (config.snapshots - 1)) for k in range(config.snapshots)}))
    runs, tight = [], {}
    for nt in config.train_nts:
        initial = config.build(nt)
        log(f"training {config.model_call(nt)} for {config.steps} steps on {device}")
        model = copy.deepcopy(initial).to(device)
        snapshots_here = snapshot_steps if nt == config.train_nts[-1] else ()
        runs.append(train("plain autograd", nt, model, model, config, data, test, snapshots_here))
        log(f"  plain autograd: final loss {runs[-1].losses[-1]:.4f} ({runs[-1].time_s:.0f} s)")

        model = copy.deepcopy(initial).to(device)
        x0 = data[0][:config.batch_size].to(device)
        budget = min_budget_bytes(model, x0)
        compiled = anode_plan.compile(model, budget, (x0,))
        tight[nt] = (budget, compiled.plan.schedule.description)
        runs.append(train("anode-plan, minimum budget", nt, model, compiled, config, data, test))
        log(f"  anode-plan at {mib(budget)} MiB ({tight[nt][1]}): final loss {runs[-1].losses[-1]:.4f}")
        if not skipped:
            model = copy.deepcopy(initial).to(device)
            runs.append(train("odeint_adjoint", nt, model, torchdiffeq_model(model, adjoint=True), config, data,
                              test))
            log(f"  odeint_adjoint: final loss {runs[-1].losses[-1]:.4f}")

    log("gradient errors in float64")
    source = next(r for r in runs if r.snapshots)
    snapshots = tuple((step, {k: v.cpu() for k, v in state.items()}) for step, state in source.snapshots)
    points, budget_sets = error_table(config, snapshots, data[0][:config.batch_size], data[1][:config.batch_size])
    return AccuracyReport(config=config, runs=tuple(runs), tight=tight,
                          points=tuple(points), budget_sets=tuple(budget_sets), skipped=skipped,
                          machine=machine_info(config.num_threads) if device.type == "cpu" else
                          f"{torch.cuda.get_device_name(device)} (training runs), torch {torch.__version__}",
                          source=source_version(), load_before=load_before, load_after=load_average(),
                          runtime_s=time.perf_counter() - began)


def parse_args(argv: list[str] | None = None) -> tuple[AccuracyConfig, Path | None, Path | None]:
    d = AccuracyConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--width", type=int, default=d.width, help="channels of the first stage")
    parser.add_argument("--stages", type=int, default=d.stages, help="resolution stages, one ODE block each")
    parser.add_argument("--train-nts", type=int, nargs="+", default=list(d.train_nts),
                        help="time steps per ODE block of the training runs; the last one's plain run gives the "
                             "weights of the error table")
    parser.add_argument("--nts", type=int, nargs="+", default=list(d.nts), help="step counts of the error table")
    parser.add_argument("--method", default=d.method, choices=["euler", "rk2"], help="ODE solver")
    parser.add_argument("--norm", default=d.norm, choices=["batch", "group"], help="normalisation layer")
    parser.add_argument("--steps", type=int, default=d.steps, help="training steps per run")
    parser.add_argument("--lr", type=float, default=d.lr, help="SGD learning rate")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="images per step")
    parser.add_argument("--snapshots", type=int, default=d.snapshots, help="points of training in the error table")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of the weights, data and batch order")
    parser.add_argument("--threads", type=int, default=d.num_threads, help="torch.set_num_threads")
    parser.add_argument("--device", default=d.device, help="device of the training runs: cpu or cuda")
    parser.add_argument("--quick", action="store_true", help="smoke run: 20 steps, Nt in 1 2 4, 2 snapshots")
    parser.add_argument("--write", nargs="?", type=Path, const=RESULTS_PATH, default=None, metavar="PATH",
                        help=f"also replace the section {SECTION_TITLE[3:]!r} of PATH (default {RESULTS_PATH.name}) "
                             "and draw the plot")
    parser.add_argument("--plot", type=Path, default=None, metavar="PNG",
                        help=f"draw the plot here (default with --write: {DEFAULT_PLOT.name} next to this script)")
    args = parser.parse_args(argv)
    config = AccuracyConfig(width=args.width, stages=args.stages, train_nts=tuple(args.train_nts), nts=tuple(args.nts),
                            method=args.method,
                            norm=args.norm, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                            snapshots=args.snapshots, seed=args.seed, num_threads=args.threads, device=args.device)
    if args.quick:
        config = replace(config, steps=20, nts=(1, 2, 4), snapshots=2, train_size=640, test_size=256,
                         budgets_between=1, quick=True)
    if args.quick and args.write is not None and args.write.resolve() == RESULTS_PATH:
        parser.error(f"--quick results are a smoke test; give --write another PATH than {RESULTS_PATH}")
    if config.snapshots < 2 or config.steps < 2:
        parser.error("--snapshots and --steps must be at least 2")
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {config.device}: no CUDA device is available")
    cuda = config.device.startswith("cuda")
    default_plot = DEFAULT_PLOT.with_name("gradient_accuracy-cuda.png") if cuda else DEFAULT_PLOT
    plot_path = args.plot if args.plot is not None else (default_plot if args.write is not None else None)
    return config, args.write, plot_path


def main(argv: list[str] | None = None) -> int:
    config, write_path, plot_path = parse_args(argv)
    report = run(config)
    plotted = plot_path is not None and plot(report, plot_path)
    if plotted:
        log(f"wrote {plot_path}")
    plot_name = os.path.relpath(plot_path, write_path.resolve().parent) if plotted and write_path is not None else None
    publish_section(render_section(report, plot_name), write_path, report.runtime_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
