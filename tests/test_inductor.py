"""``compile(..., backend="inductor")``: every stage compiled by torch.compile, the schedule the planner's.

The promise is the eager mode's: float64 gradients (loss, input, every parameter) and
BatchNorm statistics equal plain autograd's to 1e-12, relative; the allocator's peak is
within the budget and the prediction close to it; a stage that cannot be compiled runs
eager, with a warning, and the budget still holds. Compiling is slow, so each model is
compiled once per module and its compiled stages are shared by the plans at every budget
(which is also what the caching test checks).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import anode_plan
from anode_plan import ODEBlock
from factories import tiny_odenet
from models import mlp_ode, ode_resnet
from promise import assert_budget_promise, step_peak

pytestmark = pytest.mark.filterwarnings("ignore:.*No CUDA runtime.*")
EXACT_RELATIVE = 1e-12


def _min_budget(model, inputs, **kwargs):
    with pytest.raises(anode_plan.InfeasibleBudgetError) as info:
        anode_plan.compile(model, 1, inputs, backend="inductor", **kwargs)
    return info.value.min_budget_bytes


def _store_all_budget(model, inputs):
    """A budget store-all fits with the planner's reserve to spare."""
    peak = anode_plan.compile(model, 2**40, inputs, backend="inductor", planner="store-all").plan.predicted_peak_bytes
    return int(peak * 1.02)


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = float(want.abs().max()) or 1.0
    return float((got - want).abs().max()) / scale


def _plain_step(model, x, y):
    model = copy.deepcopy(model)
    x = x.clone().requires_grad_(True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss.detach(), x.grad, {n: p.grad for n, p in model.named_parameters()}, dict(model.named_buffers())


def _compiled_step(model, budget, x, y, **kwargs):
    """One step of ``model`` compiled for ``budget``; the model is then put back as it was (its compiled
    stages are kept, so every budget runs the same compiled code)."""
    state = copy.deepcopy(model.state_dict())
    model.zero_grad(set_to_none=True)
    compiled = anode_plan.compile(model, budget, (x,), backend="inductor", **kwargs)
    x = x.clone().requires_grad_(True)
    loss = F.cross_entropy(compiled(x), y)
    loss.backward()
    found = (loss.detach(), x.grad, {n: p.grad.clone() for n, p in model.named_parameters()},
             {n: b.clone() for n, b in model.named_buffers()})
    model.load_state_dict(state)
    model.zero_grad(set_to_none=True)
    return compiled, found


def _assert_exact(got, want, what):
    (loss, dx, grads, buffers), (ref_loss, ref_dx, ref_grads, ref_buffers) = got, want
    assert _relative(loss, ref_loss) <= EXACT_RELATIVE, f"{what}: loss"
    assert _relative(dx, ref_dx) <= EXACT_RELATIVE, f"{what}: input gradient off by {_relative(dx, ref_dx):.1e}"
    for name, grad in ref_grads.items():
        err = _relative(grads[name], grad)
        assert err <= EXACT_RELATIVE, f"{what}: gradient of {name} off by {err:.1e}"
    for name, buf in ref_buffers.items():
        err = _relative(buffers[name].double(), buf.double())
        assert err <= EXACT_RELATIVE, f"{what}: buffer {name} off by {err:.1e}"


EXACT_MODELS = {
    # f depends on t, so each step is a graph of its own
    "mlp-time-dependent-rk2": (lambda: mlp_ode(features=6, hidden=8, blocks=2, nt=3, method="rk2",
                                               time_dependent=True).double(), (5, 6), 3),
    # BatchNorm: its statistics, updated once per step and frozen in re-runs
    "resnet-batchnorm-rk2": (lambda: ode_resnet(width=4, stages=2, nt=2, method="rk2", norm="batch").double(),
                             (4, 3, 8, 8), 10),
}


@pytest.mark.parametrize("name", sorted(EXACT_MODELS))
def test_float64_gradients_and_statistics_equal_plain_autograd(name):
    build, shape, classes = EXACT_MODELS[name]
    torch.manual_seed(0)
    model = build()
    x = torch.randn(*shape, dtype=torch.float64)
    y = torch.randint(0, classes, (shape[0],))
    want = _plain_step(model, x, y)
    low, high = _min_budget(model, (x,)), _store_all_budget(model, (x,))
    recomputed = []
    for budget in (high, (low * high) ** 0.5, low):
        compiled, got = _compiled_step(model, int(budget), x, y)
        assert compiled.plan.backend == "inductor" and not compiled.plan.eager_stages
        recomputed.append(compiled.plan.simulation.recomputed_forwards)
        _assert_exact(got, want, f"{name} at {int(budget)} B")
    assert recomputed[0] == 0 and recomputed[-1] > 0, f"the budgets should span store-all to recompute: {recomputed}"


BUDGET_MODELS = {
    "mlp": (lambda: mlp_ode(features=16, hidden=64, blocks=2, nt=4, method="rk2"), (64, 16), 3),
    "resnet-batchnorm": (lambda: ode_resnet(width=8, stages=1, nt=3, method="rk2", norm="batch"), (8, 3, 16, 16), 10),
    "tiny-odenet-tanh": (lambda: tiny_odenet(channels=8, nt=4), (8, 3, 12, 12), 5),
}


@pytest.mark.parametrize("name", sorted(BUDGET_MODELS))
def test_allocator_peak_within_budget_and_predicted(name):
    build, shape, classes = BUDGET_MODELS[name]
    torch.manual_seed(0)
    model = build()
    x, y = torch.randn(*shape), torch.randint(0, classes, (shape[0],))
    low, high = _min_budget(model, (x,)), _store_all_budget(model, (x,))
    for budget in (int(low + 0.4 * (high - low)), low):
        compiled = anode_plan.compile(model, budget, (x,), backend="inductor")
        measured = step_peak(compiled, model, x, y)
        assert_budget_promise(measured.peak_bytes, compiled.plan.predicted_peak_bytes, budget, f"{name} at {budget} B")


@torch.compiler.disable
def _host_side_scale(z: torch.Tensor) -> torch.Tensor:
    return z * 0.5


class _DisabledField(nn.Module):
    """dz/dt = tanh(W z), through a function TorchDynamo is told not to compile."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, t, z):
        return torch.tanh(self.linear(_host_side_scale(z)))


class _PartlyCompilable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.ode = ODEBlock(_DisabledField(), nt=3, method="rk2")
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        return self.out(self.ode(torch.relu(self.inp(x))))


def test_a_stage_that_cannot_be_compiled_runs_eager_with_a_warning_and_the_budget_holds():
    torch.manual_seed(0)
    model = _PartlyCompilable().double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    want = _plain_step(model, x, y)
    fell_back = r"stage\(s\) 1 \(ode@0\), 2 \(ode@1\), 3 \(ode@2\) could not.*run eager.*torch.compiler.disable"
    with pytest.warns(anode_plan.CompileFallbackWarning, match=fell_back) as caught:
        compiled, got = _compiled_step(model, 10**9, x, y)
    assert len([w for w in caught if w.category is anode_plan.CompileFallbackWarning]) == 1
    assert compiled.plan.unit is None  # nor can the whole model be one graph: the stages run, as planned
    eager = dict(compiled.plan.eager_stages)
    assert set(eager) == {"ode@0", "ode@1", "ode@2"}, eager
    assert "inductor" in anode_plan.format_report(compiled.plan) and "eager: ode@0" in anode_plan.format_report(
        compiled.plan)
    _assert_exact(got, want, "fallback")
    low = _min_budget(model, (x,))
    compiled = anode_plan.compile(model, low, (x,), backend="inductor")
    measured = step_peak(compiled, model, x, y)
    assert_budget_promise(measured.peak_bytes, compiled.plan.predicted_peak_bytes, low, "fallback at the minimum")


def test_compiled_stages_and_chains_are_cached_per_model_and_input(tmp_path):
    torch.manual_seed(0)
    model = mlp_ode(features=16, hidden=64, blocks=2, nt=4, method="rk2")
    x, y = torch.randn(64, 16), torch.randint(0, 3, (64,))
    # named planners plan the stages (the default planner may run a whole-model unit: tests/test_units.py)
    first = anode_plan.compile(model, 2**30, (x,), backend="inductor", planner="store-all")
    assert first.plan.compile_seconds > 0 and first.plan.backend == "inductor" and first.plan.unit is None
    low = _min_budget(model, (x,), planner="chain-dp")
    again = anode_plan.compile(model, low, (x,), backend="inductor", planner="chain-dp")
    assert again.plan.compile_seconds == 0, "the same model's stages were compiled already"
    assert again.plan.chain is first.plan.chain, "the same model and inputs: the measured chain is reused"
    assert again.compiled_stages is first.compiled_stages
    assert "the stages were compiled already" in anode_plan.format_report(again.plan)
    # a larger batch plans again under the same budget, on stages measured (and compiled) for it
    big = torch.randn(96, 16)
    budget = _min_budget(model, (big,))
    compiled = anode_plan.compile(model, budget, (x,), backend="inductor")
    measured = step_peak(compiled, model, big, torch.randint(0, 3, (96,)))
    assert len(compiled.plans) == 2 and compiled.plan.backend == "inductor"
    assert_budget_promise(measured.peak_bytes, compiled.plan.predicted_peak_bytes, budget, "a larger batch")
    # the plan file records the backend, and a reuse runs it
    path = tmp_path / "plan.json"
    anode_plan.save_plan(again.plan, path)
    assert anode_plan.load_plan(path).backend == "inductor"
    reused = anode_plan.compile(model, plan=path, example_inputs=(x,))
    assert reused.plan.backend == "inductor" and reused.plan.compile_seconds == 0
    assert reused.runner.compiled is not None
    measured = step_peak(reused, model, x, y)
    assert_budget_promise(measured.peak_bytes, reused.plan.predicted_peak_bytes, low, "the reused plan")


def test_a_smaller_batch_is_planned_and_compiled_for_itself():
    """Compiled code is measured for one shape: a smaller batch gets its own plan, not the larger one's."""
    torch.manual_seed(0)
    model = mlp_ode(features=8, hidden=32, blocks=1, nt=3, method="rk2")
    x = torch.randn(32, 8)
    budget = _min_budget(model, (x,))
    compiled = anode_plan.compile(model, budget, (x,), backend="inductor")
    small, y = torch.randn(20, 8), torch.randint(0, 3, (20,))
    measured = step_peak(compiled, model, small, y)
    assert [p.input_shapes for p in compiled.plans] == [((32, 8),), ((20, 8),)]
    assert_budget_promise(measured.peak_bytes, compiled.plan.predicted_peak_bytes, budget, "a smaller batch")


def test_a_replaced_layer_gets_stages_of_its_own():
    """Compiled layer groups hold the model's modules: after a head is replaced, a new compile compiles anew."""
    torch.manual_seed(0)
    model = mlp_ode(features=8, hidden=16, blocks=1, nt=2)
    x, y = torch.randn(6, 8), torch.randint(0, 3, (6,))
    first = anode_plan.compile(model, 2**30, (x,), backend="inductor")
    model.head = nn.Linear(16, 3)
    again = anode_plan.compile(model, 2**30, (x,), backend="inductor")
    assert again.compiled_stages is not first.compiled_stages
    F.cross_entropy(again(x), y).backward()
    assert model.head.weight.grad is not None, "the new head must be the one trained"


def test_dropout_is_replayed_in_compiled_re_runs():
    """A re-run replays the RNG: at a budget that recomputes, the gradients are those of store-all, same seed."""
    torch.manual_seed(0)
    model = mlp_ode(features=6, hidden=8, blocks=2, nt=3, method="rk2", dropout=0.3).double()
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
    grads = []
    for budget in (_store_all_budget(model, (x,)), _min_budget(model, (x,))):
        torch.manual_seed(1)
        compiled, found = _compiled_step(model, budget, x, y)
        grads.append(found[2])
    assert compiled.plan.simulation.recomputed_forwards > 0
    for name, grad in grads[0].items():
        assert _relative(grads[1][name], grad) <= EXACT_RELATIVE, name


def test_an_eager_plan_stays_eager():
    torch.manual_seed(0)
    model = mlp_ode(features=4, hidden=8, blocks=1, nt=2)
    compiled = anode_plan.compile(model, 2**30, (torch.randn(3, 4),))
    assert compiled.plan.backend == "eager" and compiled.runner.compiled is None
    assert "backend      eager" in anode_plan.format_report(compiled.plan)


@pytest.mark.parametrize("kwargs, match", [
    ({"backend": "tvm"}, r"backend='tvm'.*'eager'.*'inductor'"),
    ({"backend": "inductor", "approximate": anode_plan.XConv(probes=4)}, r"XConv.*backend='eager'"),
    ({"backend": "inductor", "calibrate": False}, r"calibrate=False.*measured"),
])
def test_bad_backend_options_are_refused(kwargs, match):
    model = mlp_ode(features=4, hidden=8, blocks=1, nt=2)
    with pytest.raises(anode_plan.BackendSpecError, match=match):
        anode_plan.compile(model, 2**30, (torch.randn(3, 4),), **kwargs)
