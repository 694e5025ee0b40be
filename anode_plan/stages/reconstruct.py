"""Run a ``Reconstruct`` op: a reversible block's steps, rebuilt backwards in backward.

:class:`planners.Reconstruct` keeps only the output of its steps. This autograd
function runs them without a tape and saves the output; its backward walks the steps
last to first: the inverse step (:meth:`anode_plan.ODEBlock.inverse_step`) rebuilds the
step's input from its output, the step runs again with a tape from it, and
``torch.autograd.grad`` takes that one step's vector-Jacobian product, for the step's
input and the parameters of the block. So the gradients are autograd's through the same
solver, at the rebuilt states (equal to the forward's to rounding: ``tests/test_reconstruct.py``
measures it), and the parameters' gradients reach them through the graph, as DDP needs.

As in a checkpoint re-run, the backward runs under the forward's autocast state, and
running statistics are not updated again (:class:`anode_plan.model_state.RestoreRunningStats`).
Stages that draw random numbers are never reconstructed (the planner does not offer it).

Background, papers and test values: ``docs/algorithms.md`` §8.
"""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from anode_plan.tracing.trace import StageSpec, TracedModel, run_stage


def inverse_state(root: nn.Module, spec: StageSpec, values: Sequence[Any]) -> tuple:
    """The input state of step ``spec`` from its output state ``values`` (carried values pass through)."""
    env = dict(zip(spec.out_names, values))
    block = root.get_submodule(spec.block_target)
    after = tuple(env[name] for name in spec.z_out)
    rebuilt = block.inverse_step(spec.step, after, *(env[name] for name in spec.context))
    if isinstance(spec.z_in, str):  # the first step takes z itself: the rebuilt y
        env[spec.z_in] = rebuilt[0]
    else:
        env.update(zip(spec.z_in, rebuilt))
    return tuple(env[name] for name in spec.in_names)


def _autocast_state(tensors: Sequence[torch.Tensor]) -> tuple[str, bool, torch.dtype]:
    device = next((t.device.type for t in tensors if isinstance(t, torch.Tensor)), "cpu")
    return device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)


def walk_step(root: nn.Module, traced: TracedModel, spec: StageSpec, holder: list, grads: list,
              params: Sequence[torch.Tensor], param_grads: list) -> list:
    """One step of a ``Reconstruct``'s backward: rebuild the step's input, re-run it taped, take its products.

    ``holder[0]`` is the state after step ``spec``; it is dropped once the inverse has
    rebuilt the state before it, which replaces it. ``grads`` are the gradients of the
    flat state after the step (``None`` where nothing flows); the gradients of the state
    before it are returned. Parameter gradients are added into ``param_grads`` in place
    (a ``None`` entry takes the first). The cost model measures this very function
    (:func:`measure_walk_step`), so the plan charges what runs.
    """
    with torch.no_grad():
        previous = inverse_state(root, spec, holder[0])
    holder[0] = None
    flat_in, structure_in = tree_flatten(previous)
    del previous
    leaves = [t.detach().requires_grad_(t.is_floating_point()) if isinstance(t, torch.Tensor) else t for t in flat_in]
    del flat_in
    with torch.enable_grad():
        out = run_stage(root, traced, spec, tree_unflatten(leaves, structure_in))
    flat_out = tree_flatten(out)[0]
    del out
    pairs = [(o, g) for o, g in zip(flat_out, grads)
             if g is not None and isinstance(o, torch.Tensor) and o.requires_grad]
    del flat_out
    wanted = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
    found = list(torch.autograd.grad([o for o, _ in pairs], wanted + list(params), [g for _, g in pairs],
                                     allow_unused=True)) if pairs else [None] * (len(wanted) + len(params))
    del pairs
    before = [found.pop(0) if isinstance(t, torch.Tensor) and t.requires_grad else None for t in leaves]
    for position, grad in enumerate(found):  # accumulated in place, as AccumulateGrad does
        if grad is None:
            continue
        if param_grads[position] is None:
            param_grads[position] = grad
        else:
            param_grads[position].add_(grad)
    del found
    holder[0] = tree_unflatten([t.detach() if isinstance(t, torch.Tensor) else t for t in leaves], structure_in)
    return before


def measure_walk_step(root: nn.Module, traced: TracedModel, spec: StageSpec, outputs: tuple,
                      params: Sequence[torch.Tensor], probe: Any) -> int:
    """The peak of one :func:`walk_step` above what is live when it starts (a
    :class:`~anode_plan.measure.phases.Probe` reads it): the state after the step, its
    gradient and the parameters' gradients (already accumulating) are live then."""
    flat, structure = tree_flatten(outputs)
    # Copies, so that the state after the step can be freed inside the walk as it is in backward.
    holder = [tree_unflatten([t.detach().clone() if isinstance(t, torch.Tensor) else t for t in flat], structure)]
    grads = [torch.ones_like(t) if isinstance(t, torch.Tensor) and t.is_floating_point() else None for t in flat]
    del flat
    param_grads = [torch.zeros_like(p) for p in params]
    probe.begin()
    with torch.no_grad():
        grads = walk_step(root, traced, spec, holder, grads, params, param_grads)
    return probe.end("reconstruct")


class _Reconstruct(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, setup: dict, *flat_and_params: torch.Tensor) -> tuple[torch.Tensor, ...]:
        count = setup["count"]
        flat = flat_and_params[:count]
        values = tree_unflatten(list(flat), setup["structure"])
        with torch.no_grad():
            for index in range(setup["start"], setup["stop"]):
                values = run_stage(setup["root"], setup["traced"], setup["traced"].stages[index], values)
        out, structure = tree_flatten(values)
        # A value carried through unchanged is returned as a new alias, so that autograd
        # sees each output as this function's.
        inputs = {id(t) for t in flat}
        out = [t.view_as(t) if id(t) in inputs else t for t in out]
        setup["out_structure"] = structure
        setup["autocast"] = _autocast_state(out)
        ctx.setup = setup
        ctx.set_materialize_grads(False)  # an output nothing used gets no gradient, not a tensor of zeros
        ctx.save_for_backward(*out)
        ctx.input_needs_grad = [t.requires_grad for t in flat]
        return tuple(out)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple:
        setup = ctx.setup
        root, traced, params = setup["root"], setup["traced"], setup["params"]
        holder = [tree_unflatten([t.detach() for t in ctx.saved_tensors], setup["out_structure"])]
        grads = list(grads)
        param_grads: list[torch.Tensor | None] = [None] * len(params)
        device, enabled, dtype = setup["autocast"]
        for index in reversed(range(setup["start"], setup["stop"])):
            with setup["stats"](), torch.amp.autocast(device, dtype=dtype, enabled=enabled):
                grads = walk_step(root, traced, traced.stages[index], holder, grads, params, param_grads)
        input_grads = [g if need else None for g, need in zip(grads, ctx.input_needs_grad)]
        return (None, *input_grads, *param_grads)


def run_reconstruct(root: nn.Module, traced: TracedModel, start: int, stop: int, values: tuple,
                    stats: Any = contextlib.nullcontext) -> tuple:
    """Stages ``[start, stop)`` of a reversible block as a :class:`planners.Reconstruct`; returns the state after them.

    ``stats``: a factory of the context that keeps running statistics from updating in
    the backward's re-runs.
    """
    flat, structure = tree_flatten(values)
    block = root.get_submodule(traced.stages[start].block_target)
    params = [p for p in block.parameters() if p.requires_grad]
    setup = {"root": root, "traced": traced, "start": start, "stop": stop, "structure": structure,
             "count": len(flat), "params": params, "stats": stats}
    if not torch.is_grad_enabled() or not (any(isinstance(t, torch.Tensor) and t.requires_grad for t in flat)
                                           or params):
        for index in range(start, stop):
            values = run_stage(root, traced, traced.stages[index], values)
        return values
    out = _Reconstruct.apply(setup, *flat, *params)
    return tree_unflatten(list(out), setup["out_structure"])
