"""The budget as the allocator counts it: kernel workspaces are calibrated, charged and named.

Every check here measures a real training step with ``anode_plan.measure_peak_memory``
(the CPU allocator's own events) and holds it to :func:`promise.assert_budget_promise`.
The models are those of the issue that found the gap: two ODE-ResNets, and an MNIST
ODE-net written as torchdiffeq's ``examples/odenet_mnist.py`` writes it, whose peak sits
in the backward of a full-resolution convolution (two buffers the size of its
activation, allocated inside ``convolution_backward``).
"""

from __future__ import annotations

import copy

import re

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import anode_plan
import planners
from anode_plan.measure.calibrate import UNCALIBRATED_MARGIN
import published
from models import ode_resnet
from published import ODEfunc
from promise import assert_budget_promise


def mnist_odenet():
    """torchdiffeq's MNIST ODE-net as published, its solver swapped for ``ODEBlock(..., nt=4, method="rk4")``."""
    torch.manual_seed(0)
    return published.odenet_mnist(nt=4, method="rk4")


MODELS = {
    "mnist-odenet": (mnist_odenet, (32, 1, 28, 28)),
    "resnet-batch-euler8": (lambda: ode_resnet(width=16, stages=2, nt=8, method="euler", norm="batch"),
                            (16, 3, 32, 32)),
    "resnet-group-rk2x6": (lambda: ode_resnet(width=16, stages=3, nt=6, method="rk2", norm="group"),
                           (16, 3, 32, 32)),
}


def _step_peak(compiled, model, x, y):
    compiled(x)  # warm-up: lazily created state must not count
    model.zero_grad(set_to_none=True)
    outputs = []
    measured = anode_plan.measure_peak_memory(
        lambda: outputs.append(compiled(x)) or F.cross_entropy(outputs[-1], y).backward())
    model.zero_grad(set_to_none=True)
    return measured


def _min_budget(chain, traced, x):
    """The smallest budget ``compile`` accepts for ``chain`` (the smallest schedule's peak and the reserve)."""
    with pytest.raises(planners.InfeasibleBudgetError) as info:
        anode_plan.plan_for_budget(chain, traced, (x,), 1)
    return info.value.min_budget_bytes


@pytest.fixture(scope="module")
def measured():
    """``measured(name, calibrate)``: the model of ``MODELS``, an input batch, labels, its trace and its chain, each
    built and measured once in the module (the tests plan on them and only read them)."""
    found = {}

    def get(name, calibrate=True):
        if name not in found:
            build, shape = MODELS[name]
            model = build()
            x = torch.randn(*shape)
            y = torch.randint(0, 10, (shape[0],))
            found[name] = model, x, y, anode_plan.trace_model(model, (x,)), {}
        model, x, y, traced, chains = found[name]
        if calibrate not in chains:
            chains[calibrate] = anode_plan.lower_to_chain(model, traced, (x,), calibrate=calibrate)
        return model, x, y, traced, chains[calibrate]
    return get


@pytest.fixture(scope="module", params=list(MODELS))
def lowered(request, measured):
    return request.param, *measured(request.param)


def test_allocator_peak_within_budget_from_the_minimum_to_store_all(lowered):
    name, model, x, y, traced, chain = lowered
    store_all = planners.simulate_plan(chain, planners.StoreAll().plan(chain, budget_bytes=1 << 60)).peak_bytes
    minimum = _min_budget(chain, traced, x)
    for budget in (minimum, (minimum + store_all) // 2, store_all // 2, store_all):
        if budget < minimum:
            continue
        plan = anode_plan.plan_for_budget(chain, traced, (x,), budget)
        measured = _step_peak(anode_plan.CompiledModel(model, traced, plan), model, x, y)
        assert_budget_promise(measured.peak_bytes, plan.predicted_peak_bytes, budget,
                              (name, budget, plan.schedule.description, measured.kernel))


@pytest.fixture(scope="module")
def mnist(measured):
    """The MNIST ODE-net at batch 32, traced, and its chain lowered with and without calibration."""
    model, x, _, traced, chain = measured("mnist-odenet")
    return model, x, traced, {True: chain, False: measured("mnist-odenet", calibrate=False)[4]}


def test_the_mnist_peak_is_a_convolution_backward_workspace(mnist):
    """The stem's backward allocates buffers inside the kernel, which calibration finds and the plan charges where
    they occur. Their size is the CPU's kernel family's: with oneDNN's AVX2 and AVX-512 kernels two buffers the
    size of the stem's activation (5.3 MiB each here), under SSE4.1 33 KB; so what is asserted follows from it."""
    model, x, traced, chains = mnist
    chain = chains[True]
    activation = 32 * 64 * 26 * 26 * 4
    stem = chain.stages[0]
    assert stem.workspace_kernels[3].startswith("aten::convolution_backward")
    assert stem.workspace_kernels[0].startswith("aten::conv2d")
    assert stem.bwd_workspace_bytes > 0
    half = planners.simulate_plan(chain, planners.StoreAll().plan(chain, budget_bytes=1 << 60)).peak_bytes // 2
    plan = anode_plan.plan_for_budget(chain, traced, (x,), half)
    measured = _step_peak(anode_plan.CompiledModel(model, traced, plan), model, x, torch.randint(0, 10, (32,)))
    if stem.bwd_workspace_bytes >= activation:  # oneDNN's AVX2 / AVX-512 convolution backward: the step's peak
        assert plan.simulation.breakdown()["workspace"] >= activation
        assert plan.simulation.peak_kernel.startswith("aten::convolution_backward")
        assert measured.kernel.startswith("aten::convolution_backward")
    if plan.simulation.peak_kernel:  # a workspace in the predicted peak is the kernel the allocator saw peak
        assert measured.kernel.startswith(plan.simulation.peak_kernel.split(" ")[0])
    assert_budget_promise(measured.peak_bytes, plan.predicted_peak_bytes, half, "mnist at half of store-all")


def test_a_budget_between_the_peaks_without_and_with_workspaces_names_the_kernel(mnist):
    model, x, traced, chains = mnist
    without = _min_budget(chains[False], traced, x)
    with_workspaces = _min_budget(chains[True], traced, x)
    assert with_workspaces > without
    budget = (without + with_workspaces) // 2
    with pytest.raises(anode_plan.InfeasibleBudgetError) as info:
        anode_plan.compile(model, budget, (x,))
    error = info.value
    assert error.min_budget_bytes == with_workspaces
    message = str(error)
    assert str(with_workspaces) in message
    if error.breakdown["workspace"] > 0:  # the smallest schedule peaks inside a kernel: the message names it
        assert re.search(r"the workspace [\d.]+ \w+ is what aten::\w+( \(aten::\w+\))? allocates inside itself", message), message
    if error.breakdown["workspace"] >= 32 * 64 * 26 * 26 * 4:  # oneDNN's AVX2 / AVX-512 convolution backward
        assert "aten::convolution_backward" in message


def test_a_plan_saved_without_workspaces_is_rechecked_and_refused(tmp_path, mnist):
    """A plan file made before calibration existed fits its old numbers, not the allocator's."""
    model, x, traced, chains = mnist
    old_chain = chains[False]
    budget = _min_budget(old_chain, traced, x)
    old_plan = anode_plan.plan_for_budget(old_chain, traced, (x,), budget)
    path = tmp_path / "old-plan.yaml"
    anode_plan.save_plan(old_plan, path)
    anode_plan.load_plan(path)  # consistent with itself
    with pytest.raises(anode_plan.PlanOverBudgetError) as info:
        anode_plan.compile(model, plan=path)
    assert info.value.budget_bytes == budget
    assert info.value.peak_bytes > budget
    assert "aten::convolution_backward" in str(info.value) and str(info.value.peak_bytes) in str(info.value)


def test_without_calibration_a_stated_margin_is_kept_free():
    model, x = mnist_odenet(), torch.randn(32, 1, 28, 28)
    y = torch.randint(0, 10, (32,))
    budget = 30 * 2**20
    compiled = anode_plan.compile(model, budget, (x,), calibrate=False)
    plan = compiled.plan
    assert plan.workspace_margin == UNCALIBRATED_MARGIN
    assert plan.predicted_peak_bytes <= budget * (1 - UNCALIBRATED_MARGIN)
    assert all(stage.bwd_workspace_bytes == 0 for stage in plan.chain.stages)
    assert _step_peak(compiled, model, x, y).peak_bytes <= budget
    compiled(torch.randn(16, 1, 28, 28))  # a smaller batch reuses the plan
    with pytest.raises(anode_plan.InfeasibleBudgetError, match="calibration was skipped"):
        anode_plan.compile(model, 2 * 2**20, (x,), calibrate=False)


def test_calibration_leaves_the_model_and_the_rng_as_they_were():
    """BatchNorm statistics, the RNG, ``.grad`` and a Python-side counter in the ODE function."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Dropout(0.2),
                          anode_plan.ODEBlock(ODEfunc(8), nt=3, method="rk2"), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    x = torch.randn(4, 1, 6, 6)
    before = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    traced = anode_plan.trace_model(model, (x,))
    chain = anode_plan.lower_to_chain(model, traced, (x,))
    assert any(stage.bwd_workspace_bytes for stage in chain.stages)  # calibration ran
    assert torch.equal(torch.get_rng_state(), rng)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in model.parameters())
    assert model[3].func.nfe == 0


@pytest.mark.gpu
@pytest.mark.parametrize("benchmark", [False, True], ids=["cudnn-default", "cudnn-benchmark"])
def test_cuda_calibration_under_the_cudnn_settings_of_the_run(benchmark):
    """cuDNN's workspaces come from the caching allocator and count in ``max_memory_allocated``;
    ``cudnn.benchmark`` picks other algorithms, so the plan is calibrated under the setting the run uses,
    and a changed setting plans again."""
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = benchmark
    try:
        model = mnist_odenet().cuda()
        x = torch.randn(32, 1, 28, 28, device="cuda")
        y = torch.randint(0, 10, (32,), device="cuda")
        traced = anode_plan.trace_model(model, (x,))
        chain = anode_plan.lower_to_chain(model, traced, (x,))
        store_all = planners.simulate_plan(chain, planners.StoreAll().plan(chain, budget_bytes=1 << 60)).peak_bytes
        for budget in (_min_budget(chain, traced, x), store_all // 2, store_all):
            compiled = anode_plan.compile(model, budget, (x,))
            F.cross_entropy(compiled(x), y).backward()  # warm-up: cuDNN picks (and with benchmark, times) algorithms
            model.zero_grad(set_to_none=True)
            outputs = []
            measured = anode_plan.measure_peak_memory(
                lambda: outputs.append(compiled(x)) or F.cross_entropy(outputs[-1], y).backward(), device="cuda")
            model.zero_grad(set_to_none=True)
            assert_budget_promise(measured.peak_bytes, compiled.plan.predicted_peak_bytes, budget,
                                  (benchmark, compiled.plan.schedule.description))
        torch.backends.cudnn.benchmark = not benchmark
        compiled(x)
        assert len(compiled.plans) == 2
    finally:
        torch.backends.cudnn.benchmark = previous
