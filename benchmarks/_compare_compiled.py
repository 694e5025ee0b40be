"""The compiled mode's part of ``benchmarks/compare.py``'s report: anode-plan ``backend="inductor"``
against ``torch.compile`` with ``activation_memory_budget``, each row with its verdicts.

Private to ``benchmarks/``; may change without notice.
"""

from __future__ import annotations

from _common import mib, percent
from _compare_report import BELOW_FAMILY, INDUCTOR_FAMILY, CompareReport, Measured, fmt_err, paired_ratio

SPEED_TARGET = 1.00  # the bar: anode-plan's compiled step at most the peer's (paired medians)


def _eager_at(report: CompareReport, compiled: Measured) -> Measured | None:
    """The eager anode-plan row at the same budget as a compiled one."""
    return next((r for r in report.results if r.family in ("anode-plan", BELOW_FAMILY) and r.backend == "eager"
                 and r.budget_bytes == compiled.budget_bytes), None)


def _yes(flag: bool) -> str:
    return "met" if flag else "**missed**"


def compiled_mode_section(report: CompareReport) -> list[str]:
    """Lines for RESULTS.md: the table, the rows below every torch.compile peak, and the verdicts."""
    first = report.first_compile
    rows = [r for r in report.results if r.family == INDUCTOR_FAMILY]
    if first is None or not rows:
        return []
    timings = report.timings
    lines = [
        "### The compiled mode against torch.compile's own memory budget",
        "",
        "`anode_plan.compile(model, <the peer's measured peak>, (x,), backend=\"inductor\")`: where one graph of the "
        "whole model fits the budget, a compiled unit of the whole model at a partitioner budget "
        "(`activation_memory_budget` 1, 0.8, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1; `anode_plan/stages/unit.py`), its step measured by the "
        "allocator and timed; else every stage compiled by `torch.compile(fullgraph=True, dynamic=False)` inside "
        "anode-plan's eager schedule, each measured and timed, then planned (`anode_plan/stages/inductor.py`). The "
        "plan column says which. "
        f"Its first compile (budget unbounded), before any torch.compile peer ran: {first.setup_s:.1f} s for the "
        f"call, of which {first.compile_s:.1f} s compiling {first.compiled or f'its {first.stages} stages'}"
        + (f" ({len(first.eager_stages)} ran eager: " + "; ".join(f"{n}: {w}" for n, w in first.eager_stages) + ")"
           if first.eager_stages else "")
        + ". Later compiles of the model, at other budgets, reuse what is compiled and measured, and compile only "
        "the units or stages they need besides; \"setup\" below is that call's time. \"cold\" is a first call at "
        "that budget on a fresh copy of the model in an empty inductor cache (as the peer's compile is timed, in a "
        "cache of its own): the compile-plus-plan verdict compares it with the peer's. The eager mode at the same "
        "budget is beside it.",
        "",
        "| torch.compile peer | peer peak (MiB) | peer vs plain | peer compile (s) | peer grad error | anode-plan "
        "inductor: measured / predicted peak (MiB) | held | vs plain | / peer time (IQR) | setup (s) | cold (s) | "
        "grad error | "
        "eager anode-plan at that budget: vs plain | speed ≤ 1.00x | first compile ≤ peer compile |",
        "|" + "---|" * 15,
    ]
    verdicts = []
    for r in rows:
        peer = report.result(r.budget_of)
        low, speed, high = paired_ratio(timings, r.name, peer.name)
        eager = _eager_at(report, r)
        eager_ratio = f"{timings[eager.name].ratio:.2f}x" if eager is not None else "—"
        cold = r.cold_setup_s if r.cold_setup_s is not None else first.setup_s + r.setup_s
        fast, quick = speed <= SPEED_TARGET, cold <= peer.first_step_s
        lines.append(
            f"| budget={peer.compile_fraction:g} | {mib(peer.peak_bytes)} | {timings[peer.name].ratio:.2f}x | "
            f"{peer.first_step_s:.0f} | {fmt_err(peer.grad_rel_err)} | {mib(r.peak_bytes)} / "
            f"{mib(r.predicted_peak_bytes)} | {'yes' if r.held else '**NO**'} | {timings[r.name].ratio:.2f}x | "
            f"{speed:.2f} ({low:.2f}-{high:.2f}) | {r.setup_s:.1f} | {cold:.0f} | {fmt_err(r.grad_rel_err)} | "
            f"{eager_ratio} | "
            f"{_yes(fast)} | {_yes(quick)} |")
        verdicts.append((peer, r, speed, low, high, fast, quick, cold))
    lines += ["", "Below the lowest peak torch.compile reaches at any fraction, the budgets only anode-plan reaches:",
              "", "| budget (MiB) | mode | measured / predicted peak (MiB) | held | vs plain | plan | grad error |",
              "|---|---|---|---|---|---|---|"]
    for r in (r for r in report.results if r.family == BELOW_FAMILY):
        lines.append(f"| {mib(r.budget_bytes)} | {r.backend} | {mib(r.peak_bytes)} / {mib(r.predicted_peak_bytes)} | "
                     f"{'yes' if r.held else '**NO**'} | {timings[r.name].ratio:.2f}x | {r.plan} | "
                     f"{fmt_err(r.grad_rel_err)} |")
    lines += ["", "Verdicts:", ""]
    for peer, r, speed, low, high, fast, quick, cold in verdicts:
        lines.append(
            f"- **budget={peer.compile_fraction:g}** ({mib(peer.peak_bytes)} MiB): budget "
            f"{'held' if r.held else '**broken**'} ({mib(r.peak_bytes)} MiB measured, predicted "
            f"{mib(r.predicted_peak_bytes)}); step time {_yes(fast)}: {speed:.2f}x the peer's (IQR {low:.2f}-"
            f"{high:.2f}), plan '{r.plan}', predicted recompute {percent(r.predicted_recompute)}; compile-plus-plan "
            f"{_yes(quick)}: a first call at this budget (cold) took {cold:.0f} s against the peer's "
            f"{peer.first_step_s:.0f} s; in this run, after the first compile ({first.setup_s:.0f} s), this budget's "
            f"call took {r.setup_s:.1f} s.")
    lowest = min(report.result(r.budget_of).peak_bytes for r in rows)
    below = [r for r in report.results if r.family == BELOW_FAMILY and r.backend == "inductor"]
    if report.inductor_min_bytes is not None:
        lines.append(f"- The compiled mode's minimum budget is {mib(report.inductor_min_bytes)} MiB (the eager "
                     f"mode's {mib(report.min_budget_bytes)} MiB), {report.inductor_min_bytes / lowest:.2f}x the "
                     f"lowest torch.compile peak ({mib(lowest)} MiB); " + (
                         "at " + ", ".join(f"{mib(r.budget_bytes)} MiB it measured {mib(r.peak_bytes)} MiB at "
                                           f"{timings[r.name].ratio:.2f}x plain" for r in below) + "."
                         if below else "it reaches nothing below that peak."))
    worst = max(r.grad_rel_err for r in report.results if r.backend == "inductor")
    compile_err = max(r.grad_rel_err for r in report.results if r.compile_fraction is not None)
    lines.append(f"- Float32 gradient error against float64: compiled mode at most {fmt_err(worst)}, torch.compile "
                 f"{fmt_err(compile_err)}, plain eager {fmt_err(report.plain64_err)}; in float64 the compiled mode "
                 "equals plain autograd to 1e-12 (tests/test_inductor.py).")
    lines.append("")
    return lines
