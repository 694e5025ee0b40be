"""Measure a compiled unit's training step on the device: its allocator peak and its time.

A unit (:mod:`anode_plan.stages.unit`) is one Inductor graph whose saved activations the
partitioner chose and whose buffers generated code allocates, so nothing short of running
it says what it needs. :func:`measure_unit_step` runs forward, a stand-in loss (the mean of
the squared outputs, which like a classification loss keeps an output-sized value for its
backward and hands backward an output-sized gradient; the outputs themselves are let go,
as a training step lets them go), then backward, under the allocator meter
(:class:`~anode_plan.memory.AllocatorMeter`: the profiler's allocation events on the CPU,
``max_memory_allocated`` on CUDA), on the example batch, and times the same step
(:mod:`anode_plan.measure.timing`). The step's predicted peak is what the allocator counted
in it, or, if more, what forward left allocated plus the output's gradient and the loss's
allowance (``Chain.head_bytes``, as the planners charge a loss), whichever is larger.

The prediction is a measurement of the step itself, not a model of it, so a unit may use
the whole budget (no :data:`anode_plan.budget.PREDICTION_RESERVE`): the allocator counts
the same allocations in the same order in every step of one compiled graph (in
``benchmarks/RESULTS.md``, "Compared with the alternatives", the training steps of the units at
``torch.compile``'s three peaks measured their predicted 120.28, 64.77 and 67.00 MiB).

The model is left as it was: gradients come from ``autograd.grad`` (no ``.grad`` written),
and BatchNorm statistics and the RNG are put back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from anode_plan.measure.phases import needing_grad, stand_in_loss
from anode_plan.measure.timing import Stopwatch, time_phases
from anode_plan.memory import AllocatorMeter, allocated_bytes
from anode_plan.model_state import state_restored

TIMED_STEPS = (5, 9)
"""The fewest and most timed steps of a unit (after an untimed one: the first steps after compiling can be slow),
at least :data:`anode_plan.measure.timing.MIN_TIMED_MS` of them; their median is its step time. A whole step
is timed, not a stage, so a few suffice; more than 3, because one disturbed step of 3 moves the median (a
compare.py run predicted a unit's step at 295 ms from 3 steps, and then measured it at 207 ms)."""


@dataclass(frozen=True)
class UnitStep:
    """A unit's measured training step.

    Attributes:
        peak_bytes: the predicted peak of a training step: the allocator's peak over
            forward and backward, or forward's leftovers plus the output's gradient and
            the loss's allowance if that is more (on top of what was allocated at the start).
        forward_kept_bytes: what forward left allocated (the saved activations and outputs).
        step_ms: the median step time, in milliseconds.
        noise: the steps' interquartile range over their median.
    """

    peak_bytes: int
    forward_kept_bytes: int
    step_ms: float
    noise: float


def run_step(fn: Callable[[tuple], Any], model: nn.Module, inputs: Sequence[torch.Tensor],
             watch: Stopwatch | None = None, meter: AllocatorMeter | None = None) -> tuple[int, int, int]:
    """One training step of the unit ``fn`` on ``inputs``: forward, the stand-in loss
    (:func:`~anode_plan.measure.phases.stand_in_loss`; the outputs are let go, as a training step
    lets them go), backward by ``autograd.grad``. ``watch`` times it (lap ``"step"``); ``meter`` marks
    its start and the end of forward. Returns those two marks (0 without a meter) and the outputs' bytes."""
    inputs = tuple(x.detach().requires_grad_(x.requires_grad) for x in inputs)
    wrt = needing_grad(inputs) + [p for p in model.parameters() if p.requires_grad]
    start = meter.mark() if meter is not None else 0
    if watch is not None:
        watch.start()
    outputs = fn(inputs)
    after_forward = meter.mark() if meter is not None else 0
    output_bytes = sum(allocated_bytes(o) for o in needing_grad(outputs))
    loss = stand_in_loss(outputs)
    del outputs
    if wrt and loss.requires_grad:
        torch.autograd.grad(loss, wrt, allow_unused=True)
    del loss
    if watch is not None:
        watch.lap("step")
    return start, after_forward, output_bytes


def measure_unit_step(fn: Callable[[tuple], Any], model: nn.Module, inputs: Sequence[torch.Tensor], *,
                      head_bytes: int) -> UnitStep:
    """``fn``'s (a compiled unit's function, already compiled) training step on ``inputs``, measured."""
    device = inputs[0].device
    with state_restored(model, device):
        with AllocatorMeter(device) as meter:
            start, after_forward, output_bytes = run_step(fn, model, inputs, meter=meter)
            end = meter.mark()
        peak = meter.peak_bytes(start, end)
        kept = meter.allocated_bytes(after_forward) - meter.allocated_bytes(start)
        times = time_phases(lambda watch: run_step(fn, model, inputs, watch=watch), device,
                            min_repeats=TIMED_STEPS[0], max_repeats=TIMED_STEPS[1])
    return UnitStep(peak_bytes=max(peak, kept + output_bytes + head_bytes), forward_kept_bytes=kept,
                    step_ms=times.get("step"), noise=times.noise.get("step", 0.0))
