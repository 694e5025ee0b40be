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
  after it (:func:`_backward_after`): its output gradients come as that one makes them,
  and the parameters they share (every step of an ODE block) already have a gradient,
  which it adds to out of place.
* A re-run in backward (a non-reentrant checkpoint) starts only when backward needs a
  saved tensor, after the gradients that need none, and stops once the last saved tensor
  exists again: ``rerun_taped_bytes`` is the larger of that, measured on a checkpoint
  of the stage (:func:`_recompute_bytes`), and the first run's ``fwd_taped_bytes``.
  Plain BatchNorm layers re-run frozen in place, at no cost; other norm layers with
  running statistics re-run on copies of them (:func:`_running_stat_copies`), which
  every stage's forward and tape pay for.
* The loss value and its gradient's seed live through backward, as a value of the
  last state (``LOSS_VALUE_SCALARS``).

Peaks come from :class:`~anode_plan.memory.LiveStorageTracker`. Costs come from
``torch.utils.flop_counter.FlopCounterMode`` plus a bandwidth term for the memory each
stage writes, converted to nominal milliseconds (``FLOPS_PER_MS``, ``BYTES_PER_MS``):
the planners only compare costs, so the nominal rates need not match the machine.

The time steps of one ODE block have identical shapes, so one step is measured and
its numbers reused for the others.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import weakref
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch._subclasses.fake_tensor import (DataDependentOutputException, DynamicOutputShapeException, FakeCopyMode,
                                           FakeTensorMode)
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode

from anode_plan.errors import UntraceableModelError
from anode_plan.memory import LiveStorageTracker, allocated_bytes, allocation_bytes
from anode_plan.runtime import copied_on_rerun
from anode_plan.trace import StageSpec, TracedModel, run_layer_group, run_step
from planners import Block, Chain, Stage

# The loss after the network is the user's: it is allowed LOSS_OUTPUTS tensors the size
# of the output, on top of the output's gradient, plus LOSS_SLACK_BYTES for scalars (four
# allocator blocks on CUDA, where each scalar takes a 512-byte block).
# Cross-entropy, MSE and x.square().mean() need at most three in backward (measured).
LOSS_OUTPUTS = 3
LOSS_SLACK_BYTES = 1024
LOSS_VALUE_SCALARS = 2  # the loss and the seed of its gradient, live through backward
FLOPS_PER_MS = 5e7   # 50 GFLOP/s: a nominal rate, for comparing stages
BYTES_PER_MS = 5e6   # 5 GB/s of memory writes


def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


def _storages(values: Any) -> dict[int, int]:
    """Unique storages among the tensors in ``values``: key -> bytes."""
    found: dict[int, int] = {}
    for value in tree_flatten(values)[0]:
        if isinstance(value, torch.Tensor):
            found[_storage_key(value)] = allocated_bytes(value)
    return found


def _needing_grad(values: Any) -> list[torch.Tensor]:
    """The tensors among ``values`` (any nesting of tuples and lists) that require a gradient."""
    return [v for v in tree_flatten(values)[0] if isinstance(v, torch.Tensor) and v.requires_grad]


def _fresh_input(value: Any) -> Any:
    """A stand-in for a stage input with its own autograd history (not a leaf, so in-place ops work)."""
    if isinstance(value, torch.Tensor):
        leaf = value.detach().requires_grad_(value.requires_grad)
        return leaf.clone() if value.requires_grad else leaf
    return value


class _StageProfile:
    """What one stage's three runs measured."""

    def __init__(self, fn: Callable[[tuple], tuple], inputs: tuple, params: list[torch.Tensor],
                 fixed_storages: set[int], tracker: LiveStorageTracker, stat_copies: dict[int, int]) -> None:
        inputs = tree_map(_fresh_input, tuple(inputs))  # a state value may be a tuple of tensors
        input_keys = set(_storages(inputs))
        self.input_bytes = sum(b for k, b in _storages(inputs).items() if k not in fixed_storages)

        base = tracker.reset_peak()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: None, lambda _: None):
            fn(inputs)
        self.fwd_untaped_bytes = tracker.peak_bytes - base

        saved: list[weakref.ref] = []  # weak: a strong list would keep the tape alive through backward

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            saved.append(weakref.ref(tensor))
            return tensor

        base = tracker.reset_peak()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), FlopCounterMode(display=False) as flops:
            outputs = fn(inputs)
        self.fwd_taped_bytes = tracker.peak_bytes - base
        fwd_flops = flops.get_total_flops()
        self.outputs = outputs
        output_keys = set(_storages(outputs))
        saved_storages = _storages([ref() for ref in saved])
        self.saves_input = bool(input_keys & saved_storages.keys())
        self.saves_output = bool(output_keys & saved_storages.keys())
        self.saved_inputs = _positions(inputs, saved_storages)
        self.saved_outputs = _positions(outputs, saved_storages)
        excluded = input_keys | output_keys | fixed_storages
        self.tape_bytes = sum(b for k, b in saved_storages.items() if k not in excluded)
        self.output_bytes = sum(b for k, b in _storages(outputs).items() if k not in fixed_storages)

        differentiable = _needing_grad(outputs)
        wrt = _needing_grad(inputs) + params
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
        if self.param_ids or _needing_grad(inputs):
            self.rerun_taped_bytes = max(self.fwd_taped_bytes, _recompute_bytes(fn, inputs, params, tracker))
        # Re-run in backward, norm layers other than plain BatchNorm run on copies of their
        # running statistics (see _running_stat_copies): all live while it runs, and its
        # tape saves copies. Charged to every run, an upper bound.
        self.fwd_untaped_bytes += sum(stat_copies.values())
        self.fwd_taped_bytes += sum(stat_copies.values())
        self.rerun_taped_bytes += sum(stat_copies.values())
        self.tape_bytes += sum(b for k, b in saved_storages.items() if k in stat_copies)

    def bwd_accumulating_bytes(self) -> int:
        """The backward's peak when its parameters' gradients are under way (measured once, when first asked)."""
        if self._bwd_accumulating_bytes is None:
            self._bwd_accumulating_bytes = _accumulating_bwd_bytes(*self._rerun)
        return self._bwd_accumulating_bytes

    def stage(self, spec: StageSpec, values: "_Values", measured: StageSpec | None = None, *,
              bwd_bytes: int | None = None) -> Stage:
        """The chain's stage for ``spec``, from this profile of ``measured`` (another step of the same block).

        ``bwd_bytes``: its backward's peak where it runs in the chain (by default the one
        measured alone).
        """
        measured = spec if measured is None else measured
        bwd_bytes = self.bwd_bytes if bwd_bytes is None else bwd_bytes
        saved_names = [_same_role(measured.in_names[p], measured, spec) for p in self.saved_inputs] + \
            [_same_role(measured.out_names[p], measured, spec) for p in self.saved_outputs]
        saved = tuple(values.ids([name for names in saved_names for name in names]))
        return Stage(name=spec.name, input_bytes=values.state_bytes(spec.in_names),
                     output_bytes=values.state_bytes(spec.out_names), tape_bytes=self.tape_bytes,
                     saves_input=self.saves_input, saves_output=self.saves_output, saved_values=saved,
                     fwd_taped_bytes=self.fwd_taped_bytes, fwd_untaped_bytes=self.fwd_untaped_bytes,
                     rerun_taped_bytes=self.rerun_taped_bytes,
                     bwd_bytes=bwd_bytes, fwd_cost=self.fwd_cost, bwd_cost=self.bwd_cost,
                     param_ids=self.param_ids, block=spec.block, step=spec.step)


def _accumulating_bwd_bytes(fn: Callable[[tuple], tuple], inputs: tuple, params: list[torch.Tensor],
                            tracker: LiveStorageTracker) -> int:
    """The peak of a stage's backward when its parameters' gradients are already under way.

    In one training step a parameter used by several stages (every step of an ODE block)
    gets its gradient summed by autograd as each of their backwards reaches it: the first
    one's is kept, and each later one makes its own and adds them out of place, a
    parameter-sized buffer more for a moment. The stage is run twice on the same graph;
    backward runs the second run's nodes first (they are newer), so when it reaches the
    first run, every parameter has a gradient pending. Measured from there on (from the
    start, so over both runs, if no output of the first run has a node to say when).
    """
    runs = []
    for _ in range(2):
        fresh = tree_map(_fresh_input, tuple(inputs))
        runs.append((_needing_grad(fn(fresh)), _needing_grad(fresh)))
    (first_outputs, first_inputs), (second_outputs, second_inputs) = runs
    return _backward_peak_from(tracker, first_outputs, second_outputs + first_outputs,
                               second_inputs + first_inputs + params)


def _backward_peak_from(tracker: LiveStorageTracker, start_at: list[torch.Tensor], outputs: list[torch.Tensor],
                        wrt: list[torch.Tensor]) -> int:
    """The peak of ``autograd.grad(outputs, wrt)`` (seeds of ones) from when it reaches a node of ``start_at``.

    From backward's start if none of ``start_at`` has a node. The seeds are allocated
    before the measurement, as the incoming gradients of a step's backward are.
    """
    seeds = [torch.ones_like(o) for o in outputs]
    base = [tracker.reset_peak()]

    def start(grad_outputs: Any) -> None:
        if len(base) == 1:
            base.append(tracker.reset_peak())

    hooks = [t.grad_fn.register_prehook(start) for t in start_at if t.grad_fn is not None]
    try:
        grads = torch.autograd.grad(outputs, wrt, seeds, allow_unused=True)
        del grads
        return tracker.peak_bytes - base[-1]
    finally:
        for hook in hooks:
            hook.remove()


class _RecomputeEnd(contextlib.AbstractContextManager):
    """A checkpoint's recompute context that notes the tracker's peak when the re-run ends."""

    def __init__(self, tracker: LiveStorageTracker, peaks: list[int]) -> None:
        self.tracker = tracker
        self.peaks = peaks

    def __exit__(self, *exc: Any) -> None:
        self.peaks.append(self.tracker.peak_bytes)


def _recompute_bytes(fn: Callable[[tuple], tuple], inputs: tuple, params: list[torch.Tensor],
                     tracker: LiveStorageTracker) -> int:
    """The peak of re-running the stage in backward, as a checkpoint region of its own.

    A non-reentrant checkpoint re-runs its region only when backward first needs a tensor
    it saved: the nodes before that (an ODE step's final sum of its slopes, scaled by
    Python numbers) have already made their gradients, and the re-run stops as soon as the
    last saved tensor exists again. Measured from backward's start to the re-run's end.
    """
    flat, structure = tree_flatten(tree_map(_fresh_input, tuple(inputs)))
    versions = [v._version for v in flat if isinstance(v, torch.Tensor)]
    peaks: list[int] = []
    outputs = checkpoint(lambda *values: fn(tree_unflatten(list(values), structure)), *flat, use_reentrant=False,
                         preserve_rng_state=False,
                         context_fn=lambda: (contextlib.nullcontext(), _RecomputeEnd(tracker, peaks)))
    outputs = _needing_grad(outputs)
    if not outputs or versions != [v._version for v in flat if isinstance(v, torch.Tensor)]:
        return 0  # a stage that writes into its input cannot be re-run; the runtime refuses such regions
    wrt = _needing_grad(flat) + params
    seeds = [torch.ones_like(o) for o in outputs]
    # Backward runs outside the step's autocast, so the re-run casts the weights afresh.
    torch.clear_autocast_cache()
    base = tracker.reset_peak()
    grads = torch.autograd.grad(outputs, wrt, seeds, allow_unused=True)
    del grads
    return peaks[0] - base if peaks else 0


def _backward_after(first: Callable[[tuple], tuple], first_spec: StageSpec, second: Callable[[tuple], tuple],
                    second_spec: StageSpec, values: dict[str, Any], params: list[torch.Tensor],
                    tracker: LiveStorageTracker) -> int:
    """The peak of stage ``first``'s backward where it runs: after that of ``second``, the stage after it.

    Its output gradients then come as ``second``'s backward makes them (views of one
    buffer after a ``cat``, say), and the parameters the two share already have a
    gradient under way, which the first one's backward adds to out of place. Both stages
    run on one graph; backward reaches ``first`` last (its nodes are older), and is
    measured from there on (from the start, over both, if no output of ``first`` has a node).
    """
    fresh = tree_map(_fresh_input, tuple(values[name] for name in first_spec.in_names))
    middle = dict(zip(first_spec.out_names, first(fresh)))
    ends = list(second(tuple(middle[name] for name in second_spec.in_names)))
    ends += [value for name, value in middle.items() if name not in second_spec.in_names]  # for later stages
    ends = _needing_grad(ends)
    if not ends:
        return 0
    start_at = [t for t in tree_flatten(list(middle.values()))[0] if isinstance(t, torch.Tensor)]
    return _backward_peak_from(tracker, start_at, ends, _needing_grad(fresh) + params)


def _running_stat_copies(model: nn.Module) -> dict[int, int]:
    """The buffers a re-run in backward copies: storage key -> bytes of the copy.

    A checkpoint region is re-run under :class:`anode_plan.runtime.RestoreRunningStats`.
    Plain BatchNorm layers are frozen in place there and cost nothing; the other norm
    layers with running statistics (:func:`anode_plan.runtime.copied_on_rerun`: e.g.
    ``SyncBatchNorm``, ``InstanceNorm``) get fresh copies of them. The copies are
    allocated when a re-run starts and live until it ends, or, where a layer saved them for
    backward (BatchNorm does), until that backward. The original forward uses the buffers
    themselves; charging every stage is an upper bound.
    """
    copies = {}
    for module in copied_on_rerun(model):
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            buffer = module._buffers.get(name)
            if buffer is not None:
                copies[_storage_key(buffer)] = allocated_bytes(buffer)
    return copies


def _measure(spec: StageSpec, *args: Any) -> _StageProfile:
    """Profile one stage; a layer that needs tensor values, which fake tensors lack, gets a clear error."""
    try:
        return _StageProfile(*args)
    except (DataDependentOutputException, DynamicOutputShapeException) as error:
        where = "; ".join(getattr(error, "__notes__", ())) or f"stage {spec.name}"
        raise UntraceableModelError(
            f"the cost model runs every stage on fake tensors (shapes, no values), and stage {spec.name!r} needs "
            f"a value ({where}: {type(error).__name__} {error}). A layer there branches on a tensor's value "
            "(if x.sum() > 0, x.item(), x.tolist()) or makes a value-dependent shape (x.nonzero()). Compute it "
            "without Python control flow, e.g. torch.where(x.sum() > 0, x, -x), so it can be planned.") from None


def _positions(values: Sequence[Any], storages: dict[int, int]) -> tuple[int, ...]:
    """Positions in ``values`` of the values (tensors, or tuples of them) with a storage among ``storages``."""
    return tuple(p for p, v in enumerate(values) if _storages(v).keys() & storages.keys())


def _same_role(name: str, measured: StageSpec, spec: StageSpec) -> tuple[str, ...]:
    """The names in step ``spec`` of what ``name`` is in step ``measured`` of the same block.

    One step is measured for all steps of a block; its input state (all of ``z_in``) and
    output state stand for each step's own, while carried and context values keep their names.
    """
    if spec is measured:
        return (name,)
    z_in = (measured.z_in,) if isinstance(measured.z_in, str) else tuple(measured.z_in or ())
    if name in z_in:
        return (spec.z_in,) if isinstance(spec.z_in, str) else tuple(spec.z_in or ())
    if name == measured.z_out:
        return (spec.z_out,)
    return (name,)


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
                size = sum(b for k, b in _storages(self.fakes[name]).items() if k not in self.fixed)
                self.id_of[name] = len(self.nbytes)
                self.nbytes.append(size)
            found.append(self.id_of[name])
        return found

    def state_bytes(self, names: Sequence[str]) -> int:
        return sum(self.nbytes[v] for v in self.ids(names))


def _place_backwards(measured: list[tuple[_StageProfile, StageSpec, StageSpec]], traced: TracedModel,
                     fake_model: nn.Module, values: dict[str, Any], params: list[torch.Tensor],
                     tracker: LiveStorageTracker, ids: _Values) -> list[Stage]:
    """The chain's stages, each with its backward measured where it runs.

    Backward runs the stages last to first, so a stage's backward follows that of the
    stage after it (:func:`_backward_after`): a block's last step follows the stage after
    the block, and its other steps follow a step (the block's first two are measured). A
    stage adds to the gradients of parameters that a later one touched; where that is not
    the stage after it (two blocks sharing an ODE function), that is measured apart too.
    """
    def run(spec: StageSpec) -> Callable[[tuple], tuple]:
        if spec.block is None:
            return lambda v: run_layer_group(fake_model, traced, spec, v)
        return lambda v: run_step(fake_model, spec, v)

    positions = {id(spec): at for at, spec in enumerate(traced.stages)}
    later: list[set[int]] = [set() for _ in measured]
    touched: set[int] = set()
    for index in reversed(range(len(measured))):
        later[index] = touched.intersection(measured[index][0].param_ids)
        touched.update(measured[index][0].param_ids)
    after: dict[int, int] = {}
    stages = []
    for index, (profile, spec, measured_spec) in enumerate(measured):
        last_step = spec.block is None or spec.step == traced.blocks[spec.block].nt - 1
        at = positions[id(spec if last_step else measured_spec)]
        if at + 1 == len(traced.stages):
            bwd_bytes = profile.bwd_bytes  # the loss comes next
        else:
            if at not in after:
                first, second = traced.stages[at], traced.stages[at + 1]
                after[at] = _backward_after(run(first), first, run(second), second, values, params, tracker)
            bwd_bytes = after[at]
            if later[index] - set(measured[index + 1][0].param_ids):
                bwd_bytes = max(bwd_bytes, profile.bwd_accumulating_bytes())
        stages.append(profile.stage(spec, ids, measured_spec, bwd_bytes=bwd_bytes))
    return stages


def lower_to_chain(model: nn.Module, traced: TracedModel, example_inputs: Sequence[torch.Tensor]) -> Chain:
    """Measure ``traced``'s stages on fake copies of ``model`` and ``example_inputs``.

    Returns the :class:`planners.Chain` the planners work on. The model is left
    untouched (BatchNorm statistics included).
    """
    fake_mode = FakeTensorMode(allow_non_fake_inputs=False)
    with FakeCopyMode(fake_mode):
        fake_model = copy.deepcopy(model)
    fake_model.train(model.training)
    for module in fake_model.modules():
        # A cumulative average (momentum None) divides by float(num_batches_tracked), a value
        # fake tensors lack; the update's factor does not change what is allocated.
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.momentum is None:
            module.momentum = 0.1
    params = [p for p in fake_model.parameters() if p.requires_grad]
    fixed = {_storage_key(t) for t in list(fake_model.parameters()) + list(fake_model.buffers())}
    stat_copies = _running_stat_copies(fake_model)
    values: dict[str, Any] = {}
    with fake_mode:
        for name, example in zip(traced.input_names, example_inputs):
            values[name] = fake_mode.from_tensor(example)

    ids = _Values(values, fixed)
    measured: list[tuple[_StageProfile, StageSpec, StageSpec]] = []  # (profile, stage, stage measured)
    tracker = LiveStorageTracker()
    with fake_mode, tracker:
        index = 0
        while index < len(traced.stages):
            spec = traced.stages[index]
            inputs = tuple(values[n] for n in spec.in_names)
            if spec.block is None:
                profile = _measure(spec, lambda v, s=spec: run_layer_group(fake_model, traced, s, v),
                                        inputs, params, fixed, tracker, stat_copies)
                values.update(zip(spec.out_names, profile.outputs))
                measured.append((profile, spec, spec))
                index += 1
                continue
            block = traced.blocks[spec.block]
            profile = _measure(spec, lambda v, s=spec: run_step(fake_model, s, v), inputs, params, fixed, tracker,
                               stat_copies)
            z_next = dict(zip(spec.out_names, profile.outputs))[spec.z_out]
            for step_spec in traced.stages[block.start:block.stop]:
                values[step_spec.z_out] = z_next
                measured.append((profile, step_spec, spec))
            index = block.stop
        stages = _place_backwards(measured, traced, fake_model, values, params, tracker, ids)
        del measured
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
    return Chain(stages=tuple(stages), blocks=blocks, param_grad_bytes=param_bytes,
                 input_grad=any(x.requires_grad for x in example_inputs),
                 head_bytes=LOSS_OUTPUTS * output_bytes + max(LOSS_SLACK_BYTES, 4 * allocation_bytes(1, device)),
                 name=f"{traced.model_name} (batch {batch})",
                 state_values=tuple(tuple(values) for values in boundaries), value_bytes=(*ids.nbytes, loss_bytes))
