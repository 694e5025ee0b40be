"""Models as users write them compile with nothing changed but their ODE solver.

The published models (``published.py``: torchdiffeq's MNIST ODE-net, ANODE's
ODE-ResNet-18) compile without ``leaf_modules`` or edits; their float64 gradients equal
plain autograd's, their BatchNorm statistics and ``nfe`` counters move as in the
uncompiled model, and the allocator's peak keeps the budget. Shape-only Python in
``forward`` (``.item()`` of a shape product, ``x.size(0)`` arithmetic, ``len``, loops
over a shape) traces; control flow on a tensor's *value* still gets its specific error.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import anode_plan
import planners
import published
from promise import assert_budget_promise, step_peak


def _exact_gradients(model, budget, x, y, *, planner=None):
    """Compile a float64 ``model`` under ``budget``; assert loss and gradients equal the plain model's."""
    reference = copy.deepcopy(model)
    compiled = anode_plan.compile(model, budget, (x,), planner=planner)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    loss = F.cross_entropy(compiled(x1), y)
    loss.backward()
    expected = F.cross_entropy(reference(x2), y)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-10, atol=1e-14)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-14, msg=name)
    for (name, a), b in zip(model.named_buffers(), reference.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0, msg=name)
    return compiled, reference


def _min_budget(model, x):
    """The smallest budget ``compile(model, budget, (x,))`` accepts: its answer to a budget of 1 byte, found on the
    chain it measures (the rest of ``compile``, timing whole steps, changes no byte of it)."""
    traced = anode_plan.trace_model(model, (x,))
    with pytest.raises(anode_plan.InfeasibleBudgetError) as info:
        anode_plan.plan_for_budget(anode_plan.lower_to_chain(model, traced, (x,)), traced, (x,), 1)
    return info.value.min_budget_bytes


@pytest.mark.parametrize("downsampling", ["conv", "res"])
def test_torchdiffeq_odenet_mnist_compiles_as_written(downsampling):
    torch.manual_seed(0)
    model = published.odenet_mnist(nt=6, method="rk4", downsampling_method=downsampling).double()
    x, y = torch.randn(4, 1, 28, 28, dtype=torch.float64), torch.randint(0, 10, (4,))
    budget = int(_min_budget(model, x) * 1.05)
    compiled, reference = _exact_gradients(model, budget, x, y)
    assert compiled.plan.simulation.recomputed_forwards > 0
    assert compiled.traced.batch_specialised is None  # Flatten's .item() reads channels and pixels, not the batch
    flatten = next(stage for stage in compiled.traced.stages if "view" in stage.nodes)
    assert "view" in flatten.nodes  # the published Flatten traced into a view, not an opaque leaf
    # The counter in f counts every evaluation, the recomputed ones too (the README says so).
    nfe, plain_nfe = model[-6].func.nfe, reference[-6].func.nfe
    assert plain_nfe == 6 * 4 and nfe > plain_nfe
    compiled(x[:3])  # a smaller batch runs the same graph


def test_torchdiffeq_odenet_mnist_keeps_the_allocator_budget():
    torch.manual_seed(0)
    model = published.odenet_mnist(nt=6, method="rk4")
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    traced = anode_plan.trace_model(model, (x,))
    chain = anode_plan.lower_to_chain(model, traced, (x,))
    store_all = planners.simulate_plan(chain, planners.StoreAll().plan(chain, budget_bytes=1 << 60)).peak_bytes
    for budget in (store_all // 2, store_all):
        plan = anode_plan.plan_for_budget(chain, traced, (x,), budget)
        measured = step_peak(anode_plan.CompiledModel(model, traced, plan), model, x, y)
        assert_budget_promise(measured.peak_bytes, plan.predicted_peak_bytes, budget, (budget, measured.kernel))


def test_anode_resnet18_with_ode_blocks_inside_sequentials():
    """ANODE's ODE-ResNet-18: BasicBlocks (``out += shortcut``) and ODE blocks, each in an ``nn.Sequential``."""
    torch.manual_seed(0)
    model = published.ResNet18(published.anode_block(nt=2, method="rk2")).double()
    x, y = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (2,))
    compiled, _ = _exact_gradients(model, 10**10, x, y, planner=planners.Anode(snapshots=1))
    blocks = [block.target for block in compiled.traced.blocks]
    assert blocks == ["layer1_2.0", "layer2_2.0", "layer3_2.0", "layer4_2.0"]
    targets = {getattr(node.target, "__name__", node.target) for node in compiled.traced.graph.nodes}
    assert "iadd" in targets  # out += shortcut runs in place, as written
    assert compiled.plan.simulation.recomputed_forwards > 0


def test_anode_resnet18_keeps_the_allocator_budget():
    torch.manual_seed(0)
    model = published.ResNet18(published.anode_block(nt=2, method="rk2"))
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    budget = int(_min_budget(model, x) * 1.1)
    compiled = anode_plan.compile(model, budget, (x,))
    measured = step_peak(compiled, model, x, y)
    assert_budget_promise(measured.peak_bytes, compiled.plan.predicted_peak_bytes, budget, measured.kernel)


class _Head(nn.Module):
    """Sizes read in Python: ``x.size(0)`` arithmetic, ``len``, a loop over a shape, a slice of ``x.shape``."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        if self.how == "size":
            flat = x.view(x.size(0), -1)
        elif self.how == "arithmetic":
            flat = x.reshape(x.size(0) * 2, -1).reshape(x.shape[0], x.numel() // x.size(0))
        elif self.how == "len":
            flat = x.view(len(x), -1)
        elif self.how == "constant":  # a tensor made in forward: fx keeps it on the root, once per trace
            flat = (x * torch.tensor(0.5, dtype=torch.float64)).view(x.size(0), -1)
        else:  # a loop bounded by the channel count, and a shape tuple built in Python
            channels = [x[:, c] for c in range(x.shape[1])]
            flat = torch.stack(channels, 1).reshape(x.shape[:1] + (-1,))
        return self.fc(flat)


class _Field(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, t, z):
        return torch.tanh(self.conv(z))


def _net(how):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1),
                         nn.Sequential(anode_plan.ODEBlock(_Field(), nt=3, method="rk2"), nn.ReLU()),
                         _Head(how)).double()


@pytest.mark.parametrize("how", ["size", "arithmetic", "loop", "constant"])
def test_sizes_read_in_python_keep_the_graph_general_in_the_batch(how):
    model = _net(how)
    x, y = torch.randn(4, 2, 4, 4, dtype=torch.float64), torch.randint(0, 3, (4,))
    compiled, reference = _exact_gradients(model, 10**9, x, y, planner=planners.Anode(snapshots=1))
    assert compiled.traced.batch_specialised is None
    if how == "constant":  # the second trace, at another batch, left none of its own behind
        assert [name for name in vars(model) if name.startswith("_tensor_constant")] == ["_tensor_constant0"]
    small = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(compiled(small), reference(small), rtol=1e-12, atol=0)


def test_a_graph_that_holds_for_one_batch_size_says_so():
    """``len(x)`` is a plain number to Python: the graph is specialised to the batch, and a call with another
    batch is refused with where and how to fix it, rather than run wrong."""
    model = _net("len")
    x, y = torch.randn(4, 2, 4, 4, dtype=torch.float64), torch.randint(0, 3, (4,))
    compiled, _ = _exact_gradients(model, 10**9, x, y)
    assert "view" in compiled.traced.batch_specialised and "test_capture.py" in compiled.traced.batch_specialised
    with pytest.raises(anode_plan.InputMismatchError) as info:
        compiled(torch.randn(3, 2, 4, 4, dtype=torch.float64))
    message = str(info.value)
    assert "batch 4 only" in message and "batch 3" in message and "x.size(0)" in message


class _Branch(nn.Module):
    def forward(self, x):
        if x.mean() > 0:  # a tensor's value: no trace can know it
            return x
        return -x


def test_control_flow_on_a_value_still_gets_its_error():
    model = nn.Sequential(nn.Linear(3, 3), _Branch(), nn.Linear(3, 2)).double()
    with pytest.raises(anode_plan.UntraceableModelError) as info:
        anode_plan.compile(model, 10**9, (torch.randn(2, 3, dtype=torch.float64),))
    assert "'1' (_Branch)" in str(info.value) and "control flow" in str(info.value)


class _OverwritesSaved(nn.Module):
    def forward(self, x):
        y = torch.sigmoid(x)  # sigmoid's backward reads its output
        y.mul_(2)
        return y


def test_an_in_place_write_into_a_saved_tensor_is_refused_as_plain_autograd_would():
    model = nn.Sequential(nn.Linear(3, 3), _OverwritesSaved(), nn.Linear(3, 2)).double()
    x = torch.randn(2, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        model(x).sum().backward()
    with pytest.raises(anode_plan.InPlaceModificationError) as info:
        anode_plan.compile(model, 10**9, (x,))
    assert "out of place" in str(info.value) and "[2, 3]" in str(info.value)


def test_anode_squeezenext_as_published_is_refused_as_plain_autograd_refuses_it():
    """SqueezeNext's block writes ``output += relu(shortcut)`` into a ReLU output that ReLU's backward reads.

    Plain autograd fails in backward; a checkpointed re-run would silently differentiate the
    overwritten value. The compiler names the line instead.
    """
    torch.manual_seed(0)
    model = published.SqNxt_23_1x(10, published.anode_block(nt=2, method="rk2")).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        model(x).sum().backward()
    with pytest.raises(anode_plan.InPlaceModificationError) as info:
        anode_plan.compile(model, 10**10, (x,))
    assert "published.py" in str(info.value) and "output += F.relu(self.shortcut(input))" in str(info.value)


@pytest.mark.parametrize("how", ["size", "arithmetic", "loop"])
def test_sizes_read_in_python_keep_the_allocator_budget(how):
    model = _net(how).float()
    x, y = torch.randn(8, 2, 4, 4), torch.randint(0, 3, (8,))
    budget = int(_min_budget(model, x) * 1.05)
    compiled = anode_plan.compile(model, budget, (x,))
    measured = step_peak(compiled, model, x, y)
    assert_budget_promise(measured.peak_bytes, compiled.plan.predicted_peak_bytes, budget, (how, measured.kernel))
