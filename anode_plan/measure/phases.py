"""Running one stage by itself in the phases a training step runs it, and measuring each:
the pieces the cost model (on fake tensors) and the calibration (on the real device) share.

A stage is a function of its input state (a tuple of values, each a tensor or a tuple of
tensors). A training step runs it untaped (saved tensors dropped, as inside a checkpoint
region), taped, backward, and re-run in backward as a checkpoint region. Each measuring
function here reports its phases to a :class:`Probe`: the cost model's reads a storage
tracker on fake tensors, the calibration's reads the allocator as well. Both thus
measure the very same runs.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Protocol, Sequence

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.checkpoint import checkpoint

from anode_plan.memory import allocated_bytes
from anode_plan.model_state import copied_on_rerun
from anode_plan.tracing.trace import StageFn


class Probe(Protocol):
    """Measures phases of a run: :meth:`begin` starts one (or starts it again, later),
    :meth:`end` closes it under ``label`` and returns its peak on top of what was live at
    its start."""

    def begin(self) -> None: ...

    def end(self, label: str) -> int: ...


class Unmeasured:
    """A :class:`Probe` that measures nothing: for runs made only to warm up (cuDNN autotuning, compiling)."""

    def begin(self) -> None:
        pass

    def end(self, label: str) -> int:
        return 0


def needing_grad(values: Any) -> list[torch.Tensor]:
    """The tensors among ``values`` (any nesting of tuples and lists) that require a gradient."""
    return [v for v in tree_flatten(values)[0] if isinstance(v, torch.Tensor) and v.requires_grad]


def stand_in_loss(outputs: Any) -> torch.Tensor:
    """The loss whole measured steps use (the user's is not known when planning): the mean of the squared
    floating-point outputs, summed over outputs. Like a classification loss it keeps an output-sized value for
    its backward and hands backward an output-sized gradient."""
    parts = [t for t in tree_flatten(outputs)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return sum(t.float().square().mean() for t in parts) if parts else torch.zeros(())


def fresh_input(value: Any, requires_grad: bool | None = None) -> Any:
    """A stand-in for a stage input with its own autograd history (not a leaf, so in-place ops work).

    ``requires_grad`` defaults to the value's own flag.
    """
    if isinstance(value, torch.Tensor):
        needs = value.requires_grad if requires_grad is None else requires_grad
        leaf = value.detach().requires_grad_(needs)
        return leaf.clone() if needs else leaf
    return value


def fresh_inputs(values: Sequence[Any], like: Sequence[Any] | None = None) -> tuple:
    """:func:`fresh_input` of every tensor in ``values``; ``requires_grad`` taken from ``like`` (same structure)."""
    flat, structure = tree_flatten(tuple(values))
    if like is None:
        return tree_unflatten([fresh_input(v) for v in flat], structure)
    flags = [t.requires_grad if isinstance(t, torch.Tensor) else None for t in tree_flatten(tuple(like))[0]]
    return tree_unflatten([fresh_input(v, f) for v, f in zip(flat, flags)], structure)


def run_untaped(fn: StageFn, inputs: tuple) -> tuple:
    """Run the stage keeping no tape, as the first run inside a checkpoint region does."""
    with torch.autograd.graph.saved_tensors_hooks(lambda t: None, lambda _: None):
        return fn(inputs)


def backward_alone(fn: StageFn, inputs: tuple, params: list[torch.Tensor], probe: Probe) -> int:
    """The peak of the stage's backward by itself (seeds of ones), after a taped forward (labels
    ``"fwd_taped"`` and ``"alone"``); 0 when nothing needs a gradient."""
    fresh = fresh_inputs(inputs)
    probe.begin()
    outputs = needing_grad(fn(fresh))
    probe.end("fwd_taped")
    wrt = needing_grad(fresh) + params
    if not outputs or not wrt:
        return 0
    return backward_peak_from(probe, "alone", [], outputs, wrt)


def backward_peak_from(probe: Probe, label: str, start_at: list[torch.Tensor], outputs: list[torch.Tensor],
                       wrt: list[torch.Tensor]) -> int:
    """The peak of ``autograd.grad(outputs, wrt)`` (seeds of ones) from when it reaches a node of ``start_at``.

    From backward's start if none of ``start_at`` has a node. The seeds are allocated
    before the measurement, as the incoming gradients of a step's backward are.
    """
    seeds = [torch.ones_like(o) for o in outputs]
    reached: list[bool] = []

    def start(grad_outputs: Any) -> None:
        if not reached:
            reached.append(True)
            probe.begin()

    probe.begin()
    hooks = [t.grad_fn.register_prehook(start) for t in start_at if t.grad_fn is not None]
    try:
        grads = torch.autograd.grad(outputs, wrt, seeds, allow_unused=True)
        del grads
        return probe.end(label)
    finally:
        for hook in hooks:
            hook.remove()


def backward_after(first: StageFn, first_names: tuple[Sequence[str], Sequence[str]], second: StageFn,
                   second_in_names: Sequence[str], inputs: tuple, params: list[torch.Tensor], probe: Probe) -> int:
    """The peak of stage ``first``'s backward where it runs: after that of ``second``, the stage after it.

    ``first_names`` are the first stage's input and output names, ``second_in_names`` the
    second's inputs; ``inputs`` is the first stage's input state. Its output gradients
    then come as ``second``'s backward makes them (views of one buffer after a ``cat``,
    say), and the parameters the two share already have a gradient under way, which the
    first one's backward adds to out of place. Both stages run on one graph; backward
    reaches ``first`` last (its nodes are older), and is measured from there on (from the
    start, over both, if no output of ``first`` has a node). Labels ``"fwd_taped"`` (the
    first stage's taped forward) and ``"after"``.
    """
    in_names, out_names = first_names
    fresh = fresh_inputs(inputs)
    probe.begin()
    middle = dict(zip(out_names, first(fresh)))
    probe.end("fwd_taped")
    ends = list(second(tuple(middle[name] for name in second_in_names)))
    ends += [value for name, value in middle.items() if name not in second_in_names]  # for later stages
    ends = needing_grad(ends)
    if not ends:
        return 0
    start_at = [t for t in tree_flatten(list(middle.values()))[0] if isinstance(t, torch.Tensor)]
    return backward_peak_from(probe, "after", start_at, ends, needing_grad(fresh) + params)


def backward_accumulating(fn: StageFn, inputs: tuple, params: list[torch.Tensor], probe: Probe) -> int:
    """The peak of a stage's backward when its parameters' gradients are already under way (label ``"accumulating"``).

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
        fresh = fresh_inputs(inputs)
        runs.append((needing_grad(fn(fresh)), needing_grad(fresh)))
    (first_outputs, first_inputs), (second_outputs, second_inputs) = runs
    return backward_peak_from(probe, "accumulating", first_outputs, second_outputs + first_outputs,
                              second_inputs + first_inputs + params)


class _AtExit(contextlib.AbstractContextManager):
    def __init__(self, callback: Callable[[], None]) -> None:
        self.callback = callback

    def __exit__(self, *exc: Any) -> None:
        self.callback()


def backward_through_rerun(fn: StageFn, inputs: tuple, params: list[torch.Tensor], probe: Probe) -> int:
    """The peak of re-running the stage in backward, as a checkpoint region of its own (label ``"rerun"``).

    A non-reentrant checkpoint re-runs its region only when backward first needs a tensor
    it saved: the nodes before that (an ODE step's final sum of its slopes, scaled by
    Python numbers) have already made their gradients, and the re-run stops as soon as
    the last saved tensor exists again. Measured from backward's start to the re-run's
    end; the region's first run, untaped, is labelled ``"fwd_untaped"``. 0 when there is
    nothing to re-run: no output needs a gradient, or the stage writes into its input
    (which the runtime refuses to re-run).
    """
    flat, structure = tree_flatten(fresh_inputs(inputs))
    versions = [v._version for v in flat if isinstance(v, torch.Tensor)]
    ended: list[int] = []
    probe.begin()
    outputs = checkpoint(lambda *values: fn(tree_unflatten(list(values), structure)), *flat, use_reentrant=False,
                         preserve_rng_state=False,
                         context_fn=lambda: (contextlib.nullcontext(), _AtExit(lambda: ended.append(
                             probe.end("rerun")))))
    probe.end("fwd_untaped")
    outputs = needing_grad(outputs)
    if not outputs or versions != [v._version for v in flat if isinstance(v, torch.Tensor)]:
        return 0
    wrt = needing_grad(flat) + params
    seeds = [torch.ones_like(o) for o in outputs]
    # Backward runs outside the step's autocast, so the re-run casts the weights afresh.
    torch.clear_autocast_cache()
    probe.begin()
    grads = torch.autograd.grad(outputs, wrt, seeds, allow_unused=True)
    del grads
    return ended[0] if ended else 0


def running_stat_copies(model: nn.Module) -> dict[int, int]:
    """The buffers a re-run in backward copies: storage key -> bytes of the copy.

    A checkpoint region is re-run under :class:`anode_plan.model_state.RestoreRunningStats`.
    Plain BatchNorm layers are frozen in place there and cost nothing; the other norm
    layers with running statistics (:func:`anode_plan.model_state.copied_on_rerun`: e.g.
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
                copies[buffer.untyped_storage()._cdata] = allocated_bytes(buffer)
    return copies
