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
the batch. Each measurement is logged before it starts (``"anode_plan.batch"`` logger at
``INFO``; ``tools/plan_report.py`` prints it) with the time it is expected to take (the
nearest measured batch's, scaled by the batch) and the memory, and after it with what it
took. Measuring allocates more than a training step under a tight plan: the cost model's
runs tape whole stages (the default ODE-ResNet's measurement at batch 1,200 allocated
1,139 MiB at once, 1.9 times its smallest schedule's budget and half its store-all one,
on the 2-core EPYC CPU with torch 2.14.1 and two threads),
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

import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from anode_plan.budget import parse_memory_budget
from anode_plan.calibrate import UNCALIBRATED_MARGIN
from anode_plan.compiler import Plan, plan_for_budget
from anode_plan.costmodel import lower_to_chain
from anode_plan.errors import AnodePlanError, ExampleInputsError, InfeasibleBudgetError
from anode_plan.memory import AllocatorMeter
from anode_plan.trace import TracedModel, trace_model
from planners import Chain, format_bytes
from planners.chain import WORKSPACE_FIELDS

_log = logging.getLogger("anode_plan.batch")

_SCALED = ("tape_bytes", "fwd_taped_bytes", "fwd_untaped_bytes", "bwd_bytes", "rerun_taped_bytes", "fwd_cost",
           "bwd_cost", *WORKSPACE_FIELDS)
_STRUCTURE = ("name", "saves_input", "saves_output", "param_ids", "block", "step", "saved_values", "uses_rng")


@dataclass(frozen=True)
class BatchPoint:
    """The plan at one batch size: ``fits`` the budget (and ``max_overhead``) or not.

    ``measured``: the chain was measured at this batch (else predicted from two that were).
    ``peak_bytes`` / ``overhead``: the plan's predicted peak and recompute overhead, or
    for a batch that does not fit, the smallest budget it needs (``min_budget_bytes``).
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
class MachineMemory:
    """The memory a device has free now, and where the number comes from (``source``)."""

    available_bytes: int
    device: str
    source: str


@dataclass(frozen=True)
class MachineMemoryStop:
    """Where :func:`search_batch_size` stopped short of the budget: ``batch`` needs more memory than the device has.

    Predicted on the measured chains' line, before anything at ``batch`` was allocated:
    ``measuring_bytes``, the most that measuring its chain would allocate at once (on the
    line through what measuring the smaller batches did; ``None`` where it cannot be
    metered), and ``step_peak_bytes`` + ``input_bytes``, what a training step under its
    plan needs (the plan's peak, or where no plan fits the budget the smallest budget one
    needs, plus the batch of inputs, which a budget excludes). ``needed_bytes``, the larger,
    is over ``memory.available_bytes``. ``largest_batch_within`` is the largest batch
    predicted to fit the memory (at least the largest confirmed). Where it is larger,
    ``budget_within_bytes`` is the smallest budget the batch below it needs: a search
    under at most that budget answers below ``largest_batch_within``, and the batch past
    its answer that it measures to confirm it fits the memory too.
    """

    batch: int
    step_peak_bytes: int
    input_bytes: int
    measuring_bytes: int | None
    memory: MachineMemory
    largest_batch_within: int
    budget_within_bytes: int | None

    @property
    def needed_bytes(self) -> int:
        return max(self.step_peak_bytes + self.input_bytes, self.measuring_bytes or 0)

    def describe(self) -> str:
        """``batch 30511 needs 28.39 GiB to measure and 15.26 GiB (...) to train, and the cpu has 20.80 GiB ...``."""
        measure = "" if self.measuring_bytes is None else f"{format_bytes(self.measuring_bytes)} to measure and "
        return (f"batch {self.batch} needs {measure}{format_bytes(self.step_peak_bytes + self.input_bytes)} to train "
                f"(predicted step peak {format_bytes(self.step_peak_bytes)} + input batch "
                f"{format_bytes(self.input_bytes)}), and the {self.memory.device} has "
                f"{format_bytes(self.memory.available_bytes)} available ({self.memory.source})")

    def advice(self) -> str:
        """How to search within this machine: the budget that its largest batch within memory needs."""
        if self.budget_within_bytes is None:
            return f"no batch above {self.largest_batch_within} fits this machine's memory"
        return (f"batches up to about {self.largest_batch_within} fit this machine's memory; a budget up to "
                f"{format_bytes(self.budget_within_bytes)} ({self.budget_within_bytes} bytes, the least batch "
                f"{self.largest_batch_within - 1} needs) keeps the search within it")


@dataclass(frozen=True)
class BatchMeasurement:
    """One chain :func:`search_batch_size` measured: how long it took, and the most it allocated at once.

    ``peak_bytes`` is the allocator's count of the whole measurement (inputs, the cost
    model's runs, calibration) on the CPU; on CUDA, what the caching allocator holds
    reserved after it, beyond what was allocated before (a bound); ``None`` elsewhere.
    """

    batch: int
    seconds: float
    peak_bytes: int | None


class MachineMemoryError(AnodePlanError, MemoryError):
    """:func:`max_batch_size` stopped at the machine's memory before it reached the budget.

    ``batch`` is the largest batch confirmed to fit the budget; ``stop`` says which batch
    would not fit the device, with the numbers.
    """

    def __init__(self, message: str, batch: int, stop: MachineMemoryStop) -> None:
        super().__init__(message)
        self.batch = batch
        self.stop = stop


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


def available_memory(device: torch.device | str) -> MachineMemory | None:
    """The memory ``device`` has free now, or ``None`` where it cannot be read.

    CPU: ``MemAvailable`` in ``/proc/meminfo`` on Linux (free memory plus what the kernel
    can reclaim), else the free pages of ``os.sysconf`` (which leaves out the page cache,
    so it reads low). CUDA: ``torch.cuda.mem_get_info``'s free bytes plus what PyTorch's
    caching allocator holds reserved but unused.
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return MachineMemory(free + cached, str(device), "torch.cuda.mem_get_info, with the allocator's free cache")
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return MachineMemory(int(line.split()[1]) * 1024, "cpu", "MemAvailable in /proc/meminfo")
    except OSError:
        pass
    try:
        pages, page_bytes = os.sysconf("SC_AVPHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None
    return MachineMemory(pages * page_bytes, "cpu", "free pages, os.sysconf('SC_AVPHYS_PAGES')")


def chain_at(measured: dict[int, Chain], batch: int) -> Chain:
    """The chain measured at ``batch``, or the one on the line through the two nearest measured batches."""
    if batch in measured:
        return measured[batch]
    nearest = sorted(measured, key=lambda b: (abs(b - batch), b))[:2]
    return interpolate_chain(measured[nearest[0]], nearest[0], measured[nearest[1]], nearest[1], batch)


def _evaluate(chain: Chain, traced: TracedModel, example_inputs: Sequence[torch.Tensor], batch: int, budget: int,
              planner: Any, margin: float, max_overhead: float | None, measured: bool) -> tuple[BatchPoint, Plan | None]:
    """The point at ``batch`` of ``chain``, and its plan when one fits the budget."""
    try:
        plan = plan_for_budget(chain, traced, _shaped(example_inputs, batch), budget, planner, workspace_margin=margin)
    except InfeasibleBudgetError as error:
        return BatchPoint(batch, False, measured, min_budget_bytes=error.min_budget_bytes), None
    fits = max_overhead is None or plan.recompute_overhead <= max_overhead + 1e-12
    return BatchPoint(batch, fits, measured, plan.predicted_peak_bytes, plan.recompute_overhead), plan


def batch_curve(search: "BatchSearch", batches: Sequence[int], planner: Any = None) -> list[BatchPoint]:
    """Predicted points at ``batches`` from the chains ``search`` measured (for a batch/overhead plot)."""
    measured = dict(search.measured_chains)
    return [_evaluate(chain_at(measured, batch), search.traced, search.example_inputs, batch, search.budget_bytes, planner, search.workspace_margin, search.max_overhead, batch in measured)[0]
            for batch in batches]


def interpolate_chain(first: Chain, first_batch: int, second: Chain, second_batch: int, batch: int) -> Chain:
    """The chain at ``batch``, each byte count and cost on the line through its values at two batch sizes.

    The two chains must have the same structure (stages, blocks, saved values), as the
    same traced model lowered at two batch sizes has. Bytes round up; a workspace never
    exceeds the peak it is part of.
    """
    if len(first.stages) != len(second.stages) or first.state_values != second.state_values:
        raise ValueError(f"the chains at batch {first_batch} and {second_batch} differ in structure")
    share = (batch - first_batch) / (second_batch - first_batch)

    def line(a: float, b: float, integer: bool = True) -> Any:
        value = a + (b - a) * share
        return max(0, math.ceil(value - 1e-9)) if integer else max(0.0, value)

    values = tuple(line(a, b) for a, b in zip(first.value_bytes, second.value_bytes))
    state_bytes = [sum(values[v] for v in state) for state in first.state_values]
    stages = []
    for index, (a, b) in enumerate(zip(first.stages, second.stages)):
        for name in _STRUCTURE:
            if getattr(a, name) != getattr(b, name):
                raise ValueError(f"stage {index} differs in {name} at batch {first_batch} and {second_batch}")
        fields = {name: line(getattr(a, name), getattr(b, name), isinstance(getattr(a, name), int))
                  for name in _SCALED}
        for workspace, peak in zip(WORKSPACE_FIELDS, ("fwd_untaped_bytes", "fwd_taped_bytes", "rerun_taped_bytes",
                                                      "bwd_bytes")):
            fields[workspace] = min(fields[workspace], fields[peak])
        stages.append(dataclasses.replace(a, input_bytes=state_bytes[index], output_bytes=state_bytes[index + 1],
                                          **fields))
    head = line(first.head_bytes, second.head_bytes)
    name = first.name.replace(f"(batch {first_batch})", f"(batch {batch})")
    return dataclasses.replace(first, stages=tuple(stages), value_bytes=values, head_bytes=head, name=name)


def batch_inputs(example_inputs: Sequence[torch.Tensor], batch: int) -> tuple[torch.Tensor, ...]:
    """``example_inputs`` at another batch size: their rows repeated in turn (so integer labels stay valid)."""
    rows = torch.arange(batch, device=example_inputs[0].device) % example_inputs[0].shape[0]
    out = []
    for x in example_inputs:
        resized = x.detach()[rows]
        out.append(resized.requires_grad_(x.requires_grad))
    return tuple(out)


def search_batch_size(model: nn.Module, memory_budget: int | float | str, example_inputs: Sequence[torch.Tensor], *,
                      max_overhead: float | None = None, planner: Any = None, leaf_modules: Sequence[type] = (),
                      calibrate: bool = True, max_batch: int = 1 << 20) -> BatchSearch:
    """:func:`max_batch_size`, with the plan at the answer and every batch evaluated on the way."""
    budget = parse_memory_budget(memory_budget)
    if max_overhead is not None and not max_overhead >= 0:
        raise ValueError(f"max_overhead={max_overhead!r} must be a fraction >= 0 (0.3 allows 30% recompute) or None")
    _check_batched(example_inputs)
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
        return _on_line(peaks, batch) if peaks else None

    def measure(batch: int) -> Chain:
        if batch not in measured:
            _log.info("max batch: measuring the chain at batch %d%s", batch,
                      _expectation(batch, measurements, measuring_bytes(batch)))
            began = time.perf_counter()
            measured[batch], peak = _metered(lambda: lower_to_chain(
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
                       tuple(sorted(measured.items())), budget, max_overhead, margin, _shaped(example_inputs, 1),
                       limited_by=limited_by, stopped=stopped,
                       measurements=tuple(measurements[b] for b in sorted(measurements)))


def _metered(measure: Callable[[], Chain], device: torch.device) -> tuple[Chain, int | None]:
    """``measure()``, and the most memory it allocated at once on ``device`` (:class:`BatchMeasurement`)."""
    if device.type == "cpu":
        with AllocatorMeter(device) as meter:
            chain = measure()
        return chain, meter.peak_bytes()
    if device.type == "cuda":
        # The cost model's own meters reset the allocator's peak statistics, so the peak is
        # bounded instead by what the caching allocator holds reserved afterwards (it keeps
        # the blocks it reserved until empty_cache), from a cache emptied first.
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(device)
        chain = measure()
        torch.cuda.synchronize(device)
        return chain, torch.cuda.memory_reserved(device) - before
    return measure(), None


def _on_line(values: dict[int, int], batch: int) -> int:
    """The value at ``batch`` on the line through the two nearest batches of ``values`` (in proportion, with one)."""
    nearest = sorted(values, key=lambda b: (abs(b - batch), -b))[:2]
    if len(nearest) == 1:
        return math.ceil(values[nearest[0]] * batch / nearest[0])
    (a, value_a), (b, value_b) = ((n, values[n]) for n in nearest)
    return max(0, math.ceil(value_a + (value_b - value_a) * (batch - a) / (b - a)))


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


def _shaped(example_inputs: Sequence[torch.Tensor], batch: int) -> tuple[torch.Tensor, ...]:
    """Inputs of the batch's shapes for a plan's record, without memory (meta tensors)."""
    return tuple(torch.empty((batch, *x.shape[1:]), dtype=x.dtype, device="meta").requires_grad_(x.requires_grad)
                 for x in example_inputs)


def _check_batched(example_inputs: Sequence[torch.Tensor]) -> None:
    if not isinstance(example_inputs, (tuple, list)) or not example_inputs or \
            not all(isinstance(x, torch.Tensor) for x in example_inputs):
        raise ExampleInputsError("example_inputs must be a non-empty tuple of tensors, e.g. example_inputs=(x,)")
    batches = {x.shape[0] if x.dim() else None for x in example_inputs}
    if len(batches) != 1 or None in batches:
        shapes = [tuple(x.shape) for x in example_inputs]
        raise ExampleInputsError(f"the batch is dimension 0 of every input, and these inputs disagree on it (shapes "
                                 f"{shapes}); max_batch_size needs inputs of one batch size")


def max_batch_size(model: nn.Module, memory_budget: int | float | str, example_inputs: Sequence[torch.Tensor], *,
                   max_overhead: float | None = None, planner: Any = None, leaf_modules: Sequence[type] = (),
                   calibrate: bool = True) -> int:
    """The largest batch (dimension 0 of every input) whose training step fits ``memory_budget``.

    ``max_overhead`` (e.g. ``0.3``) also asks that the plan at that batch recompute at
    most that share of a step's compute (predicted, as :attr:`Plan.recompute_overhead`).
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
