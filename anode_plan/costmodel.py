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
  after it (:func:`~anode_plan.stagerun.backward_after`): its output gradients come as that one makes them,
  and the parameters they share (every step of an ODE block) already have a gradient,
  which it adds to out of place.
* A re-run in backward (a non-reentrant checkpoint) starts only when backward needs a
  saved tensor, after the gradients that need none, and stops once the last saved tensor
  exists again: ``rerun_taped_bytes`` is the larger of that, measured on a checkpoint
  of the stage (:func:`~anode_plan.stagerun.backward_through_rerun`), and the first run's ``fwd_taped_bytes``.
  Plain BatchNorm layers re-run frozen in place, at no cost; other norm layers with
  running statistics re-run on copies of them (:func:`~anode_plan.stagerun.running_stat_copies`), which
  every stage's forward and tape pay for.
* The loss value and its gradient's seed live through backward, as a value of the
  last state (``LOSS_VALUE_SCALARS``).

Peaks come from :class:`~anode_plan.memory.LiveStorageTracker` on the fake tensors, and
then from calibration (:mod:`anode_plan.calibrate`): each of those measurements is made
once more for real, under the allocator, and what kernels allocate inside themselves is
added to the phase it occurs in. ODE blocks built alike share one measurement
(:mod:`anode_plan.sharing`). Costs come from
``torch.utils.flop_counter.FlopCounterMode`` plus a bandwidth term for the memory each
stage writes, converted to nominal milliseconds (``FLOPS_PER_MS``, ``BYTES_PER_MS``):
the planners only compare costs, so the nominal rates need not match the machine.

The time steps of one ODE block have identical shapes, so one step is measured and
its numbers reused for the others, and for the steps of every block built alike.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Hashable, NamedTuple, Sequence

import torch
from torch import nn
from torch._subclasses.fake_tensor import (DataDependentOutputException, DynamicOutputShapeException, FakeCopyMode,
                                           FakeTensorMode)
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from anode_plan.adaptive_stage import AdaptiveProfile
from anode_plan.calibrate import measure_workspaces, with_workspace
from anode_plan.errors import InPlaceModificationError, UntraceableModelError
from anode_plan.memory import LiveStorageTracker, allocated_bytes, allocation_bytes
from anode_plan.reconstruct import inverse_state, measure_walk_step
from anode_plan.sharing import BlockMatch, block_key, match_blocks
from anode_plan.stagerun import (backward_accumulating, backward_after, backward_through_rerun, fresh_inputs,
                                 needing_grad, run_untaped, running_stat_copies)
from anode_plan.trace import StageSpec, TracedModel, stage_function, user_line
from planners import Block, Chain, Reconstruction, Stage
from planners.progress import Progress

# The loss after the network is the user's: it is allowed LOSS_OUTPUTS tensors the size
# of the output, on top of the output's gradient, plus LOSS_SLACK_SCALARS scalars in the
# output's precision (each a 512-byte block on CUDA). Measured with the CPU allocator on
# top of the output's gradient: x.square().mean() takes 3 outputs and 8 bytes,
# cross-entropy 2 outputs and 8 bytes, MSE 1 output and 12 bytes, x.sum() 16 bytes.
_log = logging.getLogger("anode_plan.costmodel")
LOSS_OUTPUTS = 3
LOSS_SLACK_SCALARS = 4
LOSS_VALUE_SCALARS = 2  # the loss and the seed of its gradient, live through backward
FLOPS_PER_MS = 5e7   # 50 GFLOP/s: a nominal rate, for comparing stages
BYTES_PER_MS = 5e6   # 5 GB/s of memory writes


def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


def storage_bytes(values: Any) -> dict[int, int]:
    """Unique storages among the tensors in ``values``: key -> bytes."""
    found: dict[int, int] = {}
    for value in tree_flatten(values)[0]:
        if isinstance(value, torch.Tensor):
            found[_storage_key(value)] = allocated_bytes(value)
    return found


class _StageProfile:
    """What one stage's three runs measured."""

    def __init__(self, fn: Callable[[tuple], tuple], inputs: tuple, params: list[torch.Tensor],
                 fixed_storages: set[int], tracker: LiveStorageTracker, stat_copies: dict[int, int]) -> None:
        inputs = fresh_inputs(inputs)  # a state value may be a tuple of tensors
        input_keys = set(storage_bytes(inputs))
        self.input_bytes = sum(b for k, b in storage_bytes(inputs).items() if k not in fixed_storages)

        base, random_before = tracker.reset_peak(), tracker.random_ops
        run_untaped(fn, inputs)
        self.fwd_untaped_bytes = tracker.peak_bytes - base
        self.uses_rng = tracker.random_ops > random_before

        saved: list[weakref.ref] = []  # weak: a strong list would keep the tape alive through backward
        versions: list[int] = []

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            saved.append(weakref.ref(tensor))
            versions.append(tensor._version)
            return tensor

        base = tracker.reset_peak()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), FlopCounterMode(display=False) as flops:
            outputs = fn(inputs)
        self.fwd_taped_bytes = tracker.peak_bytes - base
        fwd_flops = flops.get_total_flops()
        for ref, version in zip(saved, versions):
            tensor = ref()
            if tensor is not None and tensor._version != version and _storage_key(tensor) not in fixed_storages:
                raise _SavedTensorOverwritten(tensor)
        self.outputs = outputs
        output_keys = set(storage_bytes(outputs))
        saved_storages = storage_bytes([ref() for ref in saved])
        self.saves_input = bool(input_keys & saved_storages.keys())
        self.saves_output = bool(output_keys & saved_storages.keys())
        self.saved_inputs = _positions(inputs, saved_storages)
        self.saved_outputs = _positions(outputs, saved_storages)
        excluded = input_keys | output_keys | fixed_storages
        self.tape_bytes = sum(b for k, b in saved_storages.items() if k not in excluded)
        self.output_bytes = sum(b for k, b in storage_bytes(outputs).items() if k not in fixed_storages)

        differentiable = needing_grad(outputs)
        wrt = needing_grad(inputs) + params
        self.param_ids: tuple[int, ...] = ()
        self.bwd_bytes = 0
        bwd_flops = 0
        if differentiable and wrt:
            seeds = [torch.ones_like(o) for o in differentiable]
            base = tracker.reset_peak()
            with FlopCounterMode(display=False) as flops:
                grads = torch.autograd.grad(differentiable, wrt, seeds, allow_unused=True)
            self.bwd_bytes = tracker.peak_bytes - base
            bwd_flops = flops.get_total_flops()
            first_param = len(wrt) - len(params)
            self.param_ids = tuple(i for i, g in enumerate(grads[first_param:]) if g is not None)
            del grads, seeds
        self._rerun = (fn, inputs, params, tracker)
        self._bwd_accumulating_bytes: int | None = None
        self.fwd_cost = fwd_flops / FLOPS_PER_MS + self.fwd_taped_bytes / BYTES_PER_MS
        self.bwd_cost = bwd_flops / FLOPS_PER_MS + self.bwd_bytes / BYTES_PER_MS
        self.rerun_taped_bytes = self.fwd_taped_bytes
        if self.param_ids or needing_grad(inputs):
            self.rerun_taped_bytes = max(self.fwd_taped_bytes,
                                         backward_through_rerun(fn, inputs, params, _TrackerProbe(tracker)))
        # Re-run in backward, norm layers other than plain BatchNorm run on copies of their
        # running statistics (see running_stat_copies): all live while it runs, and its
        # tape saves copies. Charged to every run, an upper bound.
        self.fwd_untaped_bytes += sum(stat_copies.values())
        self.fwd_taped_bytes += sum(stat_copies.values())
        self.rerun_taped_bytes += sum(stat_copies.values())
        self.tape_bytes += sum(b for k, b in saved_storages.items() if k in stat_copies)

    def bwd_accumulating_bytes(self) -> int:
        """The backward's peak when its parameters' gradients are under way (measured once, when first asked)."""
        if self._bwd_accumulating_bytes is None:
            fn, inputs, params, tracker = self._rerun
            self._bwd_accumulating_bytes = backward_accumulating(fn, inputs, params, _TrackerProbe(tracker))
        return self._bwd_accumulating_bytes

    def stage(self, spec: StageSpec, values: "_Values", measured: StageSpec | None = None, *,
              bwd_bytes: int | None = None, match: BlockMatch | None = None) -> Stage:
        """The chain's stage for ``spec``, from this profile of ``measured`` (another step of
        the same block, or of a block built alike, whose names and parameters ``match`` maps).

        ``bwd_bytes``: its backward's peak where it runs in the chain (by default the one
        measured alone).
        """
        measured = spec if measured is None else measured
        match = BlockMatch.identity() if match is None else match
        bwd_bytes = self.bwd_bytes if bwd_bytes is None else bwd_bytes
        saved_names = [_same_role(measured.in_names[p], measured, spec, match) for p in self.saved_inputs] + \
            [_same_role(measured.out_names[p], measured, spec, match) for p in self.saved_outputs]
        saved = tuple(values.ids([name for names in saved_names for name in names]))
        return Stage(name=spec.name, input_bytes=values.state_bytes(spec.in_names),
                     output_bytes=values.state_bytes(spec.out_names), tape_bytes=self.tape_bytes,
                     saves_input=self.saves_input, saves_output=self.saves_output, saved_values=saved,
                     fwd_taped_bytes=self.fwd_taped_bytes, fwd_untaped_bytes=self.fwd_untaped_bytes,
                     rerun_taped_bytes=self.rerun_taped_bytes,
                     bwd_bytes=bwd_bytes, fwd_cost=self.fwd_cost, bwd_cost=self.bwd_cost,
                     param_ids=match.param_ids(self.param_ids), block=spec.block, step=spec.step,
                     uses_rng=self.uses_rng)


class _TrackerProbe:
    """A :class:`~anode_plan.stagerun.Probe` reading the storage tracker (on fake tensors)."""

    def __init__(self, tracker: LiveStorageTracker) -> None:
        self.tracker = tracker
        self.base = 0

    def begin(self) -> None:
        self.base = self.tracker.reset_peak()

    def end(self, label: str) -> int:
        return self.tracker.peak_bytes - self.base


def _writes_in_place(node: Any) -> bool:
    name = str(getattr(node.target, "__name__", node.target))
    return node.op in ("call_function", "call_method") and (name.endswith("_") and not name.endswith("__")
                                                            or name in ("iadd", "isub", "imul", "itruediv"))


class _SavedTensorOverwritten(Exception):
    def __init__(self, tensor: torch.Tensor) -> None:
        super().__init__()
        self.shape, self.dtype = tuple(tensor.shape), tensor.dtype


def _measure(spec: StageSpec, traced: TracedModel, *args: Any) -> _StageProfile:
    """Profile one stage; a layer that needs tensor values, which fake tensors lack, gets a clear error."""
    try:
        return _StageProfile(*args)
    except _SavedTensorOverwritten as error:
        writes = [traced.nodes[name] for name in spec.nodes if _writes_in_place(traced.nodes[name])]
        lines = "; ".join(f"{node.name} at {user_line(node) or '?'}" for node in writes)
        raise InPlaceModificationError(
            f"stage {spec.name!r} writes in place into a tensor that autograd saved for its backward (a "
            f"{error.dtype} tensor of shape {list(error.shape)}), for example out += y after out = F.relu(...)"
            + (f"; its in-place operations: {lines}" if lines else "") + ". "
            "Plain autograd refuses this model in backward ('one of the variables needed for gradient computation "
            "has been modified by an inplace operation'); a checkpointed re-run would hide the error and give "
            "wrong gradients. Write it out of place (out = out + y).") from None
    except (DataDependentOutputException, DynamicOutputShapeException) as error:
        where = "; ".join(getattr(error, "__notes__", ())) or f"stage {spec.name}"
        raise UntraceableModelError(
            f"the cost model runs every stage on fake tensors (shapes, no values), and stage {spec.name!r} needs "
            f"a value ({where}: {type(error).__name__} {error}). A layer there branches on a tensor's value "
            "(if x.sum() > 0, x.item(), x.tolist()) or makes a value-dependent shape (x.nonzero()). Compute it "
            "without Python control flow, e.g. torch.where(x.sum() > 0, x, -x), so it can be planned.") from None


def _positions(values: Sequence[Any], storages: dict[int, int]) -> tuple[int, ...]:
    """Positions in ``values`` of the values (tensors, or tuples of them) with a storage among ``storages``."""
    return tuple(p for p, v in enumerate(values) if storage_bytes(v).keys() & storages.keys())


def _same_role(name: str, measured: StageSpec, spec: StageSpec, match: BlockMatch) -> tuple[str, ...]:
    """The names in step ``spec`` of what ``name`` is in step ``measured``, of the same block or one built alike.

    One step is measured for all steps of a block (and of the blocks built alike): its
    input state (all of ``z_in``) and output state stand for each step's own, while carried
    and context values keep their names within a block and map by ``match`` across blocks.
    """
    if spec is measured:
        return (name,)
    z_in = (measured.z_in,) if isinstance(measured.z_in, str) else tuple(measured.z_in or ())
    spec_in = (spec.z_in,) if isinstance(spec.z_in, str) else tuple(spec.z_in or ())
    if name in z_in:  # a reversible method's parts map part by part; a tuple state entering a block, whole
        return (spec_in[z_in.index(name)],) if len(z_in) == len(spec_in) and len(z_in) > 1 else spec_in
    z_out = (measured.z_out,) if isinstance(measured.z_out, str) else tuple(measured.z_out)
    if name in z_out:
        spec_out = (spec.z_out,) if isinstance(spec.z_out, str) else tuple(spec.z_out)
        return (spec_out[z_out.index(name)],)
    return (match.name(name),)


class _Values:
    """Value ids for the fx names of states: one id per name, bytes from its fake tensor."""

    def __init__(self, fakes: dict[str, Any], fixed: set[int]) -> None:
        self.fakes = fakes
        self.fixed = fixed
        self.id_of: dict[str, int] = {}
        self.nbytes: list[int] = []

    def ids(self, names: Sequence[str]) -> list[int]:
        found = []
        for name in names:
            if name not in self.id_of:
                size = sum(b for k, b in storage_bytes(self.fakes[name]).items() if k not in self.fixed)
                self.id_of[name] = len(self.nbytes)
                self.nbytes.append(size)
            found.append(self.id_of[name])
        return found

    def state_bytes(self, names: Sequence[str]) -> int:
        return sum(self.nbytes[v] for v in self.ids(names))


class _Measured(NamedTuple):
    """A chain stage, the profile that measured it, the stage that profile ran, and how their names and
    parameters correspond (identity unless the profile is of a block built alike)."""

    profile: _StageProfile
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
                     params: list[torch.Tensor], tracker: LiveStorageTracker, ids: _Values,
                     kinds: list[Hashable]) -> tuple[list[Stage], list[tuple[BackwardSource, ...]]]:
    """The chain's stages, each with its backward measured where it runs, and where each was measured.

    Backward runs the stages last to first, so a stage's backward follows that of the
    stage after it (:func:`~anode_plan.stagerun.backward_after`): a block's last step
    follows the stage after the block, and its other steps follow a step (the block's
    first two are measured). A stage adds to the gradients of parameters that a later one
    touched; where that is not the stage after it (two blocks sharing an ODE function),
    that is measured apart too.
    """
    positions = {id(spec): at for at, spec in enumerate(traced.stages)}
    param_ids = [m.match.param_ids(m.profile.param_ids) for m in measured]
    accumulating = accumulating_stages(param_ids)
    after: dict[Hashable, tuple[int, int]] = {}  # (kind of the stage, of the next) -> (position measured, bytes)
    probe = _TrackerProbe(tracker)
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
    the peak of one step of the walk back (:func:`anode_plan.reconstruct.measure_walk_step`, the code
    backward runs) and the inverse's cost."""
    block = fake_model.get_submodule(spec.block_target)
    params = [p for p in block.parameters() if p.requires_grad]
    step_bytes = measure_walk_step(fake_model, traced, spec, outputs, params, _TrackerProbe(tracker))
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


def lower_to_chain(model: nn.Module, traced: TracedModel, example_inputs: Sequence[torch.Tensor], *,
                   calibrate: bool = True, share: bool = True, approximate: Any = None) -> Chain:
    """Measure ``traced``'s stages on fake copies of ``model`` and ``example_inputs``.

    Returns the :class:`planners.Chain` the planners work on. With ``calibrate`` (the
    default) each distinct stage also runs once for real on the device of
    ``example_inputs``, to measure what its kernels allocate inside themselves
    (:mod:`anode_plan.calibrate`); without it those workspaces are not in the chain.
    With ``share`` (the default) ODE blocks built alike are measured once
    (:mod:`anode_plan.sharing`); ``share=False`` measures every block, to check that.
    With ``approximate`` (an :class:`anode_plan.XConv`) the stages with convolutions that
    can be sketched are measured once more with them sketched, and offer that
    (:class:`planners.chain.Sketch`, :mod:`anode_plan.approximate`).
    The model is left untouched (BatchNorm statistics included).
    """
    chain = measure_chain(model, traced, example_inputs, calibrate=calibrate, share=share)
    if approximate is None:
        return chain
    from anode_plan.approximate import offer_sketches  # it lowers the model again, sketched, with measure_chain
    return offer_sketches(chain, model, traced, example_inputs, approximate, calibrate=calibrate, share=share)


def measure_chain(model: nn.Module, traced: TracedModel, example_inputs: Sequence[torch.Tensor], *,
                  calibrate: bool = True, share: bool = True, sketch: Any = None) -> Chain:
    """:func:`lower_to_chain` without sketch offers; with ``sketch`` (a
    :class:`~anode_plan.sketch.SketchedLayers`) every stage it names is measured with its
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
    fixed = {_storage_key(t) for t in list(fake_model.parameters()) + list(fake_model.buffers())}
    stat_copies = running_stat_copies(fake_model)
    values: dict[str, Any] = {}
    with fake_mode:
        for name, example in zip(traced.input_names, example_inputs):
            values[name] = fake_mode.from_tensor(example)

    ids = _Values(values, fixed)
    measured: list[_Measured] = []
    kinds: list[Hashable] = []  # per stage: what its measurements may be shared by
    shared: dict[Hashable, tuple[_StageProfile, StageSpec, nn.Module]] = {}  # block key -> its representative
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
                profile = _measure(spec, traced, make(fake_model, traced, spec), inputs, params, fixed, tracker,
                                   stat_copies)
                values.update(zip(spec.out_names, profile.outputs))
                measured.append(_Measured(profile, spec, spec, BlockMatch.identity()))
                kinds.append(("stage", index))
                index += 1
                continue
            block = traced.blocks[spec.block]
            module = fake_model.get_submodule(spec.block_target)
            if module.adaptive:  # one stage, measured at its minimum (anode_plan.adaptive_stage)
                profile = AdaptiveProfile(spec, module, model.get_submodule(spec.block_target), inputs, param_index)
                values.update(zip(spec.out_names, profile.outputs))
                measured.append(_Measured(profile, spec, spec, BlockMatch.identity()))
                kinds.append(("stage", index))
                index = block.stop
                continue
            first = None
            if module.reversible and block.nt > 1:
                # A reversible block's first step takes z and makes the carried state (one more
                # evaluation of f), the others carry it: the first is measured on its own.
                first = _measure(spec, traced, make(fake_model, traced, spec), inputs, params, fixed,
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
                profile = _measure(spec, traced, make(fake_model, traced, spec), inputs, params, fixed, tracker,
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
    del measured
    drift = found.drift if calibrate else {}
    stages = [_with_offer(stage, offer_at.get(at), drift.get(stage.block, 0.0),
                          found.excess("reconstruct", forward[at]).nbytes if calibrate else 0)
              for at, stage in enumerate(stages)]
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
                 name=f"{traced.model_name} (batch {batch})",
                 state_values=tuple(tuple(values) for values in boundaries), value_bytes=(*ids.nbytes, loss_bytes))
