"""The largest batch that trains under a memory budget, and what it costs in recompute.

Use :func:`max_batch_size` to answer "what is the largest batch I can train in 16 GB,
and how much slower is it?" without bisecting :func:`anode_plan.compile` by hand.

Searching by compiling at every candidate would measure the model a dozen times. The
memory of a stage grows with the batch as ``a + b·batch`` (activations and tapes are
per sample; parameters and their gradients are not), so the search measures the chain
at two batch sizes, predicts the chain at any other batch from those two
(:func:`interpolate_chain`), and bisects on the predictions with the planners alone,
which are pure and fast. Kernel workspaces are not quite linear (on the CPU, the
store-all peak predicted at batch 6 from batches 4 and 9 is within 1% of the measured
one, ``tests/test_batch.py``, not equal), so the answer is then *confirmed* by measuring
the chain for real at it and at one more: the search ends only when the measured chain at the
answer fits and the measured chain one batch above does not. Each confirmation that
fails becomes a measured point for the next prediction.

Measuring a chain runs the model at that batch for real, so its time and memory grow with
the batch. Each measurement is logged before it starts (``"anode_plan.analysis.batch"`` logger at
``INFO``; ``tools/plan_report.py`` prints it) with the time it is expected to take (the
nearest measured batch's, scaled by the batch) and the memory, and after it with what it
took. Measuring allocates more than a training step under a tight plan: the cost model's
runs tape whole stages (``ode_resnet()``'s measurement at batch 32 allocated 30.04 MiB at
once as the allocator counts it, 1.82 times its smallest schedule's budget and 0.46 of its store-all
one, on the 2-core EPYC with torch 2.14.1 and two threads),
so each measurement's peak is metered (:class:`~anode_plan.memory.AllocatorMeter`) and
the next one's is predicted on their line, which grows with the batch as the chains do.
Before measuring a batch the search predicts what it needs, to measure it and to train it
(the plan's step peak plus the batch of inputs, which a budget excludes), and compares
that with the memory the device has free (:func:`available_memory`). When it needs more,
nothing is allocated: the search stops there, at the largest batch confirmed so far, and
says so (:attr:`BatchSearch.limited_by` is ``"machine memory"``; :attr:`BatchSearch.stopped`
has the numbers and a budget that keeps a search within the machine).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from anode_plan.analysis.batch_chains import batch_inputs, chain_at, check_batched, meta_inputs
from anode_plan.analysis.machine_memory import MachineMemoryStop, available_memory, metered, on_line
from anode_plan.budget import parse_memory_budget
from anode_plan.errors import InfeasibleBudgetError, MachineMemoryError
from anode_plan.measure.calibrate import UNCALIBRATED_MARGIN
from anode_plan.measure.lower import lower_to_chain
from anode_plan.plans.plan import Plan, plan_for_budget
from anode_plan.tracing.trace import TracedModel, trace_model
from planners import Chain, format_bytes

_log = logging.getLogger("anode_plan.analysis.batch")


@dataclass(frozen=True)
class BatchPoint:
    """The plan at one batch size: ``fits`` the budget (and ``max_overhead``) or not.

    ``measured``: the chain was measured at this batch (else predicted from two that were).
    ``peak_bytes`` / ``overhead``: the plan's predicted peak and its overhead (how much
    longer its predicted step takes than plain autograd's, :attr:`Plan.predicted_slowdown`
    less one: measured milliseconds when calibrated), or for a batch that does not fit,
    the smallest budget it needs (``min_budget_bytes``).
    """

    batch: int
    fits: bool
    measured: bool
    peak_bytes: int | None = None
    overhead: float | None = None
    min_budget_bytes: int | None = None

    @property
    def excluded_by(self) -> str | None:
        """Why the batch does not fit: ``"budget"`` (no schedule fits), ``"max_overhead"`` (one fits, recomputing
        more than allowed), or ``None`` when it fits."""
        if self.fits:
            return None
        return "budget" if self.peak_bytes is None else "max_overhead"

    @property
    def step_bytes(self) -> int:
        """What a training step at this batch needs, the inputs aside: the plan's peak, or the smallest budget."""
        return self.peak_bytes if self.peak_bytes is not None else self.min_budget_bytes


@dataclass(frozen=True)
class BatchMeasurement:
    """One chain :func:`search_batch_size` measured: how long it took, and the most it allocated at once.

    ``peak_bytes`` is the allocator's count of the whole measurement (inputs, the cost
    model's runs, calibration) on the CPU and on CUDA; ``None`` on other devices.
    """

    batch: int
    seconds: float
    peak_bytes: int | None


@dataclass(frozen=True)
class BatchSearch:
    """What :func:`search_batch_size` found.

    ``batch`` is the answer (0: not one sample fits) and ``plan`` the plan measured at it;
    ``points`` every batch evaluated, predicted or measured; ``measured_chains`` the chains
    measured (at ``measured_batches``), from which :func:`batch_curve` predicts others, and
    ``measurements`` what each measurement took (time, memory).

    ``limited_by`` says what ends the search above ``batch``: ``"budget"`` or
    ``"max_overhead"`` (the measured chain at ``batch + 1`` does not fit them),
    ``"max_batch"`` (the search's upper bound), or ``"machine memory"``: the next batch
    to measure needs more memory than the device has free (``stopped`` has the numbers),
    so ``batch`` is the largest confirmed before the search stopped, and a larger one may
    fit the budget on a machine with more memory.
    """

    batch: int
    plan: Plan | None
    points: tuple[BatchPoint, ...]
    traced: TracedModel
    measured_chains: tuple[tuple[int, Chain], ...]
    budget_bytes: int
    max_overhead: float | None
    workspace_margin: float
    example_inputs: tuple[torch.Tensor, ...]  # meta tensors: the inputs' shapes and dtypes
    limited_by: str = "budget"
    stopped: MachineMemoryStop | None = None
    measurements: tuple[BatchMeasurement, ...] = ()

    @property
    def measured_batches(self) -> tuple[int, ...]:
        return tuple(batch for batch, _ in self.measured_chains)


def _evaluate(chain: Chain, traced: TracedModel, example_inputs: Sequence[torch.Tensor], batch: int, budget: int,
              planner: Any, margin: float, max_overhead: float | None, measured: bool) -> tuple[BatchPoint, Plan | None]:
    """The point at ``batch`` of ``chain``, and its plan when one fits the budget."""
    try:
        plan = plan_for_budget(chain, traced, meta_inputs(example_inputs, batch), budget, planner, workspace_margin=margin)
    except InfeasibleBudgetError as error:
        return BatchPoint(batch, False, measured, min_budget_bytes=error.min_budget_bytes), None
    overhead = plan.predicted_slowdown - 1.0
    fits = max_overhead is None or overhead <= max_overhead + 1e-12
    return BatchPoint(batch, fits, measured, plan.predicted_peak_bytes, overhead), plan


def batch_curve(search: "BatchSearch", batches: Sequence[int], planner: Any = None) -> list[BatchPoint]:
    """Predicted points at ``batches`` from the chains ``search`` measured (for a batch/overhead plot)."""
    measured = dict(search.measured_chains)
    return [_evaluate(chain_at(measured, batch), search.traced, search.example_inputs, batch, search.budget_bytes, planner, search.workspace_margin, search.max_overhead, batch in measured)[0]
            for batch in batches]


def search_batch_size(model: nn.Module, memory_budget: int | float | str, example_inputs: Sequence[torch.Tensor], *,
                      max_overhead: float | None = None, planner: Any = None, leaf_modules: Sequence[type] = (),
                      calibrate: bool = True, max_batch: int = 1 << 20) -> BatchSearch:
    """:func:`max_batch_size`, with the plan at the answer and every batch evaluated on the way."""
    budget = parse_memory_budget(memory_budget)
    if max_overhead is not None and not max_overhead >= 0:
        raise ValueError(f"max_overhead={max_overhead!r} must be a fraction >= 0 (0.3 allows a step 30% slower than plain autograd's) or None")
    check_batched(example_inputs)
    margin = 0.0 if calibrate else UNCALIBRATED_MARGIN
    traced_at: dict[int, TracedModel] = {}
    first_trace = trace_model(model, example_inputs, leaf_modules=leaf_modules)

    def traced_for(batch: int) -> TracedModel:
        if first_trace.batch_specialised is None:
            return first_trace
        if batch not in traced_at:
            traced_at[batch] = trace_model(model, batch_inputs(example_inputs, batch), leaf_modules=leaf_modules)
        return traced_at[batch]

    measured: dict[int, Chain] = {}
    measurements: dict[int, BatchMeasurement] = {}
    points: dict[tuple[int, bool], BatchPoint] = {}
    plans: dict[int, Plan] = {}
    device = example_inputs[0].device
    sample_bytes = sum(x.numel() // x.shape[0] * x.element_size() for x in example_inputs)

    def measuring_bytes(batch: int) -> int | None:
        """What measuring the chain at ``batch`` allocates at once, on the line through the measurements so far."""
        peaks = {m.batch: m.peak_bytes for m in measurements.values() if m.peak_bytes is not None}
        return on_line(peaks, batch) if peaks else None

    def measure(batch: int) -> Chain:
        if batch not in measured:
            _log.info("max batch: measuring the chain at batch %d%s", batch,
                      _expectation(batch, measurements, measuring_bytes(batch)))
            began = time.perf_counter()
            measured[batch], peak = metered(lambda: lower_to_chain(
                model, traced_for(batch), batch_inputs(example_inputs, batch), calibrate=calibrate), device)
            measurements[batch] = BatchMeasurement(batch, time.perf_counter() - began, peak)
            _log.info("max batch: measured batch %d in %s%s", batch, _duration(measurements[batch].seconds),
                      "" if peak is None else f", {format_bytes(peak)} at the peak")
        return measured[batch]

    def predicted(batch: int) -> BatchPoint:
        """The point at ``batch``: measured there, or on the line through the two nearest measured batches."""
        real = batch in measured
        if (batch, real) not in points:
            point, plan = _evaluate(chain_at(measured, batch), traced_for(batch) if real else first_trace,
                                    example_inputs, batch, budget, planner, margin, max_overhead, real)
            points[(batch, real)] = point
            if plan is not None and real and point.fits:
                plans[batch] = plan
        return points[(batch, real)]

    def needed_bytes(batch: int) -> int:
        """Measuring or training ``batch``, whichever needs more, as predicted (nothing allocated)."""
        return max(predicted(batch).step_bytes + batch * sample_bytes, measuring_bytes(batch) or 0)

    def over_machine(batch: int) -> MachineMemoryStop | None:
        """Where ``batch`` needs more memory than the device has free, why; else ``None``."""
        free = available_memory(device)
        if free is None or needed_bytes(batch) <= free.available_bytes:
            return None
        within = _bisect(fit, batch, lambda b: needed_bytes(b) <= free.available_bytes)
        smallest = None
        if within > fit:  # a search whose answer is within - 1 measures within to confirm it
            below = within - 1
            smallest = _evaluate(chain_at(measured, below), first_trace, example_inputs, below, 1, planner, margin,
                                 None, below in measured)[0].min_budget_bytes
        return MachineMemoryStop(batch, predicted(batch).step_bytes, batch * sample_bytes, measuring_bytes(batch),
                                 free, within, smallest)

    base = example_inputs[0].shape[0]
    measure(base)
    measure(base + max(1, base // 2))
    # The bracket: the largest batch measured to fit and the smallest measured not to.
    fail = min([b for b in measured if b <= max_batch and not predicted(b).fits], default=max_batch + 1)
    fit = max([b for b in measured if b < fail and predicted(b).fits], default=0)
    stopped = None
    # Every round predicts the boundary between them, then measures there: the bracket
    # narrows until they are neighbours, and the predictions sharpen as measured points
    # come closer. A batch that would not fit the device's memory is not measured.
    while fail - fit > 1:
        high = max(fit, 1)
        while high < fail and predicted(high).fits:
            high = min(2 * high, fail)
        # The last batch predicted to fit, but at least one past the bracket's fitting end.
        candidate = max(_bisect(fit, high, lambda b: predicted(b).fits), fit + 1) if high < fail else fail - 1
        if candidate not in measured:
            stopped = over_machine(candidate)
            if stopped is not None:
                _log.info("max batch: stopped at the machine's memory, not the budget: %s; the largest batch "
                          "confirmed is %d", stopped.describe(), fit)
                break
        measure(candidate)
        if predicted(candidate).fits:
            fit = candidate
        else:
            fail = candidate
    limited_by = "machine memory" if stopped is not None else \
        "max_batch" if fail > max_batch else predicted(fail).excluded_by
    ordered = tuple(sorted(points.values(), key=lambda p: (p.batch, p.measured)))
    spent = sum(m.seconds for m in measurements.values())
    _log.info("max batch: largest batch under %s: %d, limited by %s (%d chains measured in %s, %d points)",
              format_bytes(budget), fit, limited_by, len(measured), _duration(spent), len(ordered))
    return BatchSearch(fit, plans.get(fit), ordered, traced_for(fit) if fit else first_trace,
                       tuple(sorted(measured.items())), budget, max_overhead, margin, meta_inputs(example_inputs, 1),
                       limited_by=limited_by, stopped=stopped,
                       measurements=tuple(measurements[b] for b in sorted(measurements)))


def _expectation(batch: int, measurements: dict[int, BatchMeasurement], peak_bytes: int | None) -> str:
    """``" (expect about 12 s and 45.60 MiB: batch 48 took 8.1 s, time scaled by batch, memory on the line)"``."""
    if not measurements:
        return ""
    nearest = min(measurements, key=lambda b: (abs(b - batch), -b))
    expected = measurements[nearest].seconds * batch / nearest
    memory = "" if peak_bytes is None else f" and {format_bytes(peak_bytes)}"
    line = "" if peak_bytes is None else ", memory on the line through the measured batches"
    return (f" (expect about {_duration(expected)}{memory}: batch {nearest} took "
            f"{_duration(measurements[nearest].seconds)}, time scaled by batch{line})")


def _duration(seconds: float) -> str:
    """``0.4 s``, ``12 s``, ``7.5 min``, ``2.1 h``."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _bisect(low: int, high: int, fits: Callable[[int], bool]) -> int:
    """The last batch in ``[low, high)`` that fits, given ``low`` fits (or is 0) and ``high`` does not."""
    while high - low > 1:
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    return low


def max_batch_size(model: nn.Module, memory_budget: int | float | str, example_inputs: Sequence[torch.Tensor], *,
                   max_overhead: float | None = None, planner: Any = None, leaf_modules: Sequence[type] = (),
                   calibrate: bool = True) -> int:
    """The largest batch (dimension 0 of every input) whose training step fits ``memory_budget``.

    ``max_overhead`` (e.g. ``0.3``) also asks that the plan's predicted step at that batch
    take at most that much longer than plain autograd's (:attr:`Plan.predicted_slowdown`,
    in the milliseconds calibration measured; FLOP-model costs with ``calibrate=False``).
    The answer is confirmed on measured chains: ``compile`` at it fits, and one batch
    more does not. 0 means not even one sample fits. Raises :class:`MachineMemoryError` (with
    the largest batch confirmed) when the search reaches a batch that needs more memory than
    the device has free before it reaches the budget. The other arguments are
    :func:`anode_plan.compile`'s; :func:`search_batch_size` also returns the plan and the
    batch/overhead points it evaluated (``tools/plan_report.py --max-batch`` prints them).
    """
    found = search_batch_size(model, memory_budget, example_inputs, max_overhead=max_overhead, planner=planner,
                              leaf_modules=leaf_modules, calibrate=calibrate)
    if found.stopped is not None:
        raise MachineMemoryError(
            f"max_batch_size(memory_budget={memory_budget!r}) stopped at this machine's memory, not the budget: "
            f"{found.stopped.describe()}, so it was not measured. The largest batch confirmed to fit the budget is "
            f"{found.batch}; a larger one may fit it on a device with more memory. Search on the machine the budget "
            f"is for, or within this one: {found.stopped.advice()}.", found.batch, found.stopped)
    return found.batch
