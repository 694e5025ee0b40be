"""``torch.compile(compiled_model)``, the habit: the schedule still runs as planned and the budget holds.

TorchDynamo tracing into the schedule would turn its checkpoint regions into one graph
(flattening nested regions, saving what the partitioner likes): the ``ode_resnet`` below, at half
of plain autograd's 16,950,512 B peak, peaked at 8,651,312 B against its 8,475,256 B budget that
way (2.1% over), with no word. A compiled model now stops TorchDynamo at its schedule and says so once; these
tests measure the wrapped model's training step with the allocator.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

import anode_plan
from models import mlp_ode, ode_resnet
from promise import assert_budget_promise, step_peak

pytestmark = pytest.mark.filterwarnings("ignore:.*No CUDA runtime.*")


def _grads(module, x, y):
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    loss = F.cross_entropy(module(x), y)
    loss.backward()
    grads = [p.grad.clone() for p in module.parameters()]
    module.zero_grad(set_to_none=True)
    return loss.detach(), x.grad, grads


def test_torch_compile_of_a_compiled_model_keeps_the_budget_and_says_so_once():
    torch.manual_seed(0)
    model = ode_resnet(width=8, nt=4)  # the model
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    plain = anode_plan.measure_peak_memory(lambda: F.cross_entropy(model(x), y).backward()).peak_bytes
    model.zero_grad(set_to_none=True)
    budget = plain // 2
    compiled = anode_plan.compile(model, budget, (x,))
    eager_peak = step_peak(compiled, model, x, y).peak_bytes
    wrapped = torch.compile(compiled)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrapped_peak = step_peak(wrapped, model, x, y).peak_bytes  # two training calls
        _grads(wrapped, x, y)
    said = [w for w in caught if issubclass(w.category, anode_plan.TorchCompileWrapWarning)]
    assert len(said) == 1, [str(w.message) for w in caught]
    assert "budget" in str(said[0].message) and "backend='inductor'" in str(said[0].message)
    assert wrapped_peak == eager_peak, (wrapped_peak, eager_peak)
    assert_budget_promise(wrapped_peak, compiled.plan.predicted_peak_bytes, budget, "torch.compile(compiled)")


def test_torch_compile_of_an_inductor_compiled_model_runs_its_compiled_stages_exactly():
    torch.manual_seed(0)
    model = mlp_ode(features=6, hidden=8, blocks=2, nt=3, method="rk2").double()
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
    want = _grads(copy.deepcopy(model), x, y)
    try:
        anode_plan.compile(model, 1, (x,), backend="inductor")
    except anode_plan.InfeasibleBudgetError as error:
        low = error.min_budget_bytes
    compiled = anode_plan.compile(model, low, (x,), backend="inductor")
    assert compiled.plan.simulation.recomputed_forwards > 0 and not compiled.plan.eager_stages
    unwrapped_peak = step_peak(compiled, model, x, y).peak_bytes
    with pytest.warns(anode_plan.TorchCompileWrapWarning, match="already run as Inductor code"):
        wrapped = torch.compile(compiled)
        got = _grads(wrapped, x, y)
    assert step_peak(wrapped, model, x, y).peak_bytes == unwrapped_peak
    assert_budget_promise(unwrapped_peak, compiled.plan.predicted_peak_bytes, low, "torch.compile(inductor mode)")
    for mine, theirs in zip((got[0], got[1], *got[2]), (want[0], want[1], *want[2])):
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-14)
