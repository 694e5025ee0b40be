"""Calibrate the cost model on the real device: the memory kernels allocate inside themselves.

Fake tensors run no kernel, so the cost model (:mod:`anode_plan.measure.chain`) sees every
tensor a stage makes but nothing a kernel allocates and frees within one call: the two
activation-sized buffers of a CPU convolution's backward, cuDNN and cuBLAS workspaces,
the copy a matmul makes of a strided input. The budget is what the allocator counts,
so those count. :func:`measure_workspaces` runs each distinct stage for real, once, on
the example batch, in each phase the simulator has (untaped forward, taped forward,
re-run in backward, backward), under two meters at once: the allocator's
(:class:`~anode_plan.memory.AllocatorMeter`) and the storage view
(:class:`~anode_plan.memory.LiveStorageTracker`, what the fake tensors measured). What
the allocator peaks above the storage view in a phase is that phase's workspace, and
the cost model adds it to the phase's peak, so the simulator and every planner charge it
at the moment it occurs.

*Distinct stages* are each layer group and one time step per ODE block, shared by the
block's other steps and by the blocks built alike (:mod:`anode_plan.measure.sharing`): the
measurements are the cost model's, made once more, so repeated blocks add none.

*Times*: each distinct stage is also timed there (:func:`time_stage`: its taped forward, its
backward, and for the first few a one-stage checkpoint region, whose excess prices a region),
so the chain's costs are milliseconds measured on the device (:mod:`anode_plan.measure.timing`);
``docs/algorithms.md`` §12.

*Cost*: one forward of the model without a tape, to carry the batch to the measured
stages, then each measurement (a stage's forwards and a backward, under the profiler) and
its timing (repeated until it has 5 samples and 5 ms of them); with the whole steps
``compile`` then times (:mod:`anode_plan.compiler.step_fit`), ``benchmarks/RESULTS.md``,
"Calibration cost", gives the total against a training step. ``compile(..., calibrate=False)``
skips it (see :data:`UNCALIBRATED_MARGIN`) and plans on FLOP counts.

*Side effects*: none. The stages run on a copy of the model's modules that shares its
parameters and buffers; the buffers (BatchNorm statistics) are put back as they were,
the RNG state is restored, and gradients come from ``autograd.grad``, so no ``.grad``
is written and Python-side counters in the model (``self.nfe += 1``) do not move.

*CUDA*: it runs under the cuDNN settings in force. ``torch.backends.cudnn.benchmark``
picks algorithms with other workspaces, so with it on each stage runs once before it is
measured (autotuning's trials are not the steady state), and a compiled model plans
again when those settings change (:mod:`anode_plan.compiler.plan_cache`).

Background, papers and test values: ``docs/algorithms.md`` §7.
"""

from __future__ import annotations

import contextlib
import copy
import math
import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.checkpoint import checkpoint

from anode_plan.measure.phases import (
    Unmeasured,
    backward_accumulating,
    backward_after,
    backward_alone,
    backward_through_rerun,
    fresh_inputs,
    needing_grad,
)
from anode_plan.measure.timing import PhaseTimes, Stopwatch, time_phases
from anode_plan.memory import AllocatorMeter, LiveStorageTracker
from anode_plan.model_state import generator_states, state_restored
from anode_plan.ode.block import ODEBlock
from anode_plan.stages.reconstruct import inverse_state, measure_walk_step
from anode_plan.tracing.trace import StageFn, TracedModel, run_stage, stage_function
from planners import Stage

UNCALIBRATED_MARGIN = 0.25
"""With ``calibrate=False`` the planner keeps this share of the budget free for the kernel
workspaces it did not measure. It is a margin, not a measurement, and no guarantee: in
the test models the workspace at a plan's peak reached 45% of the step's peak (the MNIST
ODE-net of ``tests/test_allocator_budget.py`` at its smallest budget, inside the CPU's
``convolution_backward`` of a strided convolution), and 18% in a U-Net. Calibrate when
the budget is a hard limit."""


@dataclass(frozen=True)
class Excess:
    """What the allocator counted above the storage view in one measured phase.

    Attributes:
        nbytes: at the phase's peak.
        kernel: the kernel at the allocator's peak.
        kept_bytes: in what the phase leaves allocated at its end (small tensors a kernel
            makes and autograd saves, which no operator returns: a taped forward's tape
            holds them).
    """

    nbytes: int = 0
    kernel: str = ""
    kept_bytes: int = 0


@dataclass(frozen=True)
class Workspaces:
    """The calibration's findings: an :class:`Excess` per (phase label, stage position).

    Labels are those of :mod:`anode_plan.measure.phases`'s measurements: ``"fwd_untaped"``,
    ``"fwd_taped"``, ``"rerun"``, ``"after"``, ``"alone"``, ``"accumulating"``, and
    ``"reconstruct"`` (a walk step of :mod:`anode_plan.stages.reconstruct`).
    ``random_positions``: the stages whose real forward moved a random generator (a
    check on the cost model's count of random operators, which cannot see a kernel
    that draws from the generator without declaring it). ``drift``: per reversible
    block, the relative round-off of a state rebuilt by inverse steps, per step
    inverted (:func:`reconstruction_drift`). ``times``: per stage position timed, its
    taped forward's and its backward's milliseconds (:func:`time_stage`); ``inverse_ms``:
    per reversible step timed, its inverse step's.
    """

    found: Mapping[tuple[str, int], Excess]
    random_positions: frozenset[int] = frozenset()
    drift: Mapping[int, float] = field(default_factory=dict)
    times: Mapping[int, PhaseTimes] = field(default_factory=dict)
    inverse_ms: Mapping[int, float] = field(default_factory=dict)

    def excess(self, label: str, position: int) -> Excess:
        return self.found.get((label, position), Excess())


class _BothMeters:
    """A :class:`~anode_plan.measure.phases.Probe` that reads the storage tracker and marks the allocator meter.

    Each phase's allocator peak is known only once the meter has stopped (:meth:`excesses`).
    """

    def __init__(self, meter: AllocatorMeter, tracker: LiveStorageTracker, position: int) -> None:
        self.meter = meter
        self.tracker = tracker
        self.position = position
        # phase -> (start mark, end mark, storage peak, storage kept at the end)
        self.spans: dict[tuple[str, int], tuple[int, int, int, int]] = {}
        self._start = (0, 0)

    def begin(self) -> None:
        self._start = (self.meter.mark(), self.tracker.reset_peak())

    def end(self, label: str) -> int:
        start, base = self._start
        storage = self.tracker.peak_bytes - base
        self.spans[(label, self.position)] = (start, self.meter.mark(), storage, self.tracker.live_bytes - base)
        return storage

    def excesses(self) -> dict[tuple[str, int], Excess]:
        found = {}
        for key, (start, end, storage, kept) in self.spans.items():
            nbytes = max(0, self.meter.peak_bytes(start, end) - storage)
            allocated = self.meter.allocated_bytes(end) - self.meter.allocated_bytes(start)
            found[key] = Excess(nbytes, (self.meter.kernel_at_peak(start, end) or "") if nbytes else "",
                                max(0, allocated - kept))
        return found


def _measure_runs(kinds: set[str], position: int, traced: TracedModel, twin: nn.Module, inputs: tuple,
                  params: list[torch.Tensor], device: torch.device, make: Callable = stage_function
                  ) -> dict[tuple[str, int], Excess]:
    """Run the measurements ``kinds`` of the stage at ``position`` under both meters (see the module docstring);
    ``make(root, traced, spec)`` makes the stage functions (the cost model's)."""
    spec = traced.stages[position]
    fn = make(twin, traced, spec)
    if device.type == "cuda" and torch.backends.cudnn.benchmark:
        backward_alone(fn, inputs, params, Unmeasured())  # let cuDNN autotune before anything is measured
    tracker = LiveStorageTracker()
    meter = AllocatorMeter(device)
    with meter, tracker:
        probe = _BothMeters(meter, tracker, position)
        if "rerun" in kinds:
            backward_through_rerun(fn, inputs, params, probe)
        if "after" in kinds:
            second = traced.stages[position + 1]
            backward_after(fn, (spec.in_names, spec.out_names), make(twin, traced, second),
                           second.in_names, inputs, params, probe)
        if "alone" in kinds:
            backward_alone(fn, inputs, params, probe)
        if "accumulating" in kinds:
            backward_accumulating(fn, inputs, params, probe)
        if "reconstruct" in kinds:  # one step of a Reconstruct's walk back, from the step's output
            with torch.no_grad():
                outputs = fn(inputs)
            block = twin.get_submodule(spec.block_target)
            measure_walk_step(twin, traced, spec, outputs, [p for p in block.parameters() if p.requires_grad], probe)
            del outputs
    return probe.excesses()


@contextlib.contextmanager
def model_unchanged(model: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """A copy of ``model``'s modules sharing its tensors; on exit its buffers are as they were, and the RNG too."""
    tensors = list(itertools.chain(model.parameters(), model.buffers()))
    twin = copy.deepcopy(model, memo={id(t): t for t in tensors})
    for block in twin.modules():
        if isinstance(block, ODEBlock):
            block.check_finite = False  # memory is measured here, not values (a diverging example batch is fine)
    with state_restored(model, device):
        yield twin


def measure_workspaces(model: nn.Module, traced: TracedModel, example_inputs: Sequence[torch.Tensor],
                       runs: set[tuple[str, int]], like: Mapping[str, Any], *,
                       make: Callable = stage_function) -> Workspaces:
    """Make the measurements ``runs`` ((kind, stage position) pairs) of the cost model for real, once each.

    Kinds are :mod:`anode_plan.measure.phases`'s: ``"rerun"`` (the untaped first run and the
    re-run in backward), ``"after"``, ``"alone"`` and ``"accumulating"`` (a backward, with
    the taped forward before it for the first two). ``like`` maps each value name to a
    tensor (fake or real) whose ``requires_grad`` the stage inputs take, as in the cost
    model's runs, and ``make`` makes the stage functions measured, as there. The batch is carried from stage to stage without a tape, through every
    stage, keeping only the values a later stage reads.
    """
    device = example_inputs[0].device
    params = [p for p in model.parameters() if p.requires_grad]
    last_read = {name: at for at, spec in enumerate(traced.stages) for name in spec.in_names}
    wanted: dict[int, set[str]] = {}
    for kind, position in runs:
        wanted.setdefault(position, set()).add(kind)
    found: dict[tuple[str, int], Excess] = {}
    times: dict[int, PhaseTimes] = {}
    inverse_ms: dict[int, float] = {}
    random: set[int] = set()
    drift: dict[int, float] = {}
    block_start: dict[int, tuple] = {}
    with model_unchanged(model, device) as twin:
        values: dict[str, Any] = dict(zip(traced.input_names, example_inputs))
        for at, spec in enumerate(traced.stages):
            inputs = tuple(values[name] for name in spec.in_names)
            if at in wanted:
                fresh = fresh_inputs(inputs, tuple(like[name] for name in spec.in_names))
                found.update(_measure_runs(wanted[at], at, traced, twin, fresh, params, device, make))
                if "rerun" in wanted[at]:  # a distinct stage: its forward and backward are timed too
                    times[at] = time_stage(make(twin, traced, spec), fresh, params, device,
                                           region=len(times) < REGION_TIMINGS)
                if "reconstruct" in wanted[at]:
                    inverse_ms[at] = time_inverse(twin, spec, make(twin, traced, spec), fresh, device)
            before = generator_states(device)
            with torch.no_grad():
                values.update(zip(spec.out_names, stage_function(twin, traced, spec)(inputs)))
                if spec.block is not None and twin.get_submodule(spec.block_target).reversible:
                    if spec.step == 0:
                        block_start[spec.block] = inputs
                    if spec.step == traced.blocks[spec.block].nt - 1:
                        drift[spec.block] = reconstruction_drift(
                            twin, traced, spec.block, block_start.pop(spec.block),
                            tuple(values[name] for name in spec.out_names))
            if any(not torch.equal(a, b) for a, b in zip(before, generator_states(device))):
                random.add(at)
            for name in spec.in_names:
                if last_read[name] == at and name not in spec.out_names:
                    del values[name]
    return Workspaces(found, frozenset(random), drift, times, inverse_ms)


REGION_TIMINGS = 3
"""How many distinct stages (the first ones) are also timed as one-stage checkpoint regions, to price a region."""


class _Laps:
    """A :class:`~anode_plan.measure.phases.Probe` that times the phases instead of measuring their memory."""

    def __init__(self, watch: Stopwatch) -> None:
        self.watch = watch

    def begin(self) -> None:
        self.watch.start()

    def end(self, label: str) -> int:
        self.watch.lap(label)
        return 1  # non-zero: the phase ran


def time_stage(fn: StageFn, inputs: tuple, params: list[torch.Tensor], device: torch.device, *,
               region: bool = True) -> PhaseTimes:
    """The stage timed on the device (:func:`anode_plan.measure.timing.time_phases`): the runs of
    :func:`~anode_plan.measure.phases.backward_alone`, its taped forward (``"fwd_taped"``) and its backward
    (``"alone"``, seeds of ones, every input and parameter gradient made), and
    the same step as a checkpoint region of its own (``"region"``: untaped forward, then backward with the
    re-run; with ``region``), whose excess over a forward more is what a region costs."""
    def run(watch: Stopwatch) -> None:
        if not backward_alone(fn, inputs, params, _Laps(watch)):  # "fwd_taped", then "alone"
            return
        if not region:
            return
        flat, structure = tree_flatten(fresh_inputs(inputs))
        versions = [value._version for value in flat if isinstance(value, torch.Tensor)]
        watch.start()
        outputs = needing_grad(checkpoint(lambda *values: fn(tree_unflatten(list(values), structure)), *flat,
                                          use_reentrant=False, preserve_rng_state=False))
        if versions != [value._version for value in flat if isinstance(value, torch.Tensor)]:
            return  # it writes into its input, which a region cannot re-run from (the runtime refuses it)
        seeds = [torch.ones_like(o) for o in outputs]
        grads = torch.autograd.grad(outputs, needing_grad(flat) + params, seeds, allow_unused=True)
        watch.lap("region")
        del grads

    return time_phases(run, device)


def time_inverse(root: nn.Module, spec: Any, fn: StageFn, inputs: tuple, device: torch.device) -> float:
    """A reversible step's inverse (its input rebuilt from its output) timed on the device, in ms."""
    with torch.no_grad():
        outputs = fn(inputs)

    def run(watch: Stopwatch) -> None:
        with torch.no_grad():
            watch.start()
            rebuilt = inverse_state(root, spec, outputs)
            watch.lap("inverse")
            del rebuilt

    return time_phases(run, device).get("inverse")


def reconstruction_drift(root: nn.Module, traced: TracedModel, block: int, first: tuple, last: tuple) -> float:
    """The relative error of states rebuilt by inverse steps, per step inverted, on real values.

    ``first`` is the state entering the block's first step, ``last`` the one leaving its
    last step. The block is inverted all the way back from ``last``; the error after
    ``j`` inversions is ``max |rebuilt - true| / max |true|`` over the carried tensors,
    compared at one step (against the state before the last step) and at all ``nt`` (against
    ``first``). Returns the larger of the two, per step: ``err_1`` and ``err_nt / nt``.
    """
    spec = traced.blocks[block]
    stages = traced.stages[spec.start:spec.stop]

    def relative(a: tuple, b: tuple) -> float:
        pairs = [(x, y) for x, y in zip(tree_flatten(a)[0], tree_flatten(b)[0])
                 if isinstance(x, torch.Tensor) and x.is_floating_point()]
        scale = max(float(y.abs().max()) for _, y in pairs) or 1.0
        return max(float((x - y).abs().max()) for x, y in pairs) / scale

    state = last
    one_step = 0.0
    for index, step in enumerate(reversed(stages)):
        state = inverse_state(root, step, state)
        if index == 0 and len(stages) > 1:
            forward = first
            for earlier in stages[:-1]:
                forward = run_stage(root, traced, earlier, forward)
            one_step = relative(state, forward)
    return max(one_step, relative(state, first) / len(stages))


def with_times(stage: Stage, position: int, found: Workspaces) -> Stage:
    """``stage`` (measured at ``position``) priced in the milliseconds calibration timed, its FLOP-model costs
    kept as its nominal ones; unchanged where nothing was timed."""
    times = found.times.get(position)
    if times is None:
        return stage
    reconstruct = stage.reconstruct
    if reconstruct is not None and position in found.inverse_ms:
        reconstruct = dataclasses.replace(reconstruct, inverse_cost=found.inverse_ms[position],
                                          nominal_inverse_cost=reconstruct.inverse_cost)
    return dataclasses.replace(stage, fwd_cost=times.get("fwd_taped"), bwd_cost=times.get("alone"),
                               nominal_fwd_cost=stage.fwd_cost, nominal_bwd_cost=stage.bwd_cost,
                               reconstruct=reconstruct)


def region_overhead(found: Workspaces) -> float:
    """What a checkpoint region costs beyond the forward it repeats, in ms: the median over the timed stages of
    a one-stage region's time less its two forwards and its backward (0 if none was timed)."""
    excess = sorted(max(0.0, t.get("region") - 2 * t.get("fwd_taped") - t.get("alone"))
                    for t in found.times.values() if "region" in t.ms)
    return excess[len(excess) // 2] if excess else 0.0


def timing_noise(found: Workspaces) -> float:
    """The relative uncertainty of the stage timings: each phase's spread (interquartile range over median) over
    the square root of its repeats (the uncertainty of a median falls so), averaged weighting each phase by its
    milliseconds, as a step's time weights it (a noisy 50-microsecond phase moves a step little)."""
    weighted = total = 0.0
    for times in found.times.values():
        for phase, ms in times.ms.items():
            weighted += ms * times.noise.get(phase, 0.0) / math.sqrt(max(1, times.repeats))
            total += ms
    return weighted / total if total > 0 else 0.0


def with_workspace(stage: Stage, position: int, backward: tuple, found: Workspaces) -> Stage:
    """``stage`` (measured at ``position``) with what calibration measured added: the kernel workspaces to its
    peaks, and to its tape what the taped forward keeps that the storage view missed."""
    untaped, taped, rerun = (found.excess(phase, position) for phase in ("fwd_untaped", "fwd_taped", "rerun"))
    # A re-run peaks at the larger of the first taped run and the checkpoint's re-run
    # (rerun_taped_bytes); each brings its own workspace.
    rerun_bytes = max(stage.fwd_taped_bytes + taped.nbytes, stage.rerun_taped_bytes + rerun.nbytes)
    # The backward's peak is the largest of its measurements, each with its own excess (never
    # below the fake peak it was measured as: excesses are >= 0).
    excesses = [(source, found.excess(source.kind, source.position)) for source in backward]
    source, bwd_excess = max(excesses, key=lambda pair: pair[0].fake_bytes + pair[1].nbytes)
    bwd_bytes = source.fake_bytes + bwd_excess.nbytes
    rerun_kernel = rerun.kernel if stage.rerun_taped_bytes + rerun.nbytes >= rerun_bytes else taped.kernel
    return dataclasses.replace(
        stage, tape_bytes=stage.tape_bytes + taped.kept_bytes, fwd_untaped_bytes=stage.fwd_untaped_bytes + untaped.nbytes,
        fwd_taped_bytes=stage.fwd_taped_bytes + taped.nbytes, rerun_taped_bytes=rerun_bytes,
        bwd_bytes=bwd_bytes, fwd_untaped_workspace_bytes=untaped.nbytes,
        fwd_taped_workspace_bytes=taped.nbytes, rerun_workspace_bytes=rerun_bytes - stage.rerun_taped_bytes,
        bwd_workspace_bytes=bwd_bytes - stage.bwd_bytes,
        workspace_kernels=(untaped.kernel, taped.kernel, rerun_kernel, bwd_excess.kernel))
