"""Calibration cost (CPU): what ``compile(calibrate=True)`` adds, as a multiple of one training step.

``anode_plan.compile`` calibrates by default: it runs each distinct stage of the model once
for real (:mod:`anode_plan.measure.calibrate`) to measure what its kernels allocate inside
themselves. This script times that on the demo model of ``tools/demo.py``
(``ode_resnet(width=16, stages=3, nt=4, method='rk2', norm='batch', seed=0)``, batch 32,
the demo's default budget: 40% of the way from the minimum to store-all), in one process,
over ``--rounds`` interleaved rounds; each round runs, in an order rotated from round to round:

* ``anode_plan.compile(model, budget, (x,), calibrate=True)`` (the default);
* ``anode_plan.compile(model, budget, (x,), calibrate=False)``;
* one plain training step of the uncompiled model (the tutorials' loop of ``_common.train_step``).

A round's calibration time is its calibrated compile minus its uncalibrated one; it is
reported as the median over rounds and as a multiple of a training step (the median of the
per-round ratios to that round's step). One warm-up of each comes first (imports, first
calls). Once, outside the timed rounds, it also measures with ``anode_plan.measure_peak_memory``
(the allocator's peak: on the CPU torch.profiler's allocation events) the memory the
calibrated compile itself allocates, and the peak of one training step under each of the two
plans, against the budget.

Run from the repository root::

    PYTHONPATH=. python benchmarks/calibration_cost.py            # 7 rounds, about a minute
    PYTHONPATH=. python benchmarks/calibration_cost.py --write    # also update benchmarks/RESULTS.md

The markdown goes to stdout, progress to stderr. ``--write`` replaces the section
``## Calibration cost (CPU)`` of ``benchmarks/RESULTS.md`` (or appends it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP; see budget_sweep.py

import torch  # noqa: E402

import anode_plan  # noqa: E402
from _common import (RESULTS_PATH, TRAIN_STEP_FORM, ModelRunConfig, clear_grads, load_average, log,  # noqa: E402
                     machine_info, mib, publish_section, source_version, timed_ms, train_step)
from models import example_input_shape  # noqa: E402

SECTION_TITLE = "## Calibration cost (CPU)"
METHODS = ("compile, calibrate=True", "compile, calibrate=False", "plain training step")


@dataclass(frozen=True)
class PlanCheck:
    """One plan of the demo budget: what it predicts and what a step of it measured."""

    calibrate: bool
    description: str
    predicted_peak_bytes: int
    measured_peak_bytes: int


@dataclass(frozen=True)
class CalibrationReport:
    config: ModelRunConfig
    budget_bytes: int
    samples_ms: dict[str, tuple[float, ...]]
    compile_peak_bytes: int
    plans: tuple[PlanCheck, ...]
    machine: str
    source: str
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    runtime_s: float

    def median_ms(self, name: str) -> float:
        return statistics.median(self.samples_ms[name])

    @property
    def calibration_ms(self) -> list[float]:
        """Per round: the calibrated compile's time minus the uncalibrated one's."""
        return [a - b for a, b in zip(self.samples_ms[METHODS[0]], self.samples_ms[METHODS[1]])]

    @property
    def calibration_in_steps(self) -> list[float]:
        """Per round: the calibration time divided by the same round's plain training step."""
        return [c / s for c, s in zip(self.calibration_ms, self.samples_ms[METHODS[2]])]


def quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    low, _, high = statistics.quantiles(values, n=4)
    return low, high


def run(config: ModelRunConfig) -> CalibrationReport:
    began = time.perf_counter()
    load_before = load_average()
    torch.set_num_threads(config.num_threads)
    torch.manual_seed(config.seed)  # the demo's model, batch and default budget
    model = config.build_model()
    x = torch.randn(example_input_shape("ode_resnet", config.batch_size))
    y = torch.randint(0, 10, (config.batch_size,))
    params = list(model.parameters())
    traced = anode_plan.trace_model(model, (x,))
    marks = anode_plan.find_landmarks(anode_plan.lower_to_chain(model, traced, (x,)))
    budget = marks.minimum_bytes + (marks.store_all_bytes - marks.minimum_bytes) * 2 // 5
    log(f"model: {config.model_call()}, batch {config.batch_size}, budget {mib(budget)} MiB ({budget} B)")

    def step() -> None:
        clear_grads(params)
        train_step(model, x, y)

    runs = {METHODS[0]: lambda: anode_plan.compile(model, budget, (x,), calibrate=True),
            METHODS[1]: lambda: anode_plan.compile(model, budget, (x,), calibrate=False),
            METHODS[2]: step}
    for fn in runs.values():  # warm-up
        fn()
    samples: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for round_idx in range(config.repeats):
        shift = round_idx % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(timed_ms(runs[name]))
        log(f"  round {round_idx + 1}/{config.repeats}: " +
            ", ".join(f"{name} {samples[name][-1]:.0f} ms" for name in names))
    clear_grads(params)

    compile_peak = anode_plan.measure_peak_memory(runs[METHODS[0]]).peak_bytes
    plans = []
    for calibrate in (True, False):
        compiled = anode_plan.compile(model, budget, (x,), calibrate=calibrate)
        clear_grads(params)
        train_step(compiled, x, y)  # warm
        clear_grads(params)
        measured = anode_plan.measure_peak_memory(lambda: train_step(compiled, x, y)).peak_bytes
        clear_grads(params)
        plans.append(PlanCheck(calibrate, compiled.plan.schedule.description, compiled.plan.predicted_peak_bytes,
                               measured))
        log(f"  calibrate={calibrate}: {plans[-1].description}, predicted {mib(plans[-1].predicted_peak_bytes)} MiB, "
            f"measured {mib(measured)} MiB")
    return CalibrationReport(config=config, budget_bytes=budget,
                             samples_ms={name: tuple(times) for name, times in samples.items()},
                             compile_peak_bytes=compile_peak, plans=tuple(plans),
                             machine=machine_info(config.num_threads), source=source_version(),
                             load_before=load_before, load_after=load_average(),
                             runtime_s=time.perf_counter() - began)


def render_section(report: CalibrationReport) -> str:
    config = report.config
    rows = ["| what | median (ms) | IQR (ms) |", "|---|---|---|"]
    for name in METHODS:
        low, high = quartiles(list(report.samples_ms[name]))
        rows.append(f"| `{name}` | {report.median_ms(name):.0f} | {low:.0f}-{high:.0f} |")
    calibration, in_steps = report.calibration_ms, report.calibration_in_steps
    low, high = quartiles(calibration)
    rows.append("| calibration (per round: calibrated compile minus uncalibrated) | "
                f"{statistics.median(calibration):.0f} | {low:.0f}-{high:.0f} |")
    steps_low, steps_high = quartiles(in_steps)
    plan_rows = ["| compile | plan | predicted peak (MiB) | measured peak (MiB) | predicted / measured | budget held |",
                 "|---|---|---|---|---|---|"]
    for plan in report.plans:
        held = "yes" if plan.measured_peak_bytes <= report.budget_bytes else "**NO**"
        plan_rows.append(f"| `calibrate={plan.calibrate}` | {plan.description} | {mib(plan.predicted_peak_bytes)} | "
                         f"{mib(plan.measured_peak_bytes)} | "
                         f"{plan.predicted_peak_bytes / plan.measured_peak_bytes:.4f} | {held} |")
    share = statistics.median(calibration) / report.median_ms(METHODS[0])
    lines = [
        SECTION_TITLE, "",
        f"Written by `benchmarks/calibration_cost.py` in {report.runtime_s:.0f} s.", "",
        f"- Machine: {report.machine}; 1-minute load average {report.load_before[0]:.2f} before, "
        f"{report.load_after[0]:.2f} after.",
        f"- Library: {report.source}.",
        f"- Model: the demo's (`tools/demo.py`), `{config.model_call()}`, float32, train mode, batch "
        f"{config.batch_size}; budget {mib(report.budget_bytes)} MiB ({report.budget_bytes} B), the demo's "
        "default (40% of the way from the minimum to store-all).",
        f"- Timing: {config.repeats} interleaved rounds in one process, after one warm-up of each; every round runs "
        "the three in an order rotated from round to round. A round's calibration time is its calibrated compile "
        f"minus its uncalibrated one. The training step is one of the uncompiled model, {TRAIN_STEP_FORM}.",
        "",
        *rows, "",
        f"**Calibration costs {statistics.median(in_steps):.1f} training steps** (median of the per-round ratios, "
        f"IQR {steps_low:.1f}-{steps_high:.1f}): {statistics.median(calibration):.0f} ms against a "
        f"{report.median_ms(METHODS[2]):.0f} ms step, {share:.0%} of the calibrated compile's time.",
        "",
        "Once, outside the timed rounds (`anode_plan.measure_peak_memory`, the CPU allocator's peak): the calibrated "
        f"compile itself allocated at most {mib(report.compile_peak_bytes)} MiB ({report.compile_peak_bytes} B, "
        f"{report.compile_peak_bytes / report.budget_bytes:.0%} of the budget); a training step under each plan:",
        "",
        *plan_rows, "",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> tuple[ModelRunConfig, Path | None]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--rounds", type=int, default=ModelRunConfig().repeats, help="interleaved timing rounds")
    parser.add_argument("--threads", type=int, default=ModelRunConfig().num_threads, help="torch.set_num_threads")
    parser.add_argument("--write", nargs="?", type=Path, const=RESULTS_PATH, default=None, metavar="PATH",
                        help=f"also replace the section {SECTION_TITLE[3:]!r} of PATH (default {RESULTS_PATH.name})")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: give at least 1 (5 or more for reportable timings)")
    return ModelRunConfig(repeats=args.rounds, num_threads=args.threads), args.write


def main(argv: list[str] | None = None) -> int:
    config, write_path = parse_args(argv)
    report = run(config)
    publish_section(render_section(report), write_path, report.runtime_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
