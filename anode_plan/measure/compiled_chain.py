"""Measure a model's compiled stages on the device: the chain the planner sees with ``backend="inductor"``.

The fake-tensor cost model (:mod:`anode_plan.measure.chain`) measures what eager PyTorch
saves and allocates. A stage compiled by Inductor saves what the partitioner chose (often
less: cheap pointwise values are recomputed in its backward) and allocates its buffers
in generated code, which neither fake tensors nor a dispatch-mode tracker see. So
:func:`measure_compiled_chain` runs every stage's compiled function for real, on the
example batch, in the runs the cost model makes (:mod:`anode_plan.measure.phases`: untaped,
taped, backward where it runs after the stage after it, backward into pending parameter
gradients, re-run in backward as a checkpoint), under the allocator meter
(:class:`~anode_plan.memory.AllocatorMeter`), and replaces every memory figure of the
eager chain's stage by what the allocator counted. Which state values a compiled tape
holds comes from ``saved_tensors_hooks`` (by storage), its bytes from the allocator.

Costs are measured too: the median over ``repeats`` runs (after one untimed) of each stage's taped forward
and its backward, in milliseconds, so the planner weighs recompute by what a compiled
stage really takes.

The model is left as it was: buffers (BatchNorm statistics) are put back and the RNG
state restored; gradients come from ``autograd.grad``, so no ``.grad`` is written.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
import weakref
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils._pytree import tree_map

from anode_plan.measure.chain import accumulating_stages, with_rng_restore
from anode_plan.measure.lower import lower_to_chain
from anode_plan.measure.phases import (
    Unmeasured,
    backward_accumulating,
    backward_after,
    backward_alone,
    backward_through_rerun,
    fresh_inputs,
    needing_grad,
)
from anode_plan.measure.profile import storage_bytes
from anode_plan.memory import AllocatorMeter
from anode_plan.model_state import RestoreRunningStats, state_restored
from anode_plan.stages.inductor import CompiledStages, UnitStages, input_key
from anode_plan.tracing.segments import Segments
from anode_plan.tracing.trace import StageFn, TracedModel
from planners import Chain, Stage

TIMING_REPEATS = 5


class _Spans:
    """A :class:`~anode_plan.measure.phases.Probe` noting each phase's marks; peaks are read once the meter stopped."""

    def __init__(self, meter: AllocatorMeter | None) -> None:
        self.meter = meter
        self.spans: dict[str, list[tuple[int, int]]] = {}
        self._start = 0

    def begin(self) -> None:
        self._start = self.meter.mark() if self.meter is not None else 0

    def end(self, label: str) -> int:
        if self.meter is not None:
            self.spans.setdefault(label, []).append((self._start, self.meter.mark()))
        return 0

    def peak(self, *labels: str) -> int:
        found = [self.meter.peak_bytes(s, e) for label in labels for s, e in self.spans.get(label, ())]
        return max(found, default=0)

    def kept(self, label: str) -> int:
        """What the last phase ``label`` left allocated (its outputs and tape)."""
        start, end = self.spans[label][-1]
        return self.meter.allocated_bytes(end) - self.meter.allocated_bytes(start)


def _value_ids(traced: TracedModel, chain: Chain) -> dict[str, int]:
    """fx value name -> the chain's value id (from the ids of each stage's input state)."""
    ids: dict[str, int] = {}
    for spec, values in zip(traced.stages, chain.state_values):
        ids.update(zip(spec.in_names, values))
    ids.update(zip(traced.stages[-1].out_names, chain.state_values[-1]))
    return ids


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _times(fn: StageFn, inputs: tuple, params: list[torch.Tensor], device: torch.device,
           repeats: int) -> tuple[float, float]:
    """Median milliseconds of a taped forward and of its backward (seeds of ones), after one run untimed
    (the first runs after compiling are slower: caches, the allocator's first blocks)."""
    forward, backward = [], []
    for run in range(repeats + 1):
        fresh = fresh_inputs(inputs)
        _sync(device)
        began = time.perf_counter()
        outputs = needing_grad(fn(fresh))
        _sync(device)
        if run:
            forward.append(time.perf_counter() - began)
        wrt = needing_grad(fresh) + params
        if outputs and wrt:
            seeds = [torch.ones_like(o) for o in outputs]
            _sync(device)
            began = time.perf_counter()
            grads = torch.autograd.grad(outputs, wrt, seeds, allow_unused=True)
            _sync(device)
            if run:
                backward.append(time.perf_counter() - began)
            del grads, seeds
        del outputs, fresh
    return statistics.median(forward) * 1e3, (statistics.median(backward) * 1e3 if backward else 0.0)


def measure_compiled_chain(chain: Chain, model: nn.Module, traced: TracedModel,
                           example_inputs: Sequence[torch.Tensor], stages: CompiledStages, *, key: Any = None,
                           repeats: int = TIMING_REPEATS) -> Chain:
    """``chain`` (the eager cost model's, for the structure) with every stage's memory and cost measured for
    real on its :class:`~anode_plan.stages.inductor.CompiledStages` function (the module docstring says how).

    Compiles each stage on the way (its forward, backward and re-run variants) for input key
    ``key`` (:meth:`~anode_plan.stages.inductor.CompiledStages.function`), so a stage that cannot be
    compiled falls back to eager here, before anything is planned on it. Reversible blocks
    offer no ``reconstruct`` here: rebuilding states runs eager code, measured for the eager mode.
    """
    device = example_inputs[0].device
    params = [p for p in model.parameters() if p.requires_grad]
    fixed = set(storage_bytes(list(model.parameters()) + list(model.buffers())))
    norms = stages.norms
    ids = _value_ids(traced, chain)
    accumulating = accumulating_stages([stage.param_ids for stage in chain.stages])
    last_read = {name: at for at, spec in enumerate(traced.stages) for name in spec.in_names}
    new_stages: list[Stage] = list(chain.stages)

    def runs(inputs: tuple) -> Any:
        def run(fn: StageFn) -> None:  # every variant a training step runs: compiles each one now
            backward_alone(fn, inputs, params, Unmeasured())
            backward_through_rerun(_restoring(fn, norms), inputs, params, Unmeasured())
        return run

    with state_restored(model, device):
        values: dict[str, Any] = dict(zip(traced.input_names, example_inputs))
        for at, spec in enumerate(traced.stages):
            inputs = fresh_inputs(tuple(values[name] for name in spec.in_names))
            stages.warm(at, runs(inputs), key)
            fn = stages.function(at, key)
            saved: list[weakref.ref] = []

            def pack(tensor: torch.Tensor) -> torch.Tensor:
                saved.append(weakref.ref(tensor))
                return tensor

            taped_inputs = fresh_inputs(inputs)
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                outputs = fn(taped_inputs)
            saved_keys = set(storage_bytes([t for t in (ref() for ref in saved) if t is not None]))
            saved_in = [p for p, v in enumerate(taped_inputs) if set(storage_bytes(v)) & saved_keys - fixed]
            saved_out = [p for p, v in enumerate(outputs) if set(storage_bytes(v)) & saved_keys - fixed]
            input_keys = set(storage_bytes(taped_inputs))
            output_new = sum(b for k, b in storage_bytes(outputs).items() if k not in input_keys | fixed)
            values.update(zip(spec.out_names, _detached(outputs)))
            del outputs, taped_inputs, saved
            nxt = at + 1 if at + 1 < len(traced.stages) else None
            if nxt is not None:
                stages.warm(nxt, runs(fresh_inputs(tuple(values[n] for n in traced.stages[nxt].in_names))), key)
            if not _adaptive(model, spec):  # an adaptive solve keeps its own profile's memory
                new_stages[at] = _measured_stage(chain.stages[at], at, fn, inputs, params, stages, key, traced, nxt, accumulating[at], device,
                                                 tuple(ids[spec.in_names[p]] for p in saved_in)
                                                 + tuple(ids[spec.out_names[p]] for p in saved_out),
                                                 bool(saved_in), bool(saved_out), output_new)
            fwd_ms, bwd_ms = _times(fn, inputs, params, device, repeats if stages.compiled(at) else 1)
            new_stages[at] = dataclasses.replace(new_stages[at], fwd_cost=fwd_ms, bwd_cost=bwd_ms, reconstruct=None)
            for name in spec.in_names:
                if last_read[name] == at and name not in spec.out_names:
                    del values[name]
    stages.warn_fallbacks(stacklevel=4)  # at the caller of anode_plan.compile
    new_stages = with_rng_restore(new_stages, device)  # the RNG replay of re-runs, as the eager chain charges it
    return dataclasses.replace(chain, stages=tuple(new_stages), cost_unit="ms", cost_source="measured")


def _restoring(fn: StageFn, norms: list[nn.Module]) -> StageFn:
    """``fn`` under the re-run's statistics context (:class:`~anode_plan.model_state.RestoreRunningStats`, in place),
    as a checkpoint re-runs a compiled stage; its first run here pays for the copies too (an upper bound)."""
    def run(values: tuple) -> tuple:
        with RestoreRunningStats(norms, in_place=True):
            return fn(values)
    return run


def compiled_chain_for(model: nn.Module, traced: TracedModel, inputs: Sequence[torch.Tensor],
                       stages: CompiledStages) -> Chain:
    """The chain of ``model`` run by ``stages`` for these inputs: measured once per input key
    (:mod:`anode_plan.compiler.plan_cache`: shapes, dtypes, modes, frozen parameters), then reused.
    ``traced``: the stages' own cut (a :class:`~anode_plan.stages.inductor.UnitStages`' coarse one)."""
    key = input_key(model, inputs)
    chain = stages.chain_for(key)
    if chain is None:  # the eager chain gives the structure; every figure of a stage is then measured compiled
        if isinstance(stages, UnitStages):
            skeleton = merged_skeleton(lower_to_chain(model, stages.parent.traced, inputs, calibrate=False),
                                       stages.segments, traced)
        else:
            skeleton = lower_to_chain(model, traced, inputs, calibrate=False)
        chain = stages.add_chain(key, measure_compiled_chain(skeleton, model, traced, inputs, stages, key=key))
    return chain


def merged_skeleton(chain: Chain, segments: Segments, coarse: TracedModel) -> Chain:
    """``chain`` with each run of ``segments`` as one stage, for :func:`measure_compiled_chain` to measure: the
    states at the runs' boundaries, the union of a run's parameters; its memory and times are placeholders
    (sums) until measured. No ODE blocks: a unit's steps are not stages of their own."""
    stages = []
    for (start, stop), spec in zip(segments, coarse.stages):
        run = chain.stages[start:stop]
        stages.append(run[0] if stop - start == 1 else Stage(
            name=spec.name, input_bytes=run[0].input_bytes, output_bytes=run[-1].output_bytes,
            tape_bytes=sum(stage.tape_bytes + stage.output_bytes for stage in run),
            param_ids=tuple(sorted({p for stage in run for p in stage.param_ids})),
            fwd_cost=sum(stage.fwd_cost for stage in run), bwd_cost=sum(stage.bwd_cost for stage in run),
            uses_rng=any(stage.uses_rng for stage in run)))
    boundaries = tuple(chain.state_values[start] for start, _ in segments) + (chain.state_values[-1],)
    kept = {v for values in boundaries for v in values}
    return dataclasses.replace(chain, stages=tuple(stages), blocks=(), state_values=boundaries,
                               gradless_values=tuple(v for v in chain.gradless_values if v in kept))


def _adaptive(model: nn.Module, spec: Any) -> bool:
    return spec.block is not None and model.get_submodule(spec.block_target).adaptive


def _detached(values: Sequence[Any]) -> list[Any]:
    """``values`` cut from their graph, keeping ``requires_grad``: the next stage's inputs need it as in training."""
    return [tree_map(lambda v: v.detach().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v,
                     value) for value in values]


def _measured_stage(stage: Stage, at: int, fn: StageFn, inputs: tuple, params: list[torch.Tensor],
                    stages: CompiledStages, key: Any, traced: TracedModel, nxt: int | None,
                    accumulating: bool, device: torch.device, saved_values: tuple[int, ...], saves_input: bool,
                    saves_output: bool, output_new_bytes: int) -> Stage:
    """``stage`` with its memory measured by the allocator on ``fn`` (the runs of :mod:`anode_plan.measure.phases`)."""
    spec = traced.stages[at]
    model = stages.model
    meter = AllocatorMeter(device)
    probe = _Spans(meter)
    with meter:
        backward_through_rerun(_restoring(fn, stages.norms), inputs, params, probe)
        if nxt is not None and not _adaptive(model, traced.stages[nxt]):
            second = traced.stages[nxt]
            backward_after(fn, (spec.in_names, spec.out_names), stages.function(nxt, key), second.in_names, inputs,
                           params, probe)
        else:  # the loss comes next, or an adaptive solve (its memory is its own profile's)
            backward_alone(fn, inputs, params, probe)
        if accumulating:
            backward_accumulating(fn, inputs, params, probe)
    fwd_taped = probe.peak("fwd_taped")
    return dataclasses.replace(
        stage, tape_bytes=max(0, probe.kept("fwd_taped") - output_new_bytes), saves_input=saves_input,
        saves_output=saves_output, saved_values=saved_values, fwd_taped_bytes=fwd_taped,
        fwd_untaped_bytes=probe.peak("fwd_untaped"), rerun_taped_bytes=max(fwd_taped, probe.peak("rerun")),
        bwd_bytes=probe.peak("after", "alone", "accumulating"), fwd_untaped_workspace_bytes=0,
        fwd_taped_workspace_bytes=0, rerun_workspace_bytes=0, bwd_workspace_bytes=0,
        workspace_kernels=("", "", "", ""))
