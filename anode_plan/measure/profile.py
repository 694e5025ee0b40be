"""One stage measured on fake tensors: its peaks untaped, taped, re-run and in backward, its tape and cost.

Nothing real runs: each stage of the fake copy of the model (:mod:`anode_plan.measure.chain`)
is run three ways on fake inputs:

* untaped (saved tensors discarded, as inside a checkpoint region): its peak;
* taped: its peak, and the tensors autograd *really* saves, collected with
  ``torch.autograd.graph.saved_tensors_hooks``, deduplicated by storage, and split into
  the stage's input, its output, parameters and the rest (the tape);
* backward (``torch.autograd.grad``): its peak, and which parameters it reaches;

and re-run in backward as a checkpoint of its own (:mod:`anode_plan.measure.phases`).
Its nominal costs come from ``torch.utils.flop_counter.FlopCounterMode`` plus a bandwidth
term for the memory each stage writes, converted to milliseconds at fixed rates
(``FLOPS_PER_MS``, ``BYTES_PER_MS``): what ``calibrate=False`` plans on, and what breaks
ties on measured costs; calibration replaces them with times measured on the device
(:mod:`anode_plan.measure.calibrate`).
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Sequence

import torch
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
)
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from anode_plan.errors import InPlaceModificationError, UntraceableModelError
from anode_plan.measure.phases import (
    backward_accumulating,
    backward_through_rerun,
    fresh_inputs,
    needing_grad,
    run_untaped,
)
from anode_plan.measure.sharing import BlockMatch
from anode_plan.memory import LiveStorageTracker, allocated_bytes
from anode_plan.tracing.capture import user_line
from anode_plan.tracing.trace import StageSpec, TracedModel
from planners import Stage

FLOPS_PER_MS = 5e7   # 50 GFLOP/s: a nominal rate, for comparing stages
BYTES_PER_MS = 5e6   # 5 GB/s of memory writes


def storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


def storage_bytes(values: Any) -> dict[int, int]:
    """Unique storages among the tensors in ``values``: key -> bytes."""
    found: dict[int, int] = {}
    for value in tree_flatten(values)[0]:
        if isinstance(value, torch.Tensor):
            found[storage_key(value)] = allocated_bytes(value)
    return found


class StageProfile:
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
            if tensor is not None and tensor._version != version and storage_key(tensor) not in fixed_storages:
                raise _SavedTensorOverwritten(tensor)
        self.outputs = outputs
        output_keys = set(storage_bytes(outputs))
        saved_storages = storage_bytes([ref() for ref in saved])
        self.saves_input = bool(input_keys & saved_storages.keys())
        self.saves_output = bool(output_keys & saved_storages.keys())
        self.saved_inputs = saved_positions(inputs, saved_storages)
        self.saved_outputs = saved_positions(outputs, saved_storages)
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
                                         backward_through_rerun(fn, inputs, params, TrackerProbe(tracker)))
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
            self._bwd_accumulating_bytes = backward_accumulating(fn, inputs, params, TrackerProbe(tracker))
        return self._bwd_accumulating_bytes

    def stage(self, spec: StageSpec, values: "ValueIds", measured: StageSpec | None = None, *,
              bwd_bytes: int | None = None, match: BlockMatch | None = None) -> Stage:
        """The chain's stage for ``spec``, from this profile of ``measured`` (another step of
        the same block, or of a block built alike, whose names and parameters ``match`` maps).

        ``bwd_bytes``: its backward's peak where it runs in the chain (by default the one
        measured alone).
        """
        measured = spec if measured is None else measured
        match = BlockMatch.identity() if match is None else match
        bwd_bytes = self.bwd_bytes if bwd_bytes is None else bwd_bytes
        saved_names = [same_role(measured.in_names[p], measured, spec, match) for p in self.saved_inputs] + \
            [same_role(measured.out_names[p], measured, spec, match) for p in self.saved_outputs]
        saved = tuple(values.ids([name for names in saved_names for name in names]))
        return Stage(name=spec.name, input_bytes=values.state_bytes(spec.in_names),
                     output_bytes=values.state_bytes(spec.out_names), tape_bytes=self.tape_bytes,
                     saves_input=self.saves_input, saves_output=self.saves_output, saved_values=saved,
                     fwd_taped_bytes=self.fwd_taped_bytes, fwd_untaped_bytes=self.fwd_untaped_bytes,
                     rerun_taped_bytes=self.rerun_taped_bytes,
                     bwd_bytes=bwd_bytes, fwd_cost=self.fwd_cost, bwd_cost=self.bwd_cost,
                     param_ids=match.param_ids(self.param_ids), block=spec.block, step=spec.step,
                     uses_rng=self.uses_rng)


class TrackerProbe:
    """A :class:`~anode_plan.measure.phases.Probe` reading the storage tracker (on fake tensors)."""

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


def measure_stage(spec: StageSpec, traced: TracedModel, *args: Any) -> StageProfile:
    """Profile one stage; a layer that needs tensor values, which fake tensors lack, gets a clear error."""
    try:
        return StageProfile(*args)
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


def saved_positions(values: Sequence[Any], storages: dict[int, int]) -> tuple[int, ...]:
    """Positions in ``values`` of the values (tensors, or tuples of them) with a storage among ``storages``."""
    return tuple(p for p, v in enumerate(values) if storage_bytes(v).keys() & storages.keys())


def same_role(name: str, measured: StageSpec, spec: StageSpec, match: BlockMatch) -> tuple[str, ...]:
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


class ValueIds:
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
