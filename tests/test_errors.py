"""Every bad input gets a specific error that says what, with the numbers, and the fix; nothing is silently wrong."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from torch import nn

import anode_plan
from anode_plan.budget import PREDICTION_RESERVE
import planners
from anode_plan import ODEBlock
from models import mlp_ode


def _mlp():
    return mlp_ode(features=6, hidden=8, blocks=2, nt=3).double()


def _x(batch=5, features=6):
    return torch.randn(batch, features, dtype=torch.float64)


class _Tanh(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, t, z):
        return torch.tanh(self.lin(z))


class _Net(nn.Module):
    """embed -> [middle] -> ODE block -> head, with hooks for the misbehaviour under test."""

    def __init__(self, func: nn.Module | None = None, middle: nn.Module | None = None, nt: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.middle = middle if middle is not None else nn.Identity()
        self.ode = ODEBlock(func if func is not None else _Tanh(), nt=nt)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.ode(self.middle(self.embed(x))))


# --- budgets -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("budget, fragment", [
    ("", "not a number followed by a unit"),
    ("GB", "not a number followed by a unit"),
    ("1.5.3GB", "not a number followed by a unit"),
    ("-5MB", "not a number followed by a unit"),
    ("12 Mb", "reads as bits"),
    ("4 parsecs", "unknown unit 'parsecs'"),
    ("0.5B", "at least 1 byte"),
    (0, "must be positive"),
    (-(2**20), "must be positive"),
    (True, "is not a budget"),
    (None, "is not a budget"),
    (float("nan"), "finite and at least 1"),
    (float("inf"), "finite and at least 1"),
    (0.0, "finite and at least 1"),
    (-1e6, "finite and at least 1"),
    (0.5, "finite and at least 1"),
    ([10**9], "is not a budget"),
])
def test_bad_budget_raises_budget_format_error_with_the_accepted_forms(budget, fragment):
    with pytest.raises(anode_plan.BudgetFormatError, match=fragment) as info:
        anode_plan.compile(_mlp(), budget, (_x(),))
    assert "4GB" in str(info.value) or "byte" in str(info.value)


def test_a_finite_float_budget_is_bytes_rounded_down():
    """``0.8 * torch.cuda.get_device_properties(0).total_memory`` is how budgets are written."""
    model, x = _mlp(), _x()
    assert anode_plan.parse_memory_budget(3.5e9) == 3_500_000_000
    assert anode_plan.parse_memory_budget(0.8 * 1000.9) == 800
    compiled = anode_plan.compile(model, 1e9 + 0.75, (x,))
    assert compiled.plan.budget_bytes == 10**9


def test_budget_below_minimum_names_the_minimum_its_parts_and_the_fix():
    model, x = _mlp(), _x()
    with pytest.raises(anode_plan.InfeasibleBudgetError) as info:
        anode_plan.compile(model, "1KB", (x,))
    error = info.value
    message = str(error)
    assert error.budget_bytes == 1000 and error.min_budget_bytes > 1000
    assert "memory_budget='1KB'" in message and "Give at least" in message and "MLPODE (batch 5)" in message
    peak = sum(error.breakdown.values())  # the smallest schedule's peak, part by part
    assert peak < error.min_budget_bytes <= int(peak / (1 - PREDICTION_RESERVE)) + 1  # with the reserve kept free
    assert f"Give at least {error.min_budget_bytes} bytes" in str(error)
    anode_plan.compile(model, error.min_budget_bytes, (x,))  # the minimum itself fits
    with pytest.raises(anode_plan.InfeasibleBudgetError):
        anode_plan.compile(model, error.min_budget_bytes - 1, (x,))


# --- models the planner sees as plain graphs -----------------------------------------------------------------------

class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16))

    def forward(self, x):
        return x + self.inner(x)


@pytest.mark.parametrize("kind", ["chain", "dag"])
def test_model_without_ode_blocks_is_planned_as_a_plain_graph(kind):
    torch.manual_seed(0)
    body = _Residual() if kind == "dag" else nn.Sequential(nn.Linear(16, 16), nn.ReLU())
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), body, nn.Linear(16, 3)).double()
    reference = copy.deepcopy(model)
    x = _x()
    compiled = anode_plan.compile(model, 10**9, (x,))
    assert compiled.plan.chain.blocks == () and len(compiled.plan.chain.stages) >= 1
    compiled(x).square().sum().backward()
    reference(x).square().sum().backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
    with pytest.raises(anode_plan.InfeasibleBudgetError, match="Give at least"):
        anode_plan.compile(model, 64, (x,))


# --- models fx cannot trace ----------------------------------------------------------------------------------------

class Chunked(nn.Module):
    """A loop bounded by a tensor's shape: plain fx cannot trace it; the shape-aware tracer can."""

    def forward(self, x):
        return torch.cat([torch.sin(chunk) for chunk in x.split(2, dim=1)[: x.shape[1] // 2]], dim=1)


class Gate(nn.Module):
    """Control flow on a tensor's value: neither fx nor the cost model's fake tensors can run it."""

    def forward(self, x):
        if x.sum() > 0:
            return x
        return -x


def test_a_loop_over_a_shape_traces_and_gives_plain_gradients():
    model = _Net(middle=Chunked()).double()
    reference = copy.deepcopy(model)
    compiled = anode_plan.compile(model, 10**9, (_x(),), planner=planners.Anode())
    assert compiled.traced.batch_specialised is None
    x = _x()
    compiled(x).sum().backward()
    reference(x).sum().backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)


@pytest.mark.parametrize("culprit", [Gate], ids=lambda c: c.__name__)
def test_untraceable_submodule_is_named_with_the_leaf_modules_fix(culprit):
    model = _Net(middle=culprit()).double()
    with pytest.raises(anode_plan.UntraceableModelError) as info:
        anode_plan.compile(model, 10**9, (_x(),))
    message = str(info.value)
    assert "_Net.forward" in message and f"'middle' ({culprit.__name__})" in message
    assert f"leaf_modules=[{culprit.__name__}]" in message


def test_untraceable_submodule_runs_as_a_leaf():
    model = _Net(middle=Chunked()).double()
    reference = copy.deepcopy(model)
    compiled = anode_plan.compile(model, 10**9, (_x(),), leaf_modules=[Chunked], planner=planners.Anode())
    x = _x()
    compiled(x).sum().backward()
    reference(x).sum().backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)


def test_leaf_that_branches_on_a_value_gets_the_torch_where_fix():
    with pytest.raises(anode_plan.UntraceableModelError) as info:
        anode_plan.compile(_Net(middle=Gate()).double(), 10**9, (_x(),), leaf_modules=[Gate])
    assert "stage 'middle'" in str(info.value) and "torch.where" in str(info.value)


def test_block_called_with_keyword_arguments_is_rejected():
    class KeywordCall(_Net):
        def forward(self, x):
            return self.head(self.ode(z=self.embed(x)))

    with pytest.raises(anode_plan.UntraceableModelError, match="no keyword arguments"):
        anode_plan.compile(KeywordCall().double(), 10**9, (_x(),))


# --- in-place writes into what a region recomputes from --------------------------------------------------------------

class _OverwriteAfter(_Net):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        z = self.embed(x)
        y = self.ode(z)
        if self.how == "method":
            z.relu_()
        elif self.how == "module":
            self.act(z)
        else:
            torch.nn.functional.relu(z, inplace=True)
        return self.head(y + z)


@pytest.mark.parametrize("how, what", [("method", "relu_"), ("module", "call_module act"),
                                       ("function", "relu")])
def test_inplace_write_into_a_block_input_after_the_block_is_rejected_at_compile(how, what):
    with pytest.raises(anode_plan.InPlaceModificationError) as info:
        anode_plan.compile(_OverwriteAfter(how).double(), 10**9, (_x(),))
    message = str(info.value)
    assert "'embed'" in message and "ODE block 'ode'" in message and what in message and "out-of-place" in message


class _InPlaceField(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, t, z):
        return self.lin(torch.tanh_(z))


def test_ode_function_writing_into_its_state_is_rejected_when_it_would_be_recomputed():
    model = _Net(func=_InPlaceField()).double()
    x = _x()
    with pytest.raises(anode_plan.InPlaceModificationError) as info:
        anode_plan.compile(model, 10**9, (x,), planner=planners.Anode())(x)
    assert "wrote into its input 'middle' in place" in str(info.value) and "z = z.relu()" in str(info.value)
    # Without recompute the write is plain PyTorch's business, and the result is the uncompiled model's.
    reference = copy.deepcopy(model)
    store_all = anode_plan.compile(model, 10**9, (x,), planner=planners.StoreAll())
    torch.testing.assert_close(store_all(x), reference(x), rtol=0, atol=0)


class _OverwriteThroughView(_Net):
    def forward(self, x):
        z = self.embed(x)
        y = self.ode(z)
        z.view(-1).mul_(2)  # fx sees a write into a view, not into z
        return self.head(y)


def test_write_through_a_view_after_the_block_is_caught_by_autograd_not_silent():
    model = _OverwriteThroughView().double()
    compiled = anode_plan.compile(model, 10**9, (_x(),), planner=planners.Anode())
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        compiled(_x()).sum().backward()


# --- ODE functions and blocks --------------------------------------------------------------------------------------

class _Shrinks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 4)

    def forward(self, t, z):
        return self.lin(z)


def test_ode_function_returning_the_wrong_shape_is_named_at_compile():
    model = _Net(func=_Shrinks()).double()
    with pytest.raises(anode_plan.ODEFunctionError) as info:
        anode_plan.compile(model, 10**9, (_x(),))
    assert "_Shrinks.forward(t, z) returned (5, 4) for z of shape (5, 8)" in str(info.value)
    with pytest.raises(anode_plan.ODEFunctionError, match="returned"):
        model(_x())  # the uncompiled model says the same


@pytest.mark.parametrize("how", ["torch.compile(func)", "func.compile()", "torch.compile(model)"])
def test_modules_compiled_with_torch_compile_are_refused_by_name(how):
    """Nothing is compiled here (torch.compile is lazy): the check reads the module tree only."""
    func = _Tanh()
    if how == "torch.compile(func)":
        model = _Net(func=torch.compile(func))
    elif how == "func.compile()":
        func.compile()
        model = _Net(func=func)
    else:
        model = torch.compile(_Net(func=func))
    with pytest.raises(anode_plan.CompiledModuleError) as info:
        anode_plan.compile(model, 10**9, (_x().float(),))
    message = str(info.value)
    assert ("'ode.func'" in message) if how != "torch.compile(model)" else ("the model" in message)
    assert "before torch.compile" in message and "over its budget" in message


class _DropsVelocity(nn.Module):
    def forward(self, t, z):
        return z[0]


def test_tuple_state_function_returning_one_tensor_is_named():
    block = ODEBlock(_DropsVelocity(), nt=2)
    z = (torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(anode_plan.ODEFunctionError, match=r"returned \(2, 3\) for z of shape a tuple of 2"):
        block(z)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"nt": 0}, "nt=0"), ({"nt": -2}, "positive int"), ({"nt": 2.5}, "positive int"), ({"nt": True}, "positive int"),
    ({"method": "rk3"}, "not a known method; use one of"), ({"method": "dopri5"}, "leave nt out"), ({"method": "rk45"}, "'dopri5', 'bosh3', 'tsit5'"),
    ({"t_span": (1.0, 1.0)}, "two different finite times"), ({"t_span": (0.0, math.inf)}, "finite"),
    ({"func": lambda t, z: z}, "must be an nn.Module"),
])
def test_bad_ode_block_settings(kwargs, fragment):
    settings = {"func": _Tanh(), "nt": 4, **kwargs}
    with pytest.raises(anode_plan.ODEBlockConfigError, match=fragment):
        ODEBlock(**settings)


def test_integer_state_is_rejected():
    with pytest.raises(anode_plan.ODEFunctionError, match="floating-point"):
        ODEBlock(_Tanh(), nt=2)(torch.ones(2, 8, dtype=torch.long))


class _Explodes(nn.Module):
    def forward(self, t, z):
        return z * 1e200


def _exploding_net(check_finite: bool) -> nn.Module:
    model = _Net(func=_Explodes(), nt=4).double()
    model.ode.check_finite = check_finite
    return model


@pytest.mark.parametrize("compiled", [False, True])
def test_check_finite_names_the_step_where_the_state_blew_up(compiled):
    model = _exploding_net(check_finite=True)
    x = _x()
    net = anode_plan.compile(model, 10**9, (x,), planner=planners.Anode()) if compiled else model
    with pytest.raises(anode_plan.NonFiniteStateError) as info:
        net(x).sum().backward()
    message = str(info.value)
    assert "step 1 (t = 0.25 -> 0.5)" in message and "of 40" in message and "this step diverged" in message
    assert "check_finite=False" in message
    x[0, 0] = math.nan
    with pytest.raises(anode_plan.NonFiniteStateError, match="input already had 8 non-finite entries"):
        net(x)


def test_without_check_finite_nan_flows_through_and_nothing_hangs():
    model = _exploding_net(check_finite=False)
    compiled = anode_plan.compile(model, 10**9, (_x(),), planner=planners.Revolve(snapshots=1))
    out = compiled(_x())
    out.sum().backward()
    assert not torch.isfinite(out).all()


# --- example inputs and call inputs --------------------------------------------------------------------------------

@pytest.mark.parametrize("example_inputs, fragment", [
    (None, "non-empty tuple of the arguments of MLPODE.forward"),
    ((), "non-empty tuple"),
    ("tensor", "e.g. example_inputs=\\(x,\\), got Tensor"),
    ("two", "do not match MLPODE.forward.*too many positional arguments"),
    ((3,), "example_inputs\\[0\\] is a int"),
])
def test_bad_example_inputs(example_inputs, fragment):
    x = _x()
    example_inputs = {"tensor": x, "two": (x, x)}.get(example_inputs, example_inputs) \
        if isinstance(example_inputs, str) else example_inputs
    with pytest.raises(anode_plan.ExampleInputsError, match=fragment):
        anode_plan.compile(_mlp(), 10**9, example_inputs)


@pytest.mark.parametrize("case, needs, got, cause", [
    ("channels", r"it needs a 4-d input \(N, 3, H, W\) of torch.float32: in_channels=3", r"\[2, 1, 8, 8\] \(torch.float32\)",
     "expected input.*to have 3 channels"),
    ("dtype", r"it needs a 4-d input \(N, 3, H, W\) of torch.float32", r"\[2, 3, 8, 8\] \(torch.float64\)",
     "input dtype torch.float64 and parameter dtype torch.float32 differ"),
])
def test_an_example_that_does_not_fit_a_layer_names_the_layer_its_line_and_what_it_needs(case, needs, got, cause):
    """A 1-channel batch for a 3-channel stem, float64 inputs for float32 weights: the first layer that cannot run
    them, the line of forward that calls it, what it got and needs, PyTorch's error chained, and a short traceback."""
    import traceback

    from models import ode_resnet
    model = ode_resnet(width=4, stages=1, nt=1)
    x = torch.randn(2, 1, 8, 8) if case == "channels" else torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with pytest.raises(anode_plan.ExampleInputsError) as info:
        anode_plan.compile(model, 10**9, (x,))
    message = str(info.value)
    assert "layer 'stem.0' (Conv2d(3, 4" in message and "models/odenet.py:" in message
    assert re.search(needs, message) and re.search(f"got {got}", message) and re.search(cause, message)
    assert re.search(cause, str(info.value.__cause__))
    assert len(traceback.format_exception(info.value)) < 30  # not the fake-tensor machinery's 100 lines


def test_an_example_with_too_few_features_for_a_linear_layer():
    with pytest.raises(anode_plan.ExampleInputsError, match=r"in_features=6 of torch.float64.*got \[5, 4\]"):
        anode_plan.compile(_mlp(), 10**9, (_x(features=4),))


def test_missing_example_inputs():
    with pytest.raises(anode_plan.ExampleInputsError, match="non-empty tuple"):
        anode_plan.compile(_mlp(), 10**9)


def test_calls_that_do_not_fit_the_forward_signature():
    compiled = anode_plan.compile(_mlp(), 10**9, (_x(),))
    with pytest.raises(anode_plan.InputMismatchError, match="compiled for 1 inputs, got 2"):
        compiled(_x(), _x())
    with pytest.raises(anode_plan.InputMismatchError, match="input 0 is a list, not a tensor"):
        compiled([1.0, 2.0])
    with pytest.raises(anode_plan.InputMismatchError) as info:
        compiled(_x(features=7))
    assert "[(5, 6)]" in str(info.value) and "[(5, 7)]" in str(info.value) and "shaped like example_inputs" in \
        str(info.value)
