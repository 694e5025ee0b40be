"""Measured costs against the FLOP model: which plans change when the planner plans on measured milliseconds.

``anode_plan.compile`` plans on stage times measured on the device (``docs/algorithms.md``
§12); with ``calibrate=False`` it plans on FLOP counts. This script takes one calibrated chain
of the compare model (``ode_resnet(nt=4)``, batch 32) and, at budgets from the minimum to
store-all, plans it twice: on its measured costs (what ``compile`` does) and on the same
chain's FLOP-model costs (``Chain.nominal()``, the same bytes). Where the two schedules
differ, both are run (``compile(model, plan=...)``), each under the allocator meter once and
timed over ``--rounds`` interleaved rounds with plain autograd; "gain" is the FLOP-model
plan's measured step over the measured-cost plan's (above 1: planning on measured costs made
the step faster). Every row also gives the measured-cost plan's predicted step against its
measured median.

Run from the repository root::

    PYTHONPATH=. python benchmarks/measured_costs.py            # about two minutes
    PYTHONPATH=. python benchmarks/measured_costs.py --write    # also update benchmarks/RESULTS.md
"""

from __future__ import annotations

import os
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP; see budget_sweep.py

import torch  # noqa: E402

import anode_plan  # noqa: E402
from _common import (RESULTS_PATH, TRAIN_STEP_FORM, ModelRunConfig, clear_grads, load_average, log,  # noqa: E402
                     machine_info, mib, publish_section, quick_or_write_args, source_version, timed_ms, train_step)
from anode_plan.compiler.step_fit import fit_whole_step  # noqa: E402
from models import example_input_shape  # noqa: E402
from planners import simulate_plan  # noqa: E402
from planners.chain import tie_tolerance  # noqa: E402

SECTION_TITLE = "## Measured costs: the plans that change (CPU)"
FRACTIONS = (1.0, 0.8, 0.6, 0.45, 0.3, 0.2, 0.1, 0.05, 0.0)


def main(argv: list[str] | None = None) -> int:
    args = quick_or_write_args(argv, __doc__, "three budgets and three rounds")
    config = ModelRunConfig(repeats=3 if args.quick else 7)
    began = time.perf_counter()
    load_before = load_average()
    torch.manual_seed(config.seed)
    model = config.build_model()
    x = torch.randn(example_input_shape("ode_resnet", config.batch_size))
    y = torch.randint(0, 10, (config.batch_size,))
    params = list(model.parameters())
    traced = anode_plan.trace_model(model, (x,))
    chain = fit_whole_step(model, traced, (x,), anode_plan.lower_to_chain(model, traced, (x,)))
    marks = anode_plan.find_landmarks(chain)
    fractions = FRACTIONS[::4] if args.quick else FRACTIONS
    rows, gains, errors = [], [], []
    for fraction in fractions:
        budget = anode_plan.budget_for_peak(int(marks.minimum_bytes + (marks.store_all_bytes - marks.minimum_bytes)
                                                * fraction))
        measured_plan = anode_plan.plan_for_budget(chain, traced, (x,), budget)
        nominal_plan = anode_plan.plan_for_budget(chain.nominal(), traced, (x,), budget)
        same = measured_plan.schedule.ops == nominal_plan.schedule.ops
        compiled = {"measured": anode_plan.compile(model, plan=measured_plan)}
        if not same:
            compiled["nominal"] = anode_plan.compile(model, plan=nominal_plan)
        peaks = {}
        for name, module in compiled.items():
            clear_grads(params)
            peaks[name] = anode_plan.measure_peak_memory(lambda: train_step(module, x, y)).peak_bytes
        samples = {name: [] for name in [*compiled, "plain"]}
        for _ in range(config.repeats):
            for name, module in [*compiled.items(), ("plain", model)]:
                clear_grads(params)
                samples[name].append(timed_ms(lambda: train_step(module, x, y)))
        median = {name: statistics.median(values) for name, values in samples.items()}
        predicted = measured_plan.predicted_step_seconds * 1e3
        errors.append(predicted / median["measured"] - 1)
        if same:
            change = "same schedule"
        else:
            ratios = [n / m for n, m in zip(samples["nominal"], samples["measured"])]
            gains.append(statistics.median(ratios))
            change = (f"FLOP model: {nominal_plan.schedule.description} (predicted "
                      f"{simulate_ms(chain, nominal_plan):.0f} ms, measured {median['nominal']:.0f} ms, peak "
                      f"{mib(peaks['nominal'])} MiB); gain {gains[-1]:.3f}x")
        rows.append(f"| {fraction:.0%} | {mib(budget)} | {measured_plan.schedule.description} | "
                    f"{mib(peaks['measured'])} | {predicted:.0f} | {median['measured']:.0f} | "
                    f"{predicted / median['measured']:.3f} | {median['measured'] / median['plain']:.3f}x | {change} |")
        log(f"{fraction:.0%}: {rows[-1]}")
    clear_grads(params)
    runtime = time.perf_counter() - began
    changed = len(gains)
    summary = (f"{changed} of {len(rows)} budgets changed plan on measured costs"
               + (f", each measured {min(gains):.3f}x to {max(gains):.3f}x as fast as the FLOP model's plan (gain > 1: "
                  "faster)" if gains else "") + f"; predicted step {min(errors):+.1%} to {max(errors):+.1%} off the "
               f"measured median, median |error| {statistics.median(abs(e) for e in errors):.1%}.")
    section = "\n".join([
        SECTION_TITLE, "",
        f"**Measured:** {config.model_call()}, batch {config.batch_size}, planned on one calibrated chain's "
        "measured costs and on the same chain's FLOP-model costs, at budgets from store-all (100%) to the minimum "
        "(0%).", "",
        f"**Result:** {summary}", "",
        f"The calibrated chain: stage times fitted to whole measured steps by a scale of {chain.time_scale:.3f} "
        f"(`Chain.time_scale`), a checkpoint region {chain.region_cost:.3f} ms, the stand-in loss "
        f"{chain.step_overhead:.3f} ms, timing uncertainty {chain.timing_noise:.1%} (ties within "
        f"{tie_tolerance(chain):.1%}).", "",
        f"Written by `benchmarks/measured_costs.py` in {runtime:.0f} s; {machine_info(config.num_threads)}; "
        f"1-minute load average {load_before[0]:.2f} before, {load_average()[0]:.2f} after; {source_version()}.",
        f"Each step is {TRAIN_STEP_FORM}. Times: median over {config.repeats} interleaved rounds; peaks: "
        "`anode_plan.measure_peak_memory`, the allocator's. Budget: `budget_for_peak` of the point that fraction of "
        "the way from the minimum to store-all.", "",
        "| budget (of the way from minimum to store-all) | budget (MiB) | plan on measured costs | measured peak (MiB) "
        "| predicted step (ms) | measured step (ms) | predicted / measured | vs plain | the FLOP model's plan |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows, ""])
    publish_section(section, RESULTS_PATH if args.write else None, runtime)
    return 0


def simulate_ms(chain, plan) -> float:
    """``plan``'s schedule priced in ``chain``'s measured milliseconds (the plan's own chain is the nominal one)."""
    return simulate_plan(chain, plan.schedule).step_cost


if __name__ == "__main__":
    sys.exit(main())
