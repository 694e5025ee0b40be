"""anode-plan against what users would pick instead, on one ODE-ResNet, batch and solver, in one process.

The peers, all on the same model object (same parameters, same batch, same fixed-step solver):

* plain autograd (every tape kept);
* ``torch.utils.checkpoint`` (non-reentrant) on every ODE block: ANODE by hand;
* ``torch.utils.checkpoint`` on every time step;
* ``checkpoint_sequential`` over the unrolled network with round(√n) segments;
* torchdiffeq ``odeint`` with the same fixed-step method and grid (backprop through the solver);
* torchdiffeq ``odeint_adjoint``, the Neural-ODE adjoint (reverse solve, O(L) memory);
* ``torch.compile`` (inductor) with ``torch._functorch.config.activation_memory_budget`` at a few
  fractions; the first step's time, which compiles forward and backward, is reported.

Then anode-plan (``anode_plan.compile`` with the default planner) once per peer, with that
peer's measured peak as ``memory_budget``. Where a peer's peak is below anode-plan's minimum,
the row says so and gives the minimum.

And anode-plan's compiled mode (``backend="inductor"``) at the peak of every ``torch.compile``
row, and at three budgets below the lowest of them (its minimum, halfway there on a log
scale, and halfway again from there to the lowest peak), each beside the eager mode at the same budget. Its first compile, which compiles
and measures the stages once for every budget, runs before any ``torch.compile`` peer, after
one trivial compiled function has paid TorchInductor's start-up in this process, so neither
side's first compile pays it and the peers', not anode-plan's, find kernels cached.

For every method: the measured peak of one warm training step (forward, cross-entropy,
backward); the step time, as the median over ``--repeats`` rounds in which every method runs
once (order rotated each round) and its ratio to plain autograd as the median of the per-round
ratios; the largest relative parameter-gradient error against plain autograd in float64 on the
same weights and batch (max over parameters of max|g - g64| / max|g64|); and, for anode-plan,
the predicted peak and whether the measured peak stayed within the budget.

Memory. Every row, peers and anode-plan alike, is measured with the same meter,
``anode_plan.measure_peak_memory``: on the CPU it replays, in time order, every allocation
and free that the PyTorch profiler records from the c10 CPU allocator
(``profile_memory=True``); on CUDA it reads ``torch.cuda.max_memory_allocated``. So it counts
the workspaces kernels allocate inside themselves (convolution backward, internal copies)
and the buffers inductor's generated code allocates, and the profiler leaves TorchDynamo
running compiled code. "Kept after forward" comes from the same allocator
(``anode_plan.AllocatorMeter``): what is still allocated at a mark right after the forward
and loss. anode-plan gets each peer's measured peak, in bytes and unchanged, as its budget.

Run from the repository root::

    PYTHONPATH=. python benchmarks/compare.py --quick              # smoke run, about a minute
    PYTHONPATH=. python benchmarks/compare.py --write              # full run (5-6 min here); RESULTS.md + compare.png

Needs the benchmark extra for the torchdiffeq peers and the plot (``pip install -e ".[bench]"``);
without torchdiffeq those peers are skipped with a message, without matplotlib the plot.
"""

from __future__ import annotations

import argparse
import atexit
import copy
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

# Before torch starts OpenMP (see budget_sweep.py): passive waiting keeps a shared 2-core machine usable.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# A cold inductor cache, removed at exit, so the compile time reported is what a first run pays. Set
# TORCHINDUCTOR_CACHE_DIR yourself to reuse one.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="anode-plan-compare-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

import torch  # noqa: E402
from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import anode_plan  # noqa: E402
import planners  # noqa: E402
from _common import (RESULTS_PATH, clear_grads, gradients, kept_after_forward_bytes, load_average,  # noqa: E402
                     log, machine_info, max_relative_grad_error, mib, min_budget_bytes, publish_section,
                     source_version, timed_ms, train_step)
from _compare_report import (ADJOINT, BELOW_FAMILY, INDUCTOR_FAMILY, PLAIN, SECTION_TITLE, CompareConfig,  # noqa: E402
                             CompareReport, FirstCompile, Infeasible, Measured, Timing, plot, render_section)
from _compare_compiled import compiled_mode_section  # noqa: E402
from _peers import (SequentialCheckpointed, checkpoint_blocks_model, checkpoint_steps_model,  # noqa: E402
                    torchdiffeq_missing, torchdiffeq_model)
from models import example_input_shape  # noqa: E402

DEFAULT_PLOT = Path(__file__).resolve().parent / "compare.png"
SOLVER_MATCH_TOLERANCE = 1e-12  # relative, in float64: the torchdiffeq solve must be the same computation


@dataclass(frozen=True)
class Candidate:
    """One way to run a training step of the model: a peer, or anode-plan at a peer's peak."""

    name: str
    forward: Callable[[torch.Tensor], torch.Tensor]
    family: str  # "peer" or "anode-plan"
    budget_of: str | None = None
    budget_bytes: int | None = None
    plan: str = ""
    setup_s: float | None = None  # anode_plan.compile's time (trace, measure, plan)
    compile_fraction: float | None = None
    predicted_peak_bytes: int | None = None
    predicted_recompute: float | None = None
    backend: str = "eager"  # for anode-plan: compile(..., backend=...)
    predicted_ms: float | None = None  # for anode-plan: plan.predicted_step_seconds, in ms
    predicted_slowdown: float | None = None  # for anode-plan: plan.predicted_slowdown (against plain autograd)
    cold_setup_s: float | None = None  # the compiled mode: compile at this budget first thing (cold_compile_seconds)


def _cold_cache_dir(prefix: str) -> str:
    """An empty directory for an inductor cache, removed at exit."""
    directory = tempfile.mkdtemp(prefix=f"anode-plan-compare-{prefix}-")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return directory


# --- the peers -----------------------------------------------------------------------------------------------------

def compiled_forward(model: nn.Module, tag: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """``torch.compile`` of ``model(x)`` with a code object of its own.

    TorchDynamo caches compiled graphs on the code object it compiles; a fresh one per
    activation budget keeps each budget's graphs apart in one process (and leaves the
    eager model uncompiled), with no ``torch._dynamo.reset()`` that would drop the others.
    """
    def forward(x: torch.Tensor) -> torch.Tensor:
        return model(x)

    forward.__code__ = forward.__code__.replace(co_name=f"compiled_forward_{tag}")
    return torch.compile(forward)


def build_peers(model: nn.Module, config: CompareConfig, skipped: list[str]) -> list[Candidate]:
    peers = [
        Candidate(PLAIN, model, "peer"),
        Candidate("checkpoint every ODE block (ANODE by hand)", checkpoint_blocks_model(model), "peer"),
        Candidate("checkpoint every step", checkpoint_steps_model(model), "peer"),
    ]
    sequential = SequentialCheckpointed(model)
    peers.append(Candidate(f"checkpoint_sequential, {sequential.segments} segments of {len(sequential.layers)} layers",
                           sequential, "peer"))
    missing = torchdiffeq_missing()
    if missing is None:
        peers.append(Candidate("torchdiffeq odeint", torchdiffeq_model(model, adjoint=False), "peer"))
        peers.append(Candidate(ADJOINT, torchdiffeq_model(model, adjoint=True), "peer"))
    else:
        log(missing)
        skipped.append(missing)
    for k, fraction in enumerate(config.compile_budgets):
        peers.append(Candidate(f"torch.compile, activation_memory_budget={fraction:g}",
                               compiled_forward(model, f"budget_{k}"), "peer", compile_fraction=fraction))
    return peers


# --- measuring -----------------------------------------------------------------------------------------------------

def measure(candidate: Candidate, params: list[nn.Parameter], x: torch.Tensor, y: torch.Tensor,
            reference: list[torch.Tensor], device: torch.device) -> Measured:
    """Warm up (compiling, for torch.compile), check the gradients, measure the peak of one more step."""
    step = lambda: train_step(candidate.forward, x, y)  # noqa: E731
    clear_grads(params)
    if candidate.compile_fraction is not None:
        # a cold inductor cache of its own: identical graphs anode-plan compiled (its units) must not speed it up
        with temporary_cache_dir(_cold_cache_dir("peer")), \
                torch._functorch.config.patch(activation_memory_budget=candidate.compile_fraction):
            first_ms = timed_ms(step)  # the partition into saved and recomputed values is chosen here
    else:
        first_ms = timed_ms(step)
    clear_grads(params)
    step()  # a second warm step: the gradients checked are those of a warm step
    grad_rel_err = max_relative_grad_error(gradients(params), reference)
    clear_grads(params)
    peak = anode_plan.measure_peak_memory(step, device=device)
    clear_grads(params)
    kept = kept_after_forward_bytes(lambda: F.cross_entropy(candidate.forward(x), y), device=device)
    clear_grads(params)
    return Measured(name=candidate.name, family=candidate.family, budget_of=candidate.budget_of,
                    budget_bytes=candidate.budget_bytes, plan=candidate.plan, first_step_s=first_ms / 1e3,
                    setup_s=candidate.setup_s, compile_fraction=candidate.compile_fraction,
                    peak_bytes=peak.peak_bytes, peak_method=peak.method, kernel_at_peak=peak.kernel,
                    kept_bytes=kept, grad_rel_err=grad_rel_err,
                    predicted_peak_bytes=candidate.predicted_peak_bytes,
                    predicted_recompute=candidate.predicted_recompute, backend=candidate.backend,
                    predicted_ms=candidate.predicted_ms, predicted_slowdown=candidate.predicted_slowdown,
                    cold_setup_s=candidate.cold_setup_s)


def time_all(candidates: list[Candidate], params: list[nn.Parameter], x: torch.Tensor, y: torch.Tensor,
             repeats: int, device: torch.device) -> dict[str, Timing]:
    """``repeats`` rounds; each runs every candidate once, starting one later each round (against drift)."""
    samples: dict[str, list[float]] = {c.name: [] for c in candidates}
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)  # noqa: E731
    for round_idx in range(repeats):
        shift = round_idx % len(candidates)
        for candidate in candidates[shift:] + candidates[:shift]:
            clear_grads(params)
            sync()
            samples[candidate.name].append(timed_ms(lambda: (train_step(candidate.forward, x, y), sync())))
        log(f"  timing round {round_idx + 1}/{repeats} done")
    clear_grads(params)
    plain = samples[PLAIN]
    timings = {}
    for name, times in samples.items():
        ratios = [t / p for t, p in zip(times, plain)]
        low, _, high = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
        timings[name] = Timing(statistics.median(times), statistics.median(ratios), (low, high), tuple(times))
    return timings


def check_solvers(model64: nn.Module, x64: torch.Tensor) -> dict[str, float]:
    """Relative max difference of the torchdiffeq variants' outputs from the ODE blocks', in float64."""
    if torchdiffeq_missing() is not None:
        return {}
    with torch.no_grad():
        want = model64(x64)
        scale = float(want.abs().max())
        diffs = {name: float((torchdiffeq_model(model64, adjoint=adjoint)(x64) - want).abs().max()) / scale
                 for name, adjoint in (("odeint", False), ("odeint_adjoint", True))}
    bad = {name: diff for name, diff in diffs.items() if diff > SOLVER_MATCH_TOLERANCE}
    if bad:
        raise RuntimeError(f"torchdiffeq's solve differs from the ODE blocks' in float64 by {bad} (relative), more "
                           f"than {SOLVER_MATCH_TOLERANCE:g}: the peers would not integrate the same ODE. Check the "
                           "method mapping in benchmarks/_peers.py.")
    return diffs


def warm_up_inductor() -> None:
    """Compile one trivial function: TorchInductor's start-up in this process is paid here, by neither side."""
    def start_up(t: torch.Tensor) -> torch.Tensor:
        return (t * 2).sum()

    start_up.__code__ = start_up.__code__.replace(co_name="compare_inductor_start_up")
    torch.compile(start_up)(torch.randn(4, requires_grad=True)).backward()


def planned_candidate(model: nn.Module, budget: int, x: torch.Tensor, name: str, family: str,
                      budget_of: str | None, backend: str) -> Candidate:
    """anode-plan compiled (``anode_plan.compile``) for ``budget``, timed."""
    began = time.perf_counter()
    compiled = anode_plan.compile(model, budget, (x,), backend=backend)
    setup_s = time.perf_counter() - began
    plan = compiled.plan
    return Candidate(name, compiled, family, budget_of=budget_of, budget_bytes=budget,
                     plan=f"{plan.schedule.description} ({plan.schedule.planner})", setup_s=setup_s,
                     predicted_peak_bytes=plan.predicted_peak_bytes, predicted_recompute=plan.recompute_overhead,
                     backend=backend, predicted_ms=plan.predicted_step_seconds * 1e3,
                     predicted_slowdown=plan.predicted_slowdown)


def cold_compile_seconds(model: nn.Module, budget: int, x: torch.Tensor) -> float:
    """What a first ``compile(..., backend="inductor")`` at ``budget`` takes: on a copy of the model (so nothing
    compiled for the model before is reused) in a cold inductor cache of its own, trace, measure, compile, plan."""
    fresh = copy.deepcopy(model)
    with temporary_cache_dir(_cold_cache_dir("cold")):
        began = time.perf_counter()
        anode_plan.compile(fresh, budget, (x,), backend="inductor")
        return time.perf_counter() - began


def compiled_mode_candidates(model: nn.Module, x: torch.Tensor, peers: list[Measured], eager_min: int
                             ) -> tuple[list[Candidate], int]:
    """The compiled mode at each torch.compile peer's peak, and (with the eager mode beside it) at three budgets
    below the lowest of those peaks; and the compiled mode's minimum budget."""
    compile_peers = [p for p in peers if p.compile_fraction is not None]
    out = [replace(planned_candidate(model, p.peak_bytes, x, f"anode-plan inductor at the peak of: {p.name}",
                                     INDUCTOR_FAMILY, p.name, "inductor"),
                   cold_setup_s=cold_compile_seconds(model, p.peak_bytes, x)) for p in compile_peers]
    minimum = min_budget_bytes(model, x, backend="inductor")
    lowest = min((p.peak_bytes for p in compile_peers), default=None)
    if lowest is not None and minimum < lowest:
        middle = (minimum * lowest) ** 0.5  # budgets spaced geometrically from the minimum to the lowest peak
        for budget in sorted({minimum, round(middle), round((middle * lowest) ** 0.5)}, reverse=True):
            out.append(planned_candidate(model, budget, x, f"anode-plan inductor at {mib(budget)} MiB",
                                         BELOW_FAMILY, None, "inductor"))
            if budget >= eager_min:
                out.append(planned_candidate(model, budget, x, f"anode-plan eager at {mib(budget)} MiB",
                                             BELOW_FAMILY, None, "eager"))
    return out, minimum


def run_compare(config: CompareConfig) -> CompareReport:
    began = time.perf_counter()
    load_before = load_average()
    torch.set_num_threads(config.num_threads)
    device = torch.device(config.device)
    model = config.build_model()
    generator = torch.Generator().manual_seed(config.seed)
    x = torch.randn(example_input_shape("ode_resnet", config.batch_size), generator=generator)
    y = torch.randint(0, 10, (config.batch_size,), generator=generator)

    # float64 reference on the same weights and batch, computed once, before any step changes BN statistics
    model64 = copy.deepcopy(model).double().to(device)
    x64, y = x.double().to(device), y.to(device)
    solver_match = check_solvers(model64, x64)
    params64 = list(model64.parameters())
    train_step(model64, x64, y)
    reference = gradients(params64)
    del model64, params64

    model.to(device)
    x = x.to(device)
    params = list(model.parameters())
    log(f"model: {config.model_call()}, batch {config.batch_size}, {device}")
    first_compile = None
    if config.compile_budgets:
        warm_up_inductor()
        began = time.perf_counter()
        cold = anode_plan.compile(model, 2**50, (x,), backend="inductor")
        unit = cold.plan.unit
        what = (f"one unit of the whole model at activation_memory_budget={unit.fraction:g}" if unit is not None
                else f"its {len(cold.plan.chain.stages)} stages")
        first_compile = FirstCompile(time.perf_counter() - began, cold.plan.compile_seconds,
                                     len(cold.plan.chain.stages), cold.plan.eager_stages, what)
        log(f"anode-plan inductor: first compile {first_compile.setup_s:.1f} s "
            f"({first_compile.compile_s:.1f} s compiling {what})")
        # ``cold`` stays referenced: its compiled stages are what the later compiles of the model reuse
        # (they are kept while a compiled model uses them).
    skipped: list[str] = []
    peers = build_peers(model, config, skipped)
    measured: list[Measured] = []
    for peer in peers:
        result = measure(peer, params, x, y, reference, device)
        measured.append(result)
        compile_note = "" if peer.compile_fraction is None else f", first step (compile) {result.first_step_s:.0f} s"
        log(f"  {peer.name:<55} peak {mib(result.peak_bytes):>8} MiB (at {result.kernel_at_peak})"
            f"  grad err {result.grad_rel_err:.1e}{compile_note}  ({time.perf_counter() - began:.0f} s)")

    minimum = min_budget_bytes(model, x)
    store_all = anode_plan.compile(model, 2**50, (x,), planner=planners.StoreAll()).plan.predicted_peak_bytes
    log(f"anode-plan minimum budget {mib(minimum)} MiB, store-all predicted {mib(store_all)} MiB")
    planned: list[Candidate] = []
    infeasible: list[Infeasible] = []
    for peer in measured:
        if peer.peak_bytes < minimum:
            infeasible.append(Infeasible(peer.name, peer.peak_bytes, minimum))
            continue
        planned.append(planned_candidate(model, peer.peak_bytes, x, f"anode-plan at the peak of: {peer.name}",
                                         "anode-plan", peer.name, "eager"))
    def measure_planned(candidates: list[Candidate]) -> None:
        for candidate in candidates:
            result = measure(candidate, params, x, y, reference, device)
            measured.append(result)
            log(f"  {candidate.name[:55]:<55} peak {mib(result.peak_bytes):>8} MiB of {mib(candidate.budget_bytes)}"
                f" (predicted {mib(candidate.predicted_peak_bytes)})  {candidate.plan}  grad err "
                f"{result.grad_rel_err:.1e}  setup {candidate.setup_s:.1f} s  ({time.perf_counter() - began:.0f} s)")

    measure_planned(planned)
    inductor_min = None
    if first_compile is not None:
        extra, inductor_min = compiled_mode_candidates(model, x, measured[:len(peers)], minimum)
        measure_planned(extra)
        planned += extra
    log(f"timing {len(peers) + len(planned)} methods, {config.repeats} rounds")
    timings = time_all(peers + planned, params, x, y, config.repeats, device)
    return CompareReport(config=config, results=tuple(measured), infeasible=tuple(infeasible), timings=timings,
                         min_budget_bytes=minimum, store_all_predicted_bytes=store_all, solver_match=solver_match,
                         skipped=tuple(skipped),
                         plain64_err=next(r.grad_rel_err for r in measured if r.name == PLAIN),
                         machine=machine_info(config.num_threads) if device.type == "cpu" else
                         f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}",
                         source=source_version(), load_before=load_before, load_after=load_average(),
                         runtime_s=time.perf_counter() - began, first_compile=first_compile,
                         inductor_min_bytes=inductor_min)

# --- command line --------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> tuple[CompareConfig, Path | None, Path | None]:
    defaults = CompareConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--width", type=int, default=defaults.width, help="channels of the first stage")
    parser.add_argument("--stages", type=int, default=defaults.stages, help="resolution stages, one ODE block each")
    parser.add_argument("--nt", type=int, default=defaults.nt, help="time steps per ODE block")
    parser.add_argument("--method", default=defaults.method, choices=["euler", "rk2"],
                        help="ODE solver (torchdiffeq has no classical RK4 fixed-grid solver)")
    parser.add_argument("--norm", default=defaults.norm, choices=["batch", "group"], help="normalisation layer")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="images per training step")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the weights and the batch")
    parser.add_argument("--repeats", type=int, default=defaults.repeats, help="timing rounds")
    parser.add_argument("--threads", type=int, default=defaults.num_threads, help="torch.set_num_threads")
    parser.add_argument("--compile-budgets", type=float, nargs="*", default=list(defaults.compile_budgets),
                        help="activation_memory_budget fractions for torch.compile; none to skip it")
    parser.add_argument("--device", default=defaults.device, help="cpu or cuda")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: width 4, 2 stages, nt 2, batch 8, 3 rounds, one compile budget")
    parser.add_argument("--write", nargs="?", type=Path, const=RESULTS_PATH, default=None, metavar="PATH",
                        help=f"also replace the section {SECTION_TITLE[3:]!r} of PATH (default {RESULTS_PATH.name}) "
                             "and draw the plot")
    parser.add_argument("--plot", type=Path, default=None, metavar="PNG",
                        help=f"draw the plot here (default with --write: {DEFAULT_PLOT.name} next to this script)")
    args = parser.parse_args(argv)
    config = CompareConfig(width=args.width, stages=args.stages, nt=args.nt, method=args.method, norm=args.norm,
                           batch_size=args.batch_size, seed=args.seed, repeats=args.repeats,
                           num_threads=args.threads, compile_budgets=tuple(args.compile_budgets), device=args.device)
    if args.quick:
        config = replace(config, width=4, stages=2, nt=2, batch_size=8, repeats=3,
                         compile_budgets=config.compile_budgets[:1], quick=True)
    if args.quick and args.write is not None and args.write.resolve() == RESULTS_PATH:
        parser.error(f"--quick results are a smoke test; give --write another PATH than {RESULTS_PATH}")
    if config.repeats < 1:
        parser.error(f"--repeats {config.repeats}: give at least 1 (5 or more for reportable timings)")
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {config.device}: no CUDA device is available")
    default_plot = DEFAULT_PLOT.with_name("compare-cuda.png") if config.device.startswith("cuda") else DEFAULT_PLOT
    plot_path = args.plot if args.plot is not None else (default_plot if args.write is not None else None)
    return config, args.write, plot_path


def main(argv: list[str] | None = None) -> int:
    config, write_path, plot_path = parse_args(argv)
    report = run_compare(config)
    plotted = plot_path is not None and plot(report, plot_path)
    if plotted:
        log(f"wrote {plot_path}")
    plot_name = None
    if plotted and write_path is not None:
        plot_name = os.path.relpath(plot_path, write_path.resolve().parent)
    publish_section(render_section(report, plot_name, compiled_mode_section(report)), write_path, report.runtime_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
