"""Measure every stage of a traced model on fake tensors and lower it to a :class:`planners.Chain`.

Nothing real runs: the model is copied into a ``FakeTensorMode`` (tensors with shapes,
dtypes and storages but no data), and each stage is run three ways on fake inputs:

* untaped (saved tensors discarded, as inside a checkpoint region): its peak;
* taped: its peak, and the tensors autograd *really* saves, collected with
  ``torch.autograd.graph.saved_tensors_hooks``, deduplicated by storage, and split into
  the stage's input, its output, parameters and the rest (the tape);
* backward (``torch.autograd.grad``): its peak, and which parameters it reaches.

Peaks come from :class:`~anode_plan.memory.LiveStorageTracker`. Costs come from
``torch.utils.flop_counter.FlopCounterMode`` plus a bandwidth term for the memory each
stage writes, converted to nominal milliseconds (``FLOPS_PER_MS``, ``BYTES_PER_MS``):
the planners only compare costs, so the nominal rates need not match the machine.

The time steps of one ODE block have identical shapes, so one step is measured and
its numbers reused for the others.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch._subclasses.fake_tensor import (DataDependentOutputException, DynamicOutputShapeException, FakeCopyMode,
                                           FakeTensorMode)
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.flop_counter import FlopCounterMode

from anode_plan.errors import UntraceableModelError
from anode_plan.memory import LiveStorageTracker
from anode_plan.trace import StageSpec, TracedModel, run_layer_group, run_step
from planners import Block, Chain, Stage

# The loss after the network is the user's: it is allowed LOSS_OUTPUTS tensors the size
# of the output, on top of the output's gradient, plus LOSS_SLACK_BYTES for scalars.
# Cross-entropy, MSE and x.square().mean() need at most three in backward (measured).
LOSS_OUTPUTS = 3
LOSS_SLACK_BYTES = 1024
FLOPS_PER_MS = 5e7   # 50 GFLOP/s: a nominal rate, for comparing stages
BYTES_PER_MS = 5e6   # 5 GB/s of memory writes


def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


def _storages(values: Any) -> dict[int, int]:
    """Unique storages among the tensors in ``values``: key -> bytes."""
    found: dict[int, int] = {}
    for value in tree_flatten(values)[0]:
        if isinstance(value, torch.Tensor):
            found[_storage_key(value)] = value.untyped_storage().nbytes()
    return found


def _fresh_input(value: Any) -> Any:
    """A stand-in for a stage input with its own autograd history (not a leaf, so in-place ops work)."""
    if isinstance(value, torch.Tensor):
        leaf = value.detach().requires_grad_(value.requires_grad)
        return leaf.clone() if value.requires_grad else leaf
    return value


class _StageProfile:
    """What one stage's three runs measured."""

    def __init__(self, fn: Callable[[tuple], tuple], inputs: tuple, params: list[torch.Tensor],
                 fixed_storages: set[int], tracker: LiveStorageTracker) -> None:
        inputs = tree_map(_fresh_input, tuple(inputs))  # a state value may be a tuple of tensors
        input_keys = set(_storages(inputs))
        self.input_bytes = sum(b for k, b in _storages(inputs).items() if k not in fixed_storages)

        base = tracker.reset_peak()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: None, lambda _: None):
            fn(inputs)
        self.fwd_untaped_bytes = tracker.peak_bytes - base

        saved: list[torch.Tensor] = []

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            saved.append(tensor)
            return tensor

        base = tracker.reset_peak()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), FlopCounterMode(display=False) as flops:
            outputs = fn(inputs)
        self.fwd_taped_bytes = tracker.peak_bytes - base
        fwd_flops = flops.get_total_flops()
        self.outputs = outputs
        output_keys = set(_storages(outputs))
        saved_storages = _storages(saved)
        self.saves_input = bool(input_keys & saved_storages.keys())
        self.saves_output = bool(output_keys & saved_storages.keys())
        self.saved_inputs = _positions(inputs, saved_storages)
        self.saved_outputs = _positions(outputs, saved_storages)
        excluded = input_keys | output_keys | fixed_storages
        self.tape_bytes = sum(b for k, b in saved_storages.items() if k not in excluded)
        self.output_bytes = sum(b for k, b in _storages(outputs).items() if k not in fixed_storages)

        differentiable = [o for o in tree_flatten(outputs)[0] if isinstance(o, torch.Tensor) and o.requires_grad]
        wrt = [v for v in tree_flatten(inputs)[0] if isinstance(v, torch.Tensor) and v.requires_grad] + params
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
        saved.clear()
        self.fwd_cost = fwd_flops / FLOPS_PER_MS + self.fwd_taped_bytes / BYTES_PER_MS
        self.bwd_cost = bwd_flops / FLOPS_PER_MS + self.bwd_bytes / BYTES_PER_MS

    def stage(self, spec: StageSpec, values: "_Values", measured: StageSpec | None = None) -> Stage:
        """The chain's stage for ``spec``, from this profile of ``measured`` (another step of the same block)."""
        measured = spec if measured is None else measured
        saved_names = [_same_role(measured.in_names[p], measured, spec) for p in self.saved_inputs] + \
            [_same_role(measured.out_names[p], measured, spec) for p in self.saved_outputs]
        saved = tuple(values.ids([name for names in saved_names for name in names]))
        return Stage(name=spec.name, input_bytes=values.state_bytes(spec.in_names),
                     output_bytes=values.state_bytes(spec.out_names), tape_bytes=self.tape_bytes,
                     saves_input=self.saves_input, saves_output=self.saves_output, saved_values=saved,
                     fwd_taped_bytes=self.fwd_taped_bytes, fwd_untaped_bytes=self.fwd_untaped_bytes,
                     bwd_bytes=self.bwd_bytes, fwd_cost=self.fwd_cost, bwd_cost=self.bwd_cost,
                     param_ids=self.param_ids, block=spec.block, step=spec.step)


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


def lower_to_chain(model: nn.Module, traced: TracedModel, example_inputs: Sequence[torch.Tensor]) -> Chain:
    """Measure ``traced``'s stages on fake copies of ``model`` and ``example_inputs``.

    Returns the :class:`planners.Chain` the planners work on. The model is left
    untouched (BatchNorm statistics included).
    """
    fake_mode = FakeTensorMode(allow_non_fake_inputs=False)
    with FakeCopyMode(fake_mode):
        fake_model = copy.deepcopy(model)
    fake_model.train(model.training)
    params = [p for p in fake_model.parameters() if p.requires_grad]
    fixed = {_storage_key(t) for t in list(fake_model.parameters()) + list(fake_model.buffers())}
    values: dict[str, Any] = {}
    with fake_mode:
        for name, example in zip(traced.input_names, example_inputs):
            values[name] = fake_mode.from_tensor(example)

    ids = _Values(values, fixed)
    stages: list[Stage] = []
    tracker = LiveStorageTracker()
    with fake_mode, tracker:
        index = 0
        while index < len(traced.stages):
            spec = traced.stages[index]
            inputs = tuple(values[n] for n in spec.in_names)
            if spec.block is None:
                profile = _measure(spec, lambda v, s=spec: run_layer_group(fake_model, traced, s, v),
                                        inputs, params, fixed, tracker)
                values.update(zip(spec.out_names, profile.outputs))
                stages.append(profile.stage(spec, ids))
                index += 1
                continue
            block = traced.blocks[spec.block]
            profile = _measure(spec, lambda v, s=spec: run_step(fake_model, s, v), inputs, params, fixed, tracker)
            z_next = dict(zip(spec.out_names, profile.outputs))[spec.z_out]
            for step_spec in traced.stages[block.start:block.stop]:
                values[step_spec.z_out] = z_next
                stages.append(profile.stage(step_spec, ids, measured=spec))
            index = block.stop
            del profile
    param_bytes = tuple(p.numel() * p.element_size() for p in params)
    blocks = tuple(Block(b.target, b.start, b.stop, b.method) for b in traced.blocks)
    batch = example_inputs[0].shape[0] if example_inputs[0].dim() else 1
    boundaries = [spec.in_names for spec in traced.stages] + [traced.stages[-1].out_names]
    return Chain(stages=tuple(stages), blocks=blocks, param_grad_bytes=param_bytes,
                 input_grad=any(x.requires_grad for x in example_inputs),
                 head_bytes=LOSS_OUTPUTS * stages[-1].output_bytes + LOSS_SLACK_BYTES,
                 name=f"{traced.model_name} (batch {batch})",
                 state_values=tuple(tuple(ids.ids(names)) for names in boundaries), value_bytes=tuple(ids.nbytes))
