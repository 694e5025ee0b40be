"""An adaptive ODE block as one stage of the chain, measured at its minimum.

An ``ODEBlock(f, method="dopri5")`` takes as many steps as its error control asks, known only
when it runs, so the cost model cannot run it on fake tensors (its loop reads values) and
the planners cannot count its steps. It is one stage of the chain, measured at its
minimum (:class:`AdaptiveProfile`): a solve keeping one checkpoint, the initial state's,
run and differentiated for real on random values of the state's shape, as the allocator
counts it (the online checkpointer keeps a step's live memory the same whatever the step count;
``tests/test_adaptive.py`` checks the peak stays flat as the interval grows). When the
chain is calibrated, that solve is also timed (forward, and backward at one checkpoint),
and the accepted steps it took are counted, so the plan can predict the block's time at
any number of checkpoints (:func:`anode_plan.plans.adaptive_share.adaptive_ms`). The
planners never recompute it (they plan with its cost set far above any stage's,
:func:`anode_plan.plans.adaptive_share.planning_view`). How the plan shares the budget
with it: :mod:`anode_plan.plans.adaptive_share`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import _disable_current_modes

from anode_plan.measure.timing import Stopwatch, time_phases
from anode_plan.memory import AllocatorMeter, allocated_bytes
from anode_plan.model_state import state_restored
from anode_plan.ode.tableaus import TABLEAUS
from planners import Stage

class AdaptiveProfile:
    """What the cost model knows of an adaptive block's stage (the interface of its stage profiles)."""

    def __init__(self, spec: Any, fake_block: nn.Module, real_block: nn.Module, inputs: tuple,
                 param_index: dict[int, int], *, timed: bool = False) -> None:
        z = inputs[0]
        parts = z if isinstance(z, tuple) else (z,)
        self.state_bytes = sum(allocated_bytes(p) for p in parts)
        needs_grad = any(p.requires_grad for p in parts) or any(p.requires_grad for p in fake_block.parameters())
        outputs = tuple(torch.empty_like(p).requires_grad_(needs_grad) for p in parts)
        self.outputs = (outputs if isinstance(z, tuple) else outputs[0],)
        self.param_ids = tuple(sorted(param_index[id(p)] for p in fake_block.parameters() if id(p) in param_index))
        with _disable_current_modes():  # real tensors, on the device, outside the fake mode and the tracker
            self.fwd_bytes, self.kept_bytes, self.bwd_bytes = _measure_minimum_solve(
                real_block, parts, isinstance(z, tuple), any(p.requires_grad for p in parts))
            self.fwd_ms, self.bwd_ms, self.steps = (_time_minimum_solve(real_block, parts, isinstance(z, tuple))
                                                    if timed else (0.0, 0.0, 0))
        self.uses_rng = False

    def bwd_accumulating_bytes(self) -> int:
        return self.bwd_bytes

    def stage(self, spec: Any, values: Any, measured: Any = None, *, bwd_bytes: int | None = None,
              match: Any = None) -> Stage:
        return Stage(name=spec.name, input_bytes=values.state_bytes(spec.in_names),
                     output_bytes=values.state_bytes(spec.out_names), tape_bytes=self.kept_bytes,
                     saves_input=True, saves_output=False, fwd_taped_bytes=self.fwd_bytes,
                     fwd_untaped_bytes=self.fwd_bytes, rerun_taped_bytes=self.fwd_bytes,
                     bwd_bytes=self.bwd_bytes if bwd_bytes is None else max(bwd_bytes, self.bwd_bytes),
                     fwd_cost=self.fwd_ms, bwd_cost=self.bwd_ms, param_ids=self.param_ids,
                     block=spec.block, step=spec.step)


def _random_state(like: tuple, input_grad: bool) -> tuple:
    device = like[0].device
    generator = torch.Generator(device=device).manual_seed(0)
    return tuple(torch.randn(p.shape, dtype=p.dtype, device=device, generator=generator).requires_grad_(input_grad)
                 for p in like)


def _time_minimum_solve(block: nn.Module, like: tuple, tuple_state: bool) -> tuple[float, float, int]:
    """The solve of :func:`_measure_minimum_solve` timed once more (it has just run, and its backward at one
    checkpoint re-runs ``O(steps²)`` steps, so once): (forward ms, backward ms, accepted steps).

    The steps are counted from the evaluations of ``func`` in one forward: every method
    here is first-same-as-last, so a solve makes 2 evaluations to start (``f₀`` and the
    first step's choice) and ``stages - 1`` per attempt (rejected attempts included,
    which makes this an upper bound).
    """
    device = like[0].device
    parts = _random_state(like, any(p.requires_grad for p in like))
    start = parts if tuple_state else parts[0]
    params = [p for p in block.parameters() if p.requires_grad]
    wrt = [p for p in parts if p.requires_grad] + params
    calls = [0]
    hook = (block.func.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
            if isinstance(block.func, nn.Module) else None)

    def run(watch: Stopwatch) -> None:
        calls[0] = 0
        watch.start()
        out = block(start)
        watch.lap("forward")
        outputs = out if isinstance(out, tuple) else (out,)
        if wrt:
            seeds = [torch.ones_like(o) for o in outputs]
            watch.start()
            grads = torch.autograd.grad(outputs, wrt, seeds, allow_unused=True)
            watch.lap("backward")
            del grads

    before, block.checkpoints = block.checkpoints, 1
    try:
        with state_restored(block, device):
            evaluations = [0]

            def counted(watch: Stopwatch) -> None:
                run(watch)
                evaluations[0] = evaluations[0] or calls[0]

            times = time_phases(counted, device, min_repeats=1, max_repeats=1, warm=True)
    finally:
        block.checkpoints = before
        if hook is not None:
            hook.remove()
    stages = TABLEAUS[block.method].stages
    steps = max(1, round((evaluations[0] - 2) / max(1, stages - 1))) if evaluations[0] else 0
    return times.get("forward"), times.get("backward"), steps


def _measure_minimum_solve(block: nn.Module, like: tuple, tuple_state: bool, input_grad: bool) -> tuple[int, int, int]:
    """A solve of ``block`` at one checkpoint, for real on random values shaped ``like``: its forward's peak
    (output included), what it keeps besides input and output, and its backward's peak (the input's and the
    parameters' gradients included), as the allocator counts them. The block's buffers are put back."""
    device = like[0].device
    parts = _random_state(like, input_grad)
    start = parts if tuple_state else parts[0]
    params = [p for p in block.parameters() if p.requires_grad]
    wrt = (list(parts) if input_grad else []) + params
    before, block.checkpoints = block.checkpoints, 1
    try:
        with state_restored(block, device), AllocatorMeter(device) as meter:
            began = meter.mark()
            out = block(start)
            outputs = out if isinstance(out, tuple) else (out,)
            seeds = [torch.ones_like(o) for o in outputs]  # the output's gradient is there before the backward
            solved = meter.mark()
            grads = torch.autograd.grad(outputs, wrt, seeds, allow_unused=True)
            done = meter.mark()
            del grads
        output_bytes = sum(allocated_bytes(o) for o in outputs)
        kept = meter.allocated_bytes(solved) - meter.allocated_bytes(began) - 2 * output_bytes
        return meter.peak_bytes(began, solved), max(0, kept), meter.peak_bytes(solved, done)
    finally:
        block.checkpoints = before
