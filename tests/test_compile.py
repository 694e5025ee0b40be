"""End-to-end tests of anode_plan.compile: exact gradients, budgets kept, errors, module behaviour."""

from __future__ import annotations

import copy

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn import functional as F

import anode_plan
from anode_plan.budget import PREDICTION_RESERVE
import planners
from promise import assert_budget_promise
from anode_plan.memory import CUDA_BLOCK_BYTES, LiveStorageTracker, allocated_bytes
from models import mlp_ode, ode_resnet, unet_ode

PLANNERS = [planners.StoreAll(), planners.Anode(), planners.Anode(snapshots="auto"), planners.Anode(snapshots=1),
            planners.Revolve(), planners.Revolve(snapshots=1), planners.Landmarks()]


def _models():
    return {
        "resnet-batchnorm": (lambda: ode_resnet(width=4, stages=2, nt=3, method="rk2", norm="batch").double(),
                             (4, 3, 8, 8)),
        "resnet-groupnorm": (lambda: ode_resnet(width=4, stages=2, nt=4, method="euler", norm="group").double(),
                             (4, 3, 8, 8)),
        "mlp": (lambda: mlp_ode(features=6, hidden=8, blocks=2, nt=5, method="rk4").double(), (5, 6)),
    }


def _min_budget(model, x, planner):
    with pytest.raises(anode_plan.InfeasibleBudgetError) as info:
        anode_plan.compile(model, 1, (x,), planner=planner)
    return info.value.min_budget_bytes


def _loss(out, target):
    return F.cross_entropy(out, target)


def _grads_of(model, x, target, compiled=None):
    x = x.clone().requires_grad_()
    runner = compiled if compiled is not None else model
    loss = _loss(runner(x), target)
    loss.backward()
    return loss.detach(), x.grad, {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.fixture(scope="module")
def measured_models():
    """Per model of ``_models()``: the model, its example input and target, its trace, and its chain as ``compile``
    measures it (calibrated) for that input and for the input requiring a gradient (as the test calls it, which a
    model compiled for the first plans again for), measured once for every planner and budget of the module; and
    the model's state then, which a test puts back before each use. ``plan_for_budget`` on these chains is the
    rest of what ``compile`` and the re-plan do."""
    found = {}

    def get(model_name):
        if model_name not in found:
            build, shape = _models()[model_name]
            torch.manual_seed(0)
            x = torch.randn(*shape, dtype=torch.float64)
            target = torch.randint(0, 3, (shape[0],))
            model = build()
            traced = anode_plan.trace_model(model, (x,))
            chains = {grad: anode_plan.lower_to_chain(model, traced, (x.clone().requires_grad_(grad),))
                      for grad in (False, True)}
            found[model_name] = (model, x, target, traced, chains, copy.deepcopy(model.state_dict()))
        return found[model_name]
    return get


@pytest.mark.parametrize("model_name", list(_models()))
@pytest.mark.parametrize("planner", PLANNERS, ids=lambda p: repr(p))
def test_gradients_equal_plain_autograd_at_every_budget(model_name, planner, measured_models):
    """Five budgets from the planner's minimum to above the store-all peak. The smallest is compiled by ``compile``
    from scratch (traced and measured, and measured again for the input that requires a gradient); the others are
    planned on the module's one measurement of the model (``plan_for_budget``), the plan that runs made for the
    input as it is called."""
    build = _models()[model_name][0]
    model, x, target, traced, chains, state = measured_models(model_name)
    with pytest.raises(anode_plan.InfeasibleBudgetError) as info:
        anode_plan.plan_for_budget(chains[False], traced, (x,), 1, planner)
    low = info.value.min_budget_bytes
    high = anode_plan.plan_for_budget(chains[False], traced, (x,), 10**12, planners.StoreAll()).predicted_peak_bytes
    high = max(int(high * 1.2), low + 5)
    budgets = [low + (high - low) * k // 4 for k in range(5)]
    assert len(set(budgets)) >= 5
    reference_model = build()
    ref_loss, ref_dx, ref_grads = _grads_of(reference_model, x, target)
    for budget in budgets:
        model.load_state_dict(state)  # as built: the previous budget's step moved its BatchNorm statistics
        model.zero_grad(set_to_none=True)
        if budget == low:
            compiled = anode_plan.compile(model, budget, (x,), planner=planner)
            assert compiled.plan.predicted_peak_bytes <= budget
        else:
            assert anode_plan.plan_for_budget(chains[False], traced, (x,), budget, planner).predicted_peak_bytes <= budget
            x_grad = x.clone().requires_grad_()
            compiled = anode_plan.CompiledModel(
                model, traced, anode_plan.plan_for_budget(chains[True], traced, (x_grad,), budget, planner),
                planner=planner)
        loss, dx, grads = _grads_of(model, x, target, compiled)
        assert compiled.plan.predicted_peak_bytes <= budget  # the plan that ran
        assert budget == low or len(compiled.plans) == 1  # the plan made here ran, not one made on a new measurement
        torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(dx, ref_dx, rtol=1e-10, atol=1e-12)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], rtol=1e-10, atol=1e-12, msg=f"{name} at {budget}")
        for (name, mine), theirs in zip(model.named_buffers(), reference_model.buffers()):
            torch.testing.assert_close(mine, theirs, rtol=0, atol=0, msg=f"buffer {name} at budget {budget}")


def _count_func_calls(model):
    counts = {}
    for name, module in model.named_modules():
        if isinstance(module, anode_plan.ODEBlock):
            counts[name] = 0
            module.func.register_forward_pre_hook(lambda *args, name=name: counts.__setitem__(name, counts[name] + 1))
    return counts


@pytest.mark.parametrize("snapshots", [1, 2, 3, 5])
def test_runtime_recompute_count_is_revolves_optimum(snapshots):
    nt = 12
    model = mlp_ode(features=4, hidden=4, blocks=1, nt=nt, method="rk2").double()
    x = torch.randn(3, 4, dtype=torch.float64)
    compiled = anode_plan.compile(model, 10**9, (x,), planner=planners.Revolve(snapshots=snapshots))
    counts = _count_func_calls(model)
    compiled(x).sum().backward()
    steps_run = sum(counts.values()) // model.get_submodule(compiled.plan.chain.blocks[0].name).stages_per_step
    assert steps_run - nt == planners.optimal_advances(nt, snapshots)
    block = compiled.plan.chain.blocks[0]
    assert steps_run == sum(compiled.plan.simulation.forward_counts[block.start:block.stop])


def test_runtime_forward_counts_match_simulation_for_every_landmark():
    model = ode_resnet(width=4, stages=2, nt=4, method="euler", norm="group").double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    for planner in PLANNERS[:-1]:
        compiled = anode_plan.compile(model, 10**9, (x,), planner=planner)
        counts = _count_func_calls(model)
        compiled(x).sum().backward()
        sim = compiled.plan.simulation
        for block in compiled.plan.chain.blocks:
            assert counts[block.name] == sum(sim.forward_counts[block.start:block.stop]), planner
        for module in model.modules():
            module._forward_pre_hooks.clear()


@pytest.fixture(scope="module")
def resnet32():
    torch.manual_seed(0)
    model = ode_resnet(width=8, stages=2, nt=4, method="rk2", norm="batch")
    x = torch.randn(8, 3, 16, 16)
    y = torch.randint(0, 10, (8,))
    return model, x, y


def test_measured_peak_within_budget_and_prediction_within_the_promise(resnet32):
    model, x, y = resnet32
    store_all = anode_plan.compile(model, 10**12, (x,), planner=planners.StoreAll()).plan.predicted_peak_bytes
    minimum = _min_budget(model, x, planners.Landmarks())
    budgets = sorted({minimum, *(minimum + (store_all - minimum) * k // 6 for k in range(7)), int(store_all * 1.2)})
    assert len(budgets) >= 7
    for budget in budgets:
        compiled = anode_plan.compile(model, budget, (x,))
        compiled(x)  # warm-up: lazily created state must not count
        model.zero_grad(set_to_none=True)
        measured = anode_plan.measure_peak_memory(lambda: F.cross_entropy(compiled(x), y).backward()).peak_bytes
        model.zero_grad(set_to_none=True)
        assert_budget_promise(measured, compiled.plan.predicted_peak_bytes, budget,
                              compiled.plan.schedule.description)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_measured_peak_within_budget_and_prediction_an_upper_bound():
    """The budget promise on the CUDA caching allocator (``max_memory_allocated``), which
    rounds blocks to 512 bytes and holds cuDNN workspaces the fake-tensor cost model does not see."""
    torch.manual_seed(0)
    model = ode_resnet(width=16, stages=2, nt=4, method="rk2", norm="batch").cuda()
    x = torch.randn(32, 3, 32, 32, device="cuda")
    y = torch.randint(0, 10, (32,), device="cuda")
    store_all = anode_plan.compile(model, 10**12, (x,), planner=planners.StoreAll()).plan.predicted_peak_bytes
    minimum = _min_budget(model, x, planners.Landmarks())
    for budget in sorted({minimum, *(minimum + (store_all - minimum) * k // 4 for k in range(5))}):
        compiled = anode_plan.compile(model, budget, (x,))
        F.cross_entropy(compiled(x), y).backward()  # warm-up: cuDNN picks its algorithms
        model.zero_grad(set_to_none=True)
        outputs = []
        measured = anode_plan.measure_peak_memory(
            lambda: outputs.append(compiled(x)) or F.cross_entropy(outputs[-1], y).backward(), device="cuda").peak_bytes
        model.zero_grad(set_to_none=True)
        assert_budget_promise(measured, compiled.plan.predicted_peak_bytes, budget,
                              compiled.plan.schedule.description)


def test_fake_cuda_tensors_are_charged_in_512_byte_blocks():
    """What ``max_memory_allocated`` counts: each storage rounded up to the allocator's block size."""
    with FakeTensorMode(), LiveStorageTracker() as tracker:
        small = torch.empty(3, device="cuda")        # 12 bytes -> one block
        exact = torch.empty(256, device="cuda")      # 1024 bytes, two blocks exactly
        cpu = torch.empty(3)                         # the CPU allocator is charged as is
        assert [allocated_bytes(t) for t in (small, exact, cpu)] == [CUDA_BLOCK_BYTES, 1024, 12]
        assert tracker.live_bytes == CUDA_BLOCK_BYTES + 1024 + 12


def _cross_entropy_loss(out, x):
    return F.cross_entropy(out, torch.arange(x.shape[0]) % out.shape[1])


# Store-all against plain autograd: (model, input shape, loss). ODE blocks of every solver,
# BatchNorm and GroupNorm, float32 and float64, a network whose parameters are a large part of
# its memory (the MLP), and skip connections across blocks (the U-Net).
STORE_ALL_CASES = {
    "resnet-batchnorm-rk2": (lambda: ode_resnet(width=8, stages=2, nt=4, method="rk2", norm="batch"),
                             (16, 3, 16, 16), _cross_entropy_loss),
    "resnet-groupnorm-rk4-float64": (lambda: ode_resnet(width=8, stages=2, nt=3, method="rk4", norm="group").double(),
                                     (8, 3, 16, 16), _cross_entropy_loss),
    "mlp-rk4": (lambda: mlp_ode(features=16, hidden=64, blocks=2, nt=4, method="rk4"), (64, 16), _cross_entropy_loss),
    "unet-euler": (lambda: unet_ode(width=8, nt=2), (8, 3, 16, 16), lambda out, x: out.square().mean()),
}


@pytest.mark.parametrize("case", list(STORE_ALL_CASES))
def test_store_all_prediction_is_plain_autograds_allocator_peak(case):
    """The budget store-all needs is plain autograd's peak as the allocator counts it.

    So a budget of plain autograd's own peak stores every tape and runs as fast as plain
    autograd. It takes every detail: each stage's backward frees its tape as it goes and
    is measured after the backward of the stage after it; a re-run's peak is kept apart
    from the first run's; plain BatchNorm re-runs allocate nothing; kernel workspaces are
    calibrated; and the caller keeps the output and the loss through backward, as the
    PyTorch tutorials' loop does. Within a few hundred bytes: the allocator sees small
    internal buffers the storage view does not place exactly.
    """
    build, shape, loss_fn = STORE_ALL_CASES[case]
    torch.manual_seed(0)
    model = build()
    x = torch.randn(*shape, dtype=next(model.parameters()).dtype)
    predicted = anode_plan.compile(model, 10**12, (x,), planner=planners.StoreAll()).plan.predicted_peak_bytes
    outputs = []  # the caller keeps the output, as the plan assumes (to compute accuracy, say)
    measured = anode_plan.measure_peak_memory(
        lambda: outputs.append(model(x)) or loss_fn(outputs[-1], x).backward()).peak_bytes
    model.zero_grad(set_to_none=True)
    assert_budget_promise(measured, predicted, None, case)
    assert abs(predicted - measured) <= 1024, (predicted, measured)


@pytest.mark.parametrize("planner", [planners.StoreAll(), planners.Anode(), planners.Revolve(snapshots=2),
                                     planners.Anode(snapshots=1)], ids=repr)
def test_skip_connections_across_blocks_are_counted_once(planner):
    """U-Net: encoder outputs ride along in every state until the decoder uses them."""
    torch.manual_seed(0)
    model = unet_ode(width=8, nt=3)
    x = torch.randn(4, 3, 16, 16)
    compiled = anode_plan.compile(model, "1GB", (x,), planner=planner)
    compiled(x)
    measured = anode_plan.measure_peak_memory(lambda: compiled(x).square().mean().backward()).peak_bytes
    assert_budget_promise(measured, compiled.plan.predicted_peak_bytes, None, planner)


def test_smaller_budget_never_costs_less_compute(resnet32):
    """On one chain: exactly on the FLOP model's costs; within the timings' noise (ties) on measured ones."""
    model, x, _ = resnet32
    minimum = _min_budget(model, x, planners.Landmarks())
    traced = anode_plan.trace_model(model, (x,))
    measured = anode_plan.lower_to_chain(model, traced, (x,))
    for chain, slack in ((measured.nominal(), 0.0), (measured, planners.chain.tie_tolerance(measured))):
        costs = [anode_plan.plan_for_budget(chain, traced, (x,), minimum * k // 2).simulation.step_cost
                 for k in range(2, 12)]
        assert all(later <= earlier * (1 + slack) for earlier, later in zip(costs, costs[1:])), costs


@pytest.mark.parametrize("budget, fragment", [
    ("4 parsecs", "unknown unit 'parsecs'"),
    (-1, "must be positive"),
    ("0GB", "at least 1 byte"),
    ("12 Mb", "reads as bits"),
    (float("nan"), "finite and at least 1"),
])
def test_bad_budgets_raise_budget_format_error(resnet32, budget, fragment):
    model, x, _ = resnet32
    with pytest.raises(anode_plan.BudgetFormatError, match=fragment):
        anode_plan.compile(model, budget, (x,))


def test_budget_units_are_si_and_iec():
    assert anode_plan.parse_memory_budget("4GB") == 4 * 10**9
    assert anode_plan.parse_memory_budget("512MiB") == 512 * 2**20
    assert anode_plan.parse_memory_budget("1.5 GiB") == 3 * 2**29
    assert anode_plan.parse_memory_budget(12345) == 12345


def test_budget_below_minimum_names_the_minimum_and_breakdown(resnet32):
    model, x, _ = resnet32
    with pytest.raises(anode_plan.InfeasibleBudgetError) as info:
        anode_plan.compile(model, "10KB", (x,))
    error = info.value
    assert error.min_budget_bytes > 10_000 and error.budget_bytes == 10_000
    assert "memory_budget='10KB'" in str(error) and "Give at least" in str(error)
    peak = sum(error.breakdown.values())  # the smallest schedule's peak, part by part
    assert peak < error.min_budget_bytes <= int(peak / (1 - PREDICTION_RESERVE)) + 1  # with the reserve kept free
    assert f"Give at least {error.min_budget_bytes} bytes" in str(error)
    anode_plan.compile(model, error.min_budget_bytes, (x,))  # the minimum itself is feasible
    with pytest.raises(anode_plan.InfeasibleBudgetError):
        anode_plan.compile(model, error.min_budget_bytes - 1, (x,))


def test_compiled_shares_parameters_and_state_dict_keys(resnet32):
    model, x, y = resnet32
    compiled = anode_plan.compile(model, "1GB", (x,))
    assert list(compiled.state_dict()) == list(model.state_dict())
    assert all(a is b for a, b in zip(compiled.parameters(), model.parameters()))
    copy_of_model = copy.deepcopy(model)
    compiled.load_state_dict(copy_of_model.state_dict())
    opt = torch.optim.SGD(compiled.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    F.cross_entropy(compiled(x), y).backward()
    opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    compiled.eval()
    assert not model.training
    compiled.train()
    assert model.training


def test_no_grad_and_eval_run_without_checkpoint_regions(resnet32, monkeypatch):
    model, x, _ = resnet32
    compiled = anode_plan.compile(model, _min_budget(model, x, planners.Landmarks()), (x,))
    assert planners.count_regions(compiled.plan.schedule.ops) > 0
    calls = []
    import anode_plan.runtime as runtime
    original = runtime.checkpoint
    monkeypatch.setattr(runtime, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k))
    compiled.eval()
    with torch.no_grad():
        plain = model(x)
        out = compiled(x)
    compiled.train()
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
    assert calls == []


def test_batchnorm_statistics_updated_once_per_step():
    model = ode_resnet(width=4, stages=2, nt=3, method="rk4", norm="batch").double()
    reference = copy.deepcopy(model)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    compiled = anode_plan.compile(model, 10**9, (x,), planner=planners.Anode(snapshots=1))
    for _ in range(3):
        compiled(x).sum().backward()
        reference(x).sum().backward()
    for (name, mine), theirs in zip(model.named_buffers(), reference.buffers()):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("planner", [planners.Anode(), planners.Revolve(snapshots=1), planners.Anode(snapshots=2)],
                         ids=repr)
def test_dropout_replays_identically_on_every_recompute(planner):
    model = mlp_ode(features=4, hidden=16, blocks=2, nt=6, dropout=0.5, time_dependent=True).double()
    reference = copy.deepcopy(model)
    x = torch.randn(7, 4, dtype=torch.float64)
    compiled = anode_plan.compile(model, 10**9, (x,), planner=planner)
    torch.manual_seed(123)
    out = compiled(x)
    out.square().sum().backward()
    torch.manual_seed(123)
    ref_out = reference(x)
    ref_out.square().sum().backward()
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14, msg=name)
