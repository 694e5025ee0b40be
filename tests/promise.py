"""The budget promise every memory test checks, with the allocator as the meter.

A real training step's peak, as the allocator counts it (``anode_plan.measure_peak_memory``:
the profiler's allocation events on the CPU, ``max_memory_allocated`` on CUDA), is within
the budget, and the plan's prediction is within :data:`ABOVE` above that peak and never
more than :data:`BELOW` below it.

With ``ANODE_PLAN_PROMISE_LOG=path`` set, each check appends a line ``test predicted
measured budget`` to ``path``: the worst ratio over a whole run is then one ``sort`` away.
"""

from __future__ import annotations

import copy
import os

import torch.nn.functional as F

import anode_plan

ABOVE = 0.03
BELOW = 0.005


def assert_budget_promise(measured: int, predicted: int, budget: int | None, what: object = "") -> None:
    """``measured <= budget`` and ``measured·(1 - BELOW) <= predicted <= measured·(1 + ABOVE)``."""
    log = os.environ.get("ANODE_PLAN_PROMISE_LOG")
    if log:
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
        with open(log, "a", encoding="utf-8") as stream:
            stream.write(f"{test} {predicted} {measured} {budget}\n")
    if budget is not None:
        assert measured <= budget, f"{what}: the allocator's peak {measured} B is over the budget {budget} B"
    assert measured * (1 - BELOW) <= predicted, (
        f"{what}: predicted {predicted} B is {1 - predicted / measured:.3%} below the allocator's peak {measured} B")
    assert predicted <= measured * (1 + ABOVE), (
        f"{what}: predicted {predicted} B is {predicted / measured - 1:.3%} above the allocator's peak {measured} B")


def step_peak(compiled, model, x, y) -> anode_plan.MemoryMeasurement:
    """The allocator's peak of one training step ``cross_entropy(compiled(x), y).backward()``.

    A forward first (lazily made state must not count), and the parameters' gradients
    cleared before and after, as ``optimizer.zero_grad()`` leaves them: the step makes them.
    """
    compiled(x)
    model.zero_grad(set_to_none=True)
    measured = anode_plan.measure_peak_memory(lambda: F.cross_entropy(compiled(x), y).backward())
    model.zero_grad(set_to_none=True)
    return measured


def training_step(module, model, x, y) -> list:
    """Loss, input gradient, parameter gradients and buffers after one step ``cross_entropy(module(x), y)
    .backward()``, flat; ``model`` (whose parameters ``module`` trains) is put back as it was."""
    state = copy.deepcopy(model.state_dict())
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    loss = F.cross_entropy(module(x), y)
    loss.backward()
    found = [loss.detach(), x.grad, *(p.grad.clone() for p in model.parameters()),
             *(b.clone() for b in model.buffers())]
    model.load_state_dict(state)
    model.zero_grad(set_to_none=True)
    return found


def restored_peak(module, model, x, y) -> int:
    """:func:`step_peak`'s allocator peak, in bytes, with ``model``'s statistics put back afterwards."""
    state = copy.deepcopy(model.state_dict())
    peak = step_peak(module, model, x, y).peak_bytes
    model.load_state_dict(state)
    return peak
