"""Measure every stage of a traced model on fake tensors and lower it to a :class:`planners.Chain`.

Nothing real runs: the model is copied into a ``FakeTensorMode`` (tensors with shapes,
dtypes and storages but no data), and each stage is run three ways on fake inputs:

* untaped (saved tensors discarded, as inside a checkpoint region): its peak;
* taped: its peak, and the tensors autograd *really* saves, collected with
  ``torch.autograd.graph.saved_tensors_hooks``, deduplicated by storage, and split into
  the stage's input, its output, parameters and the rest (the tape);
* backward (``torch.autograd.grad``): its peak, and which parameters it reaches.

The peaks are those of a real training step, where store-all's peak usually falls in
the last stage's backward, so the details count:

* Only the autograd graph holds the tape (the saved tensors are noted by weak
  reference), so backward frees it node by node: ``bwd_bytes`` is net of the tape
  freed by then. (Holding it to the end over-counted by up to the tape.)
* Each stage's backward is measured where it runs, after the backward of the stage
  after it (:func:`~anode_plan.measure.phases.backward_after`): its output gradients come as that one makes them,
  and the parameters they share (every step of an ODE block) already have a gradient,
  which it adds to out of place.
* A re-run in backward (a non-reentrant checkpoint) starts only when backward needs a
  saved tensor, after the gradients that need none, and stops once the last saved tensor
  exists again: ``rerun_taped_bytes`` is the larger of that, measured on a checkpoint
  of the stage (:func:`~anode_plan.measure.phases.backward_through_rerun`), and the first run's ``fwd_taped_bytes``.
  Plain BatchNorm layers re-run frozen in place, at no cost; other norm layers with
  running statistics re-run on copies of them (:func:`~anode_plan.measure.phases.running_stat_copies`), which
  every stage's forward and tape pay for.
* The loss value and its gradient's seed live through backward, as a value of the
  last state (``LOSS_VALUE_SCALARS``).

Peaks come from :class:`~anode_plan.memory.LiveStorageTracker` on the fake tensors, and
then from calibration (:mod:`anode_plan.measure.calibrate`): each of those measurements is made
once more for real, under the allocator, and what kernels allocate inside themselves is
added to the phase it occurs in. ODE blocks built alike share one measurement
(:mod:`anode_plan.measure.sharing`). Costs are the milliseconds calibration times on the
device; the fake-tensor runs give nominal ones, from ``torch.utils.flop_counter.FlopCounterMode``
plus a bandwidth term for the memory each stage writes (``FLOPS_PER_MS``, ``BYTES_PER_MS``),
which stay on each stage (``Stage.nominal_fwd_cost``) and are all ``calibrate=False`` has.

The time steps of one ODE block have identical shapes, so one step is measured and
its numbers reused for the others, and for the steps of every block built alike.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Callable, Hashable, NamedTuple, Sequence

import torch
from torch import nn
from torch._subclasses.fake_tensor import (
    FakeCopyMode,
    FakeTensorMode,
)
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from anode_plan.measure.adaptive_profile import AdaptiveProfile
from anode_plan.measure.calibrate import (
    measure_workspaces,
    region_overhead,
    timing_noise,
    with_times,
    with_workspace,
)
from anode_plan.measure.phases import backward_after, running_stat_copies
from anode_plan.measure.profile import (
    BYTES_PER_MS,
    FLOPS_PER_MS,
    StageProfile,
    TrackerProbe,
    ValueIds,
    measure_stage,
    storage_key,
)
from anode_plan.measure.sharing import BlockMatch, block_key, match_blocks
from anode_plan.memory import LiveStorageTracker, allocated_bytes, allocation_bytes
from anode_plan.stages.reconstruct import inverse_state, measure_walk_step
from anode_plan.tracing.trace import StageSpec, TracedModel, stage_function
from planners import Block, Chain, Reconstruction, Stage
from planners.progress import Progress

# The loss after the network is the user's: it is allowed LOSS_OUTPUTS tensors the size
# of the output, on top of the output's gradient, plus LOSS_SLACK_SCALARS scalars in the
# output's precision (each a 512-byte block on CUDA). Measured with the CPU allocator on
# top of the output's gradient: x.square().mean() takes 3 outputs and 8 bytes,
# cross-entropy 2 outputs and 8 bytes, MSE 1 output and 12 bytes, x.sum() 16 bytes.
_log = logging.getLogger("anode_plan.measure.chain")
LOSS_OUTPUTS = 3
LOSS_SLACK_SCALARS = 4
LOSS_VALUE_SCALARS = 2  # the loss and the seed of its gradient, live through backward


class _Measured(NamedTuple):
    """A chain stage, the profile that measured it, the stage that profile ran, and how their names and
    parameters correspond (identity unless the profile is of a block built alike)."""

    profile: StageProfile
    spec: StageSpec
    measured_spec: StageSpec
    match: BlockMatch


@dataclass(frozen=True)
class BackwardSource:
    """Where a chain stage's ``bwd_bytes`` was measured: how (``"after"`` the stage after
    it, ``"alone"``, or ``"accumulating"`` into pending parameter gradients), at which
    stage position, and what it measured there on fake tensors. The calibration measures
    the same run for real."""

    kind: str
    position: int
    fake_bytes: int


def accumulating_stages(param_ids: Sequence[Sequence[int]]) -> list[bool]:
    """Per stage (its parameters' indices): whether its backward adds into gradients that a later stage other
    than the next one started (two blocks sharing an ODE function), so that backward is measured apart."""
    found = [False] * len(param_ids)
    touched: set[int] = set()
    for index in reversed(range(len(param_ids))):
        following = set(param_ids[index + 1]) if index + 1 < len(param_ids) else set()
        found[index] = bool(touched.intersection(param_ids[index]) - following)
        touched.update(param_ids[index])
    return found


def _place_backwards(make: Callable, measured: list[_Measured], traced: TracedModel, fake_model: nn.Module,
                     values: dict[str, Any],
                     params: list[torch.Tensor], tracker: LiveStorageTracker, ids: ValueIds,
                     kinds: list[Hashable]) -> tuple[list[Stage], list[tuple[BackwardSource, ...]]]:
    """The chain's stages, each with its backward measured where it runs, and where each was measured.

    Backward runs the stages last to first, so a stage's backward follows that of the
    stage after it (:func:`~anode_plan.measure.phases.backward_after`): a block's last step
    follows the stage after the block, and its other steps follow a step (the block's
    first two are measured). A stage adds to the gradients of parameters that a later one
    touched; where that is not the stage after it (two blocks sharing an ODE function),
    that is measured apart too.
    """
    positions = {id(spec): at for at, spec in enumerate(traced.stages)}
    param_ids = [m.match.param_ids(m.profile.param_ids) for m in measured]
    accumulating = accumulating_stages(param_ids)
    after: dict[Hashable, tuple[int, int]] = {}  # (kind of the stage, of the next) -> (position measured, bytes)
    probe = TrackerProbe(tracker)
    stages, sources = [], []
    for index, (profile, spec, measured_spec, match) in enumerate(measured):
        last_step = spec.block is None or spec.step == traced.blocks[spec.block].nt - 1
        at = positions[id(spec if last_step else measured_spec)]
        if isinstance(profile, AdaptiveProfile):
            found = [BackwardSource("adaptive", at, profile.bwd_bytes)]  # measured for real already
        elif at + 1 == len(traced.stages) or isinstance(measured[index + 1].profile, AdaptiveProfile):
            # the loss comes next, or an adaptive block, which runs only on real values
            found = [BackwardSource("alone", positions[id(measured_spec)], profile.bwd_bytes)]
        else:
            key = (kinds[at], kinds[at + 1])
            if key not in after:
                first, second = traced.stages[at], traced.stages[at + 1]
                inputs = tuple(values[name] for name in first.in_names)
                after[key] = (at, backward_after(make(fake_model, traced, first),
                                                 (first.in_names, first.out_names),
                                                 make(fake_model, traced, second), second.in_names, inputs,
                                                 params, probe))
            found = [BackwardSource("after", *after[key])]
            if accumulating[index]:
                found.append(BackwardSource("accumulating", positions[id(measured_spec)],
                                            profile.bwd_accumulating_bytes()))
        stages.append(profile.stage(spec, ids, measured_spec, bwd_bytes=max(s.fake_bytes for s in found), match=match))
        sources.append(tuple(found))
    return stages, sources


def _inverse_offer(fake_model: nn.Module, traced: TracedModel, spec: StageSpec, outputs: tuple,
                   tracker: LiveStorageTracker) -> Reconstruction:
    """What rebuilding a reversible step costs, measured on fake tensors from the step's output state:
    the peak of one step of the walk back (:func:`anode_plan.stages.reconstruct.measure_walk_step`, the code
    backward runs) and the inverse's cost."""
    block = fake_model.get_submodule(spec.block_target)
    params = [p for p in block.parameters() if p.requires_grad]
    step_bytes = measure_walk_step(fake_model, traced, spec, outputs, params, TrackerProbe(tracker))
    base = tracker.reset_peak()
    with torch.no_grad(), FlopCounterMode(display=False) as flops:
        rebuilt = inverse_state(fake_model, spec, outputs)
    inverse_bytes = tracker.peak_bytes - base
    del rebuilt
    solution = dict(zip(spec.out_names, outputs))[spec.z_out[0]]
    return Reconstruction(step_bytes, flops.get_total_flops() / FLOPS_PER_MS + inverse_bytes / BYTES_PER_MS,
                          solution_bytes=allocated_bytes(solution))


def _with_offer(stage: Stage, offer: Reconstruction | None, error_per_step: float, workspace: int) -> Stage:
    """``stage`` offering its reconstruction, with what calibration found: the walk step's kernel
    workspace and the drift of rebuilt states per step."""
    if offer is None:
        return stage
    return dataclasses.replace(stage, reconstruct=dataclasses.replace(offer, step_bytes=offer.step_bytes + workspace,
                                                                      error_per_step=error_per_step))


def with_rng_restore(stages: list[Stage], device: torch.device) -> list[Stage]:
    """Charge the RNG replay of re-runs, when some stage draws random numbers.

    A region whose stages draw random numbers re-runs from the generator states its
    first run saw (:class:`anode_plan.runtime.ReplayRandomState`): restoring a state,
    at the re-run's start and again at its end, makes a state tensor for a moment (5,056
    bytes for the CPU's Mersenne Twister). It is host memory, so it counts on a CPU
    budget only. Charged to every re-run of such a chain: an upper bound by that much.
    """
    if device.type != "cpu" or not any(stage.uses_rng for stage in stages):
        return stages
    state_bytes = torch.default_generator.get_state().nbytes
    return [dataclasses.replace(stage, rerun_taped_bytes=stage.rerun_taped_bytes + state_bytes) for stage in stages]


def measure_chain(model: nn.Module, traced: TracedModel, example_inputs: Sequence[torch.Tensor], *,
                  calibrate: bool = True, share: bool = True, sketch: Any = None) -> Chain:
    """:func:`lower_to_chain` without sketch offers; with ``sketch`` (a
    :class:`~anode_plan.stages.sketch.SketchedLayers`) every stage it names is measured with its
    convolutions sketched."""
    make = stage_function if sketch is None else sketch.stage_function
    fake_mode = FakeTensorMode(allow_non_fake_inputs=False)
    with FakeCopyMode(fake_mode):
        fake_model = copy.deepcopy(model)
    for module in fake_model.modules():
        # A cumulative average (momentum None) divides by float(num_batches_tracked), a value
        # fake tensors lack; the update's factor does not change what is allocated.
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.momentum is None:
            module.momentum = 0.1
    params = [p for p in fake_model.parameters() if p.requires_grad]
    fixed = {storage_key(t) for t in list(fake_model.parameters()) + list(fake_model.buffers())}
    stat_copies = running_stat_copies(fake_model)
    values: dict[str, Any] = {}
    with fake_mode:
        for name, example in zip(traced.input_names, example_inputs):
            values[name] = fake_mode.from_tensor(example)

    ids = ValueIds(values, fixed)
    measured: list[_Measured] = []
    kinds: list[Hashable] = []  # per stage: what its measurements may be shared by
    shared: dict[Hashable, tuple[StageProfile, StageSpec, nn.Module]] = {}  # block key -> its representative
    param_index = {id(p): i for i, p in enumerate(params)}
    tracker = LiveStorageTracker()
    offers: dict[int, Reconstruction] = {}  # per profile of a reversible block's step: its inverse
    offer_at: dict[int, Reconstruction] = {}  # per stage position
    progress = Progress(_log, f"measuring {traced.model_name}")
    with fake_mode, tracker:
        index = 0
        while index < len(traced.stages):
            progress.step(f"stage {index} of {len(traced.stages)}, {len(shared)} kinds of block measured")
            spec = traced.stages[index]
            inputs = tuple(values[n] for n in spec.in_names)
            if spec.block is None:
                profile = measure_stage(spec, traced, make(fake_model, traced, spec), inputs, params, fixed, tracker,
                                   stat_copies)
                values.update(zip(spec.out_names, profile.outputs))
                measured.append(_Measured(profile, spec, spec, BlockMatch.identity()))
                kinds.append(("stage", index))
                index += 1
                continue
            block = traced.blocks[spec.block]
            module = fake_model.get_submodule(spec.block_target)
            if module.adaptive:  # one stage, measured at its minimum (anode_plan.plans.adaptive_share)
                profile = AdaptiveProfile(spec, module, model.get_submodule(spec.block_target), inputs, param_index,
                                          timed=calibrate)
                values.update(zip(spec.out_names, profile.outputs))
                measured.append(_Measured(profile, spec, spec, BlockMatch.identity()))
                kinds.append(("stage", index))
                index = block.stop
                continue
            first = None
            if module.reversible and block.nt > 1:
                # A reversible block's first step takes z and makes the carried state (one more
                # evaluation of f), the others carry it: the first is measured on its own.
                first = measure_stage(spec, traced, make(fake_model, traced, spec), inputs, params, fixed,
                                 tracker, stat_copies)
                values.update(zip(spec.out_names, first.outputs))
                if sketch is None:
                    offers[id(first)] = _inverse_offer(fake_model, traced, spec, first.outputs, tracker)
                spec = traced.stages[index + 1]
                inputs = tuple(values[n] for n in spec.in_names)
            key = block_key(module, spec, traced.stages[block.stop - 1].out_names, values) if share else None
            profile, rep_spec, match = None, spec, BlockMatch.identity()
            if key in shared:
                profile, rep_spec, rep_module = shared[key]
                match = match_blocks(rep_module, rep_spec, module, spec, param_index)
                if match.param_ids(profile.param_ids) is None:  # it uses parameters from outside the block
                    profile, rep_spec, match, key = None, spec, BlockMatch.identity(), ("block", spec.block)
            if profile is None:
                profile = measure_stage(spec, traced, make(fake_model, traced, spec), inputs, params, fixed, tracker,
                                   stat_copies)
                if key is not None:
                    shared.setdefault(key, (profile, spec, module))
            key = ("block", spec.block) if key is None else key
            if module.reversible and sketch is None and id(profile) not in offers:
                offers[id(profile)] = _inverse_offer(fake_model, traced, rep_spec, profile.outputs, tracker)
            rep_out = dict(zip(rep_spec.out_names, profile.outputs))
            z_next = ([rep_out[name] for name in rep_spec.z_out] if isinstance(rep_spec.z_out, tuple)
                      else rep_out[rep_spec.z_out])
            for step_spec in traced.stages[block.start:block.stop]:
                if first is not None and step_spec.step == 0:
                    if sketch is None:
                        offer_at[len(measured)] = offers[id(first)]
                    measured.append(_Measured(first, step_spec, step_spec, BlockMatch.identity()))
                    kinds.append(("stage", block.start))
                    continue
                if module.reversible and sketch is None:
                    offer_at[len(measured)] = offers[id(profile)]
                if isinstance(step_spec.z_out, tuple):
                    values.update(zip(step_spec.z_out, z_next))
                else:
                    values[step_spec.z_out] = z_next
                measured.append(_Measured(profile, step_spec, rep_spec, match))
                kinds.append((key, step_spec.step == 0, step_spec.step == block.nt - 1))
            index = block.stop
        stages, backward = _place_backwards(make, measured, traced, fake_model, values, params, tracker, ids, kinds)
    blocks_alike = sum(1 for m in measured if m.spec.step == 0 and m.measured_spec is not m.spec)
    if calibrate:
        positions = {id(spec): at for at, spec in enumerate(traced.stages)}
        forward = [positions[id(m.measured_spec)] for m in measured]
        adaptive = {at for at, m in zip(forward, measured) if isinstance(m.profile, AdaptiveProfile)}
        runs = {("rerun", at) for at in forward if at not in adaptive}
        runs |= {(s.kind, s.position) for found in backward for s in found if s.kind != "adaptive"}
        runs |= {("reconstruct", forward[at]) for at in offer_at}
        progress.step(f"calibrating {len(runs)} measurements on {example_inputs[0].device}")
        found = measure_workspaces(model, traced, example_inputs, runs, values, make=make)
        stages = [with_workspace(stage, at, sources, found) for stage, at, sources in zip(stages, forward, backward)]
        stages = [dataclasses.replace(stage, uses_rng=True) if at in found.random_positions else stage
                  for at, stage in enumerate(stages)]
    adaptive_steps = tuple((at, m.profile.steps) for at, m in enumerate(measured)
                           if isinstance(m.profile, AdaptiveProfile) and m.profile.steps)
    del measured
    drift = found.drift if calibrate else {}
    stages = [_with_offer(stage, offer_at.get(at), drift.get(stage.block, 0.0),
                          found.excess("reconstruct", forward[at]).nbytes if calibrate else 0)
              for at, stage in enumerate(stages)]
    if calibrate:
        stages = [with_times(stage, forward[at], found) for at, stage in enumerate(stages)]
    stages = with_rng_restore(stages, example_inputs[0].device)
    progress.done(f"{len(stages)} stages, {len(traced.blocks) - blocks_alike} of {len(traced.blocks)} ODE blocks "
                  f"measured ({blocks_alike} share a block built alike)" + (", calibrated" if calibrate else ""))
    # The loss value and its gradient's seed: scalars the caller and autograd hold through
    # backward, in the output's precision (float32 at least, as autocast computes losses).
    # They are a value of the last state, made by the last stage, so every moment of
    # backward counts them.
    outputs = [t for name in traced.stages[-1].out_names for t in tree_flatten(values[name])[0]
               if isinstance(t, torch.Tensor)]
    scalar_bytes = max([4] + [t.element_size() for t in outputs if t.is_floating_point()])
    device = example_inputs[0].device
    loss_bytes = LOSS_VALUE_SCALARS * allocation_bytes(scalar_bytes, device)
    output_bytes = stages[-1].output_bytes
    stages[-1] = dataclasses.replace(stages[-1], output_bytes=output_bytes + loss_bytes)
    param_bytes = tuple(allocated_bytes(p) for p in params)
    blocks = tuple(Block(b.target, b.start, b.stop, b.method) for b in traced.blocks)
    batch = example_inputs[0].shape[0] if example_inputs[0].dim() else 1
    boundaries = [ids.ids(spec.in_names) for spec in traced.stages] + [ids.ids(traced.stages[-1].out_names)]
    boundaries[-1].append(len(ids.nbytes))  # the loss
    # The parts a reversible block carries besides its solution, at its end: nothing reads them.
    rest = [name for spec in traced.stages if isinstance(spec.z_out, tuple) and spec.block is not None
            and spec.step == traced.blocks[spec.block].nt - 1 for name in spec.z_out[1:]]
    return Chain(stages=tuple(stages), blocks=blocks, param_grad_bytes=param_bytes,
                 gradless_values=tuple(sorted(ids.id_of[name] for name in rest if name in ids.id_of)),
                 input_grad=any(x.requires_grad for x in example_inputs),
                 head_bytes=LOSS_OUTPUTS * output_bytes + LOSS_SLACK_SCALARS * allocation_bytes(scalar_bytes, device),
                 name=f"{traced.model_name} (batch {batch})", cost_source="measured" if calibrate else "nominal",
                 timing_noise=timing_noise(found) if calibrate else 0.0,
                 region_cost=region_overhead(found) if calibrate else 0.0,
                 adaptive_steps=adaptive_steps,
                 state_values=tuple(tuple(values) for values in boundaries), value_bytes=(*ids.nbytes, loss_bytes))
