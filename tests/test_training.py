"""A compiled model trains like the uncompiled one: AMP, dropout, BatchNorm, DDP, batch sizes, modes, saving.

Every test compares against the same model run without anode-plan. On the CPU the
comparison is exact (``rtol=0, atol=0``): a checkpoint region re-runs the same kernels
on the same inputs, so recomputed tensors are bit-identical to the stored ones, and the
backward graph is plain autograd's.
"""

from __future__ import annotations

import copy
import io
import os
import socket
import time

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import anode_plan
import anode_plan.compiler.chains as compiler_module
import anode_plan.runtime as runtime_module
import planners
from promise import assert_budget_promise
from models import mlp_ode, ode_resnet

PLANNERS = [planners.StoreAll(), planners.Anode(), planners.Anode(snapshots=1), planners.Revolve(snapshots=1),
            planners.Revolve(), planners.Landmarks()]
EXACT = {"rtol": 0, "atol": 0}


def _assert_same_training_state(model, reference, *, grads=True, **tol):
    tol = tol or EXACT
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, **tol, msg=f"parameter {name}")
        if grads and (p.grad is not None or q.grad is not None):
            torch.testing.assert_close(p.grad, q.grad, **tol, msg=f"gradient of {name}")
    for (name, b), c in zip(model.named_buffers(), reference.buffers()):
        torch.testing.assert_close(b, c, rtol=0, atol=0, msg=f"buffer {name}")


def _min_budget(model, inputs, planner=None):
    with pytest.raises(anode_plan.InfeasibleBudgetError) as info:
        anode_plan.compile(model, 1, inputs, planner=planner)
    return info.value.min_budget_bytes


def _small_resnet(dtype=torch.float64):
    return ode_resnet(width=4, stages=2, nt=3, method="rk2", norm="batch").to(dtype)


@pytest.fixture(scope="module")
def resnet():
    """A network large enough that measured peaks are meaningful: float32, batch 8, 16x16."""
    torch.manual_seed(0)
    return ode_resnet(width=8, stages=2, nt=4, method="rk2", norm="batch"), torch.randn(8, 3, 16, 16), \
        torch.randint(0, 10, (8,))


def _peak_of_step(compiled, model, x, y):
    compiled(x)  # warm-up: lazily created state must not count
    model.zero_grad(set_to_none=True)
    peak = anode_plan.measure_peak_memory(lambda: F.cross_entropy(compiled(x), y).backward()).peak_bytes
    model.zero_grad(set_to_none=True)
    return peak


# --- mixed precision ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("planner", [planners.Anode(), planners.Revolve(snapshots=1)], ids=repr)
def test_bfloat16_autocast_with_grad_scaler_on_cpu_matches_uncompiled_exactly(planner):
    torch.manual_seed(0)
    model = _small_resnet(torch.float32)
    reference = copy.deepcopy(model)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    compiled = anode_plan.compile(model, 10**9, (x,), planner=planner)
    runs = {}
    for name, net, owner in (("compiled", compiled, model), ("plain", reference, reference)):
        opt = torch.optim.SGD(owner.parameters(), lr=0.1, momentum=0.9)
        scaler = torch.amp.GradScaler("cpu")
        losses = []
        for _ in range(3):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = net(x)
                loss = F.cross_entropy(out, y)
            assert out.dtype == torch.bfloat16
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            losses.append(loss.detach())
        runs[name] = losses
    torch.testing.assert_close(runs["compiled"], runs["plain"], **EXACT)
    _assert_same_training_state(model, reference)
    # The first autocast call planned again, on bfloat16 activations: a smaller step.
    assert len(compiled.plans) == 2 and compiled.plan.predicted_peak_bytes < compiled.plans[0].predicted_peak_bytes


def test_plan_made_under_autocast_keeps_its_budget(resnet):
    model, x, y = resnet
    with torch.autocast("cpu", dtype=torch.bfloat16):
        budget = _min_budget(model, (x,))
        compiled = anode_plan.compile(model, budget, (x,))
        assert compiled(x).dtype == torch.bfloat16

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(compiled(x), y)
        loss.backward()
    model.zero_grad(set_to_none=True)
    measured = anode_plan.measure_peak_memory(step).peak_bytes
    model.zero_grad(set_to_none=True)
    assert len(compiled.plans) == 1  # compiled under the autocast it trains in: no re-plan
    assert_budget_promise(measured, compiled.plan.predicted_peak_bytes, budget, "bfloat16 autocast")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_autocast_with_grad_scaler_matches_uncompiled(dtype):
    torch.manual_seed(0)
    model = mlp_ode(features=16, hidden=64, blocks=2, nt=4, method="rk2").cuda()
    reference = copy.deepcopy(model)
    x, y = torch.randn(32, 16, device="cuda"), torch.randint(0, 3, (32,), device="cuda")
    compiled = anode_plan.compile(model, "1GB", (x,), planner=planners.Revolve(snapshots=1))
    for net, owner in ((compiled, model), (reference, reference)):
        opt = torch.optim.SGD(owner.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cuda")
        for _ in range(3):
            opt.zero_grad()
            with torch.autocast("cuda", dtype=dtype):
                loss = F.cross_entropy(net(x), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    _assert_same_training_state(model, reference, rtol=1e-3, atol=1e-5)


# --- randomness and statistics ------------------------------------------------------------------------------------

@pytest.mark.parametrize("planner", PLANNERS, ids=repr)
def test_dropout_replays_identically_under_every_schedule(planner):
    model = mlp_ode(features=4, hidden=8, blocks=2, nt=6, method="rk2", dropout=0.3, time_dependent=True).double()
    reference = copy.deepcopy(model)
    x = torch.randn(5, 4, dtype=torch.float64)
    compiled = anode_plan.compile(model, 10**9, (x,), planner=planner)
    if planner == planners.Revolve(snapshots=1):
        assert max(compiled.plan.simulation.forward_counts) == 6  # the first step runs six times
    for seed in (11, 12):
        torch.manual_seed(seed)
        out = compiled(x)
        out.square().sum().backward()
        torch.manual_seed(seed)
        ref_out = reference(x)
        ref_out.square().sum().backward()
        torch.testing.assert_close(out, ref_out, **EXACT)
    _assert_same_training_state(model, reference)


def _train_side_by_side(compiled, model, reference, x, y, steps=3):
    """``steps`` of SGD with momentum through the compiled model (training ``model``) and through ``reference``."""
    for net, owner in ((compiled, model), (reference, reference)):
        opt = torch.optim.SGD(owner.parameters(), lr=0.05, momentum=0.9)
        for step in range(steps):
            opt.zero_grad()
            F.cross_entropy(net(x + step), y).backward()
            opt.step()


@pytest.mark.parametrize("planner", PLANNERS, ids=repr)
def test_batchnorm_running_statistics_match_after_several_steps(planner):
    model = _small_resnet()
    reference = copy.deepcopy(model)
    x, y = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.randint(0, 10, (4,))
    compiled = anode_plan.compile(model, 10**9, (x,), planner=planner)
    _train_side_by_side(compiled, model, reference, x, y)
    _assert_same_training_state(model, reference)
    # Once per real call: 3 for the stem, 3 steps x 3 time steps x 2 RK2 stages for a norm inside f.
    assert int(model.stem[1].num_batches_tracked) == 3
    assert int(model.body[0].func.norm1.num_batches_tracked) == 18


class _OwnForwardBatchNorm(nn.BatchNorm2d):
    """A BatchNorm subclass with a forward of its own: re-run on copies of its statistics."""

    def forward(self, x):
        return super().forward(x) * 1.0


_NORMS = {
    "batchnorm": lambda c: nn.BatchNorm2d(c),
    "batchnorm-cumulative-average": lambda c: nn.BatchNorm2d(c, momentum=None),
    "instancenorm-tracking": lambda c: nn.InstanceNorm2d(c, affine=True, track_running_stats=True),
    "syncbatchnorm": lambda c: nn.SyncBatchNorm(c),  # without a process group it normalizes like BatchNorm
    "batchnorm-own-forward": lambda c: _OwnForwardBatchNorm(c),
}


class _NormField(nn.Module):
    def __init__(self, channels, norm):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm = norm(channels)

    def forward(self, t, z):
        return torch.tanh(self.norm(self.conv(z)))


@pytest.mark.parametrize("norm", list(_NORMS))
def test_every_norm_layer_keeps_its_running_statistics_and_budget_under_recompute(norm):
    """Plain BatchNorm re-runs frozen in place (momentum 0, no count), the others on copies.

    Either way the statistics after training are bit for bit those of the uncompiled model,
    and the measured peak at ANODE's budget stays within it (the copies are charged).
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), _NORMS[norm](4),
                          anode_plan.ODEBlock(_NormField(4, _NORMS[norm]), nt=3, method="rk2"),
                          nn.Flatten(), nn.Linear(4 * 8 * 8, 5)).double()
    reference = copy.deepcopy(model)
    x, y = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.randint(0, 5, (4,))
    leaves = [_OwnForwardBatchNorm]  # not a torch.nn module, so fx would trace into it
    compiled = anode_plan.compile(model, 10**9, (x,), planner=planners.Anode(snapshots=1), leaf_modules=leaves)
    assert compiled.plan.simulation.recomputed_forwards > 0
    _train_side_by_side(compiled, model, reference, x, y)
    _assert_same_training_state(model, reference)
    budget = anode_plan.budget_for_peak(compiled.plan.predicted_peak_bytes)
    tight = anode_plan.compile(model, budget, (x,), planner=planners.Anode(snapshots=1), leaf_modules=leaves)
    model.zero_grad(set_to_none=True)  # as optimizer.zero_grad() leaves them: the step allocates its gradients
    measured = anode_plan.measure_peak_memory(lambda: F.cross_entropy(tight(x), y).backward()).peak_bytes
    assert_budget_promise(measured, tight.plan.predicted_peak_bytes, budget, norm)


# --- distributed data parallel -------------------------------------------------------------------------------------

_DDP_CONFIGS = {"default": {"find_unused_parameters": False}, "static_graph": {"static_graph": True},
                "inductor": {"find_unused_parameters": False}}
"""DDP's options per run; "inductor" compiles the model with backend="inductor" (a budget one compiled unit of the
whole model fits, so DDP's gradient hooks fire from Inductor's backward)."""
_DDP_STEPS = 3


def _ddp_model():
    return mlp_ode(features=6, hidden=8, blocks=2, nt=4, method="rk2", seed=3).double()


def _ddp_batches():
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 6, generator=generator, dtype=torch.float64),
             torch.randint(0, 3, (8,), generator=generator)) for _ in range(_DDP_STEPS)]


def _ddp_train(net, params, batches, rank=0, world=1):
    """SGD on each rank's share of every global batch; the gradients after the first step, the parameters after all."""
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    first = None
    for step, (x, y) in enumerate(batches):
        opt.zero_grad()
        F.cross_entropy(net(x[rank::world]), y[rank::world]).backward()
        if step == 0:
            first = [p.grad.clone() for p in params]
        opt.step()
    return first, [p.detach().clone() for p in params]


def _ddp_worker(rank, world, port, out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {}
        batches = _ddp_batches()
        for name, options in _DDP_CONFIGS.items():
            model = _ddp_model()
            if name == "inductor":
                compiled = anode_plan.compile(model, 10**9, (batches[0][0][rank::world],), backend="inductor")
                assert compiled.plan.unit is not None
            else:
                compiled = anode_plan.compile(model, 10**9, (batches[0][0][rank::world],),
                                              planner=planners.Revolve(snapshots=1))
            ddp = DistributedDataParallel(compiled, **options)
            results[name] = _ddp_train(ddp, list(model.parameters()), batches, rank, world)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ddp_two_cpu_processes_equal_single_process_on_the_global_batch(tmp_path):
    import torch.multiprocessing as mp
    context = mp.start_processes(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + 240
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.terminate()
            pytest.fail("the DDP workers did not finish within 240 s")
    model = _ddp_model()
    ref_grads, ref_params = _ddp_train(model, list(model.parameters()), _ddp_batches())
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert set(results) == set(_DDP_CONFIGS)
        for name, (grads, params) in results.items():
            # allreduce sums the two halves in another order than one process does: equal to rounding.
            torch.testing.assert_close(grads, ref_grads, rtol=1e-12, atol=1e-15, msg=f"{name} rank {rank}")
            torch.testing.assert_close(params, ref_params, rtol=1e-12, atol=1e-15, msg=f"{name} rank {rank}")


# --- batch sizes ---------------------------------------------------------------------------------------------------

def test_smaller_batch_keeps_the_plan_and_stays_within_budget(resnet):
    model, x, y = resnet
    budget = _min_budget(model, (x,))
    compiled = anode_plan.compile(model, budget, (x,))
    plan = compiled.plan
    assert _peak_of_step(compiled, model, x[:5], y[:5]) <= budget
    assert compiled.plan is plan and len(compiled.plans) == 1


def test_larger_batch_replans_once_under_the_same_budget(resnet, monkeypatch):
    model, x, y = resnet
    x16, y16 = torch.cat([x, x.flip(0)]), torch.cat([y, y.flip(0)])
    budget = _min_budget(model, (x16,))  # the tightest budget batch 16 fits
    compiled = anode_plan.compile(model, budget, (x,))
    lowered = []
    original = compiler_module.lower_to_chain
    monkeypatch.setattr(compiler_module, "lower_to_chain", lambda *a, **k: lowered.append(1) or original(*a, **k))
    assert _peak_of_step(compiled, model, x16, y16) <= budget
    assert compiled.plan.input_shapes == ((16, 3, 16, 16),) and compiled.plan.budget_bytes == budget
    compiled(x16[:12])  # covered by the batch-16 plan
    assert compiled.plan.input_shapes[0][0] == 16
    compiled(x[:3])  # covered by the batch-8 plan, the smallest that covers it
    assert compiled.plan.input_shapes[0][0] == 8
    assert lowered == [1] and len(compiled.plans) == 2

    reference = copy.deepcopy(model)
    model.zero_grad(set_to_none=True)
    F.cross_entropy(compiled(x16), y16).backward()
    F.cross_entropy(reference(x16), y16).backward()
    _assert_same_training_state(model, reference)
    model.zero_grad(set_to_none=True)


def test_larger_batch_that_cannot_fit_raises_and_the_planned_batch_still_runs(resnet):
    model, x, y = resnet
    budget = _min_budget(model, (x,))
    compiled = anode_plan.compile(model, budget, (x,))
    big = torch.cat([x, x, x])
    with pytest.raises(anode_plan.InfeasibleBudgetError) as info:
        compiled(big)
    error = info.value
    assert error.budget_bytes == budget and error.min_budget_bytes > budget
    message = str(error)
    assert "(24, 3, 16, 16)" in message and "(8, 3, 16, 16)" in message and str(error.min_budget_bytes) in message
    assert "Split the batch" in message
    with torch.no_grad():
        assert compiled(big).shape == (24, 10)  # inference needs no plan
    F.cross_entropy(compiled(x), y).backward()
    model.zero_grad(set_to_none=True)
    assert len(compiled.plans) == 1


# --- modes ---------------------------------------------------------------------------------------------------------

@pytest.fixture
def checkpoint_calls(monkeypatch):
    calls = []
    original = runtime_module.checkpoint
    monkeypatch.setattr(runtime_module, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_eval_without_grad_runs_straight_through_with_no_extra_memory(resnet, checkpoint_calls, mode):
    model, x, _ = resnet
    compiled = anode_plan.compile(model, _min_budget(model, (x,)), (x,))
    assert planners.count_regions(compiled.plan.schedule.ops) > 0
    checkpoint_calls.clear()  # compile's own timed steps run regions; the eval calls below must not
    context = torch.no_grad if mode == "no_grad" else torch.inference_mode
    compiled.eval()
    try:
        with context():
            plain = anode_plan.measure_peak_memory(lambda: model(x)).peak_bytes
            mine = anode_plan.measure_peak_memory(lambda: compiled(x)).peak_bytes
            torch.testing.assert_close(compiled(x), model(x), **EXACT)
    finally:
        compiled.train()
    assert checkpoint_calls == [] and mine <= plain


def test_nothing_trainable_runs_straight_through(checkpoint_calls):
    model = mlp_ode(features=4, hidden=8, blocks=2, nt=4).double().requires_grad_(False)
    x = torch.randn(3, 4, dtype=torch.float64)
    compiled = anode_plan.compile(model, 10**9, (x,), planner=planners.Anode())
    checkpoint_calls.clear()  # compile's own timed steps (none here: nothing needs a gradient)
    torch.testing.assert_close(compiled(x), model(x), **EXACT)
    assert checkpoint_calls == []
    compiled(x.requires_grad_()).sum().backward()  # an input that needs a gradient runs the plan
    assert checkpoint_calls and x.grad is not None


@pytest.mark.parametrize("planner", [planners.Anode(), planners.Revolve(snapshots=1)], ids=repr)
def test_autograd_grad_and_backward_inputs_match_uncompiled(planner):
    model = mlp_ode(features=4, hidden=8, blocks=2, nt=5, method="rk4").double()
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    compiled = anode_plan.compile(model, 10**9, (x,), planner=planner)
    head = [model.head.weight, model.head.bias]
    results = {}
    for name, net in (("compiled", compiled), ("plain", model)):
        grads = torch.autograd.grad(net(x).square().sum(), [x, model.blocks[0].func.fc1.weight])
        assert all(p.grad is None for p in model.parameters()) and x.grad is None  # nothing accumulated
        net(x).square().sum().backward(inputs=head)
        assert x.grad is None
        assert [p.grad is not None for p in model.parameters()] == [any(p is h for h in head)
                                                                     for p in model.parameters()]
        results[name] = (grads, [p.grad.clone() for p in head])
        model.zero_grad(set_to_none=True)
    torch.testing.assert_close(results["compiled"], results["plain"], **EXACT)


def test_backward_twice_raises_pytorch_error_and_retain_graph_works():
    model = mlp_ode(features=4, hidden=8, blocks=1, nt=6).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    compiled = anode_plan.compile(model, 10**9, (x,), planner=planners.Revolve(snapshots=1))
    loss = compiled(x).square().sum()
    loss.backward(retain_graph=True)
    once = [p.grad.clone() for p in model.parameters()]
    loss.backward()  # retain_graph: the regions re-run again, the gradients accumulate
    torch.testing.assert_close([p.grad for p in model.parameters()], [2 * g for g in once], **EXACT)
    loss = compiled(x).square().sum()
    loss.backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()


@pytest.mark.parametrize("planner", [planners.Anode(), planners.Revolve(snapshots=1)], ids=repr)
def test_double_backward_matches_uncompiled(planner):
    model = mlp_ode(features=4, hidden=8, blocks=2, nt=4, method="rk2").double()
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    compiled = anode_plan.compile(model, 10**9, (x,), planner=planner)
    results = []
    for net in (compiled, model):
        dx, = torch.autograd.grad(net(x).square().sum(), x, create_graph=True)
        penalty = dx.square().sum()  # a gradient penalty, as in WGAN-GP
        results.append(torch.autograd.grad(penalty, [x, *model.parameters()]))
    torch.testing.assert_close(results[0], results[1], **EXACT)


# --- saving, loading and moving -------------------------------------------------------------------------------------

def _steps(net, opt, batches):
    losses = []
    for x, y in batches:
        opt.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return losses


@pytest.mark.parametrize("first, then", [("compiled", "plain"), ("plain", "compiled"), ("compiled", "compiled")])
def test_checkpoint_mid_training_resumes_with_identical_losses(first, then):
    torch.manual_seed(0)
    batches = [(torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.randint(0, 10, (4,))) for _ in range(4)]

    def make(kind, seed):
        model = ode_resnet(width=4, stages=2, nt=3, method="rk2", norm="batch", seed=seed).double()
        net = anode_plan.compile(model, 10**9, (batches[0][0],), planner=planners.Anode(snapshots=1)) \
            if kind == "compiled" else model
        return net, model, torch.optim.Adam(net.parameters(), lr=1e-2)

    straight, straight_model, straight_opt = make("plain", 0)
    expected = _steps(straight, straight_opt, batches)

    net, model, opt = make(first, 0)
    _steps(net, opt, batches[:2])
    buffer = io.BytesIO()
    torch.save({"model": net.state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed, resumed_model, resumed_opt = make(then, 1)  # another seed: everything must come from the file
    resumed.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["optimizer"])
    torch.testing.assert_close(_steps(resumed, resumed_opt, batches[2:]), expected[2:], **EXACT)
    _assert_same_training_state(resumed_model, straight_model)


def test_to_dtype_after_compile_replans_for_the_new_dtype():
    model = mlp_ode(features=4, hidden=8, blocks=2, nt=4)
    x32 = torch.randn(6, 4)
    compiled = anode_plan.compile(model, 10**9, (x32,), planner=planners.Anode())
    assert compiled.double() is compiled and model.head.weight.dtype == torch.float64
    reference = copy.deepcopy(model)
    x = x32.double()
    compiled(x).square().sum().backward()
    reference(x).square().sum().backward()
    _assert_same_training_state(model, reference)
    assert len(compiled.plans) == 2 and compiled.plan.input_dtypes == ("torch.float64",)
    first, second = compiled.plans
    assert second.chain.value_bytes[-1] == 2 * first.chain.value_bytes[-1]  # activations doubled


@pytest.mark.gpu
def test_to_cuda_after_compile_replans_and_matches_cpu():
    model = mlp_ode(features=4, hidden=8, blocks=2, nt=4).double()
    reference = copy.deepcopy(model)
    x = torch.randn(6, 4, dtype=torch.float64)
    compiled = anode_plan.compile(model, 10**9, (x,), planner=planners.Anode())
    compiled.cuda()
    compiled(x.cuda()).square().sum().backward()
    reference(x).square().sum().backward()
    assert len(compiled.plans) == 2
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad.cpu(), q.grad, rtol=1e-10, atol=1e-12)


# --- model variety -------------------------------------------------------------------------------------------------

class _Oscillator(nn.Module):
    """A second-order ODE as a tuple state (position, velocity), driven by a context c and by t."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.spring = nn.Linear(width, width)
        self.damping = nn.Linear(width, width)

    def forward(self, t, z, c):
        position, velocity = z
        return velocity, torch.tanh(self.spring(position) * (1 + t) + self.damping(velocity) * c)


class _TupleStateNet(nn.Module):
    def __init__(self, width: int = 6, nt: int = 5, method: str = "rk4") -> None:
        super().__init__()
        self.embed = nn.Linear(3, width)
        self.context = nn.Linear(3, width)
        self.ode = anode_plan.ODEBlock(_Oscillator(width), nt=nt, method=method)
        self.head = nn.Linear(2 * width, 2)

    def forward(self, x):
        z = self.embed(x)
        position, velocity = self.ode((z, torch.zeros_like(z)), torch.sigmoid(self.context(x)))
        return self.head(torch.cat([position, velocity], dim=1))


class _SharedNet(nn.Module):
    """Two ODE blocks that share one ODE function, and one ODE block called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        shared = mlp_ode(hidden=8, blocks=1, nt=3).blocks[0].func
        self.first = anode_plan.ODEBlock(shared, nt=3, method="rk2")
        self.second = anode_plan.ODEBlock(shared, nt=2, method="euler")
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        z = self.second(self.first(self.embed(x)))
        return self.head(self.second(torch.tanh(z)))


def _compare_with_uncompiled(model, x, planner, loss=lambda out: out.square().sum()):
    reference = copy.deepcopy(model)
    x = x.clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    compiled = anode_plan.compile(model, 10**9, (x,), planner=planner)
    loss(compiled(x)).backward()
    loss(reference(x_ref)).backward()
    torch.testing.assert_close(x.grad, x_ref.grad, **EXACT)
    _assert_same_training_state(model, reference)
    return compiled


@pytest.mark.parametrize("planner", PLANNERS, ids=repr)
def test_tuple_state_with_context_and_time_dependence(planner):
    torch.manual_seed(0)
    model = _TupleStateNet().double()
    x = torch.randn(7, 3, dtype=torch.float64)
    compiled = _compare_with_uncompiled(model, x, planner)
    assert [b.nt for b in compiled.plan.chain.blocks] == [5]
    model.zero_grad(set_to_none=True)
    measured = anode_plan.measure_peak_memory(lambda: compiled(x).square().sum().backward()).peak_bytes
    assert_budget_promise(measured, compiled.plan.predicted_peak_bytes, None, planner)


@pytest.mark.parametrize("planner", PLANNERS, ids=repr)
def test_parameters_shared_between_blocks(planner):
    torch.manual_seed(0)
    model = _SharedNet().double()
    compiled = _compare_with_uncompiled(model, torch.randn(5, 4, dtype=torch.float64), planner)
    assert len(compiled.plan.chain.blocks) == 3  # the block called twice is two blocks of the chain


@pytest.mark.parametrize("planner", [planners.Anode(), planners.Revolve(snapshots=1)], ids=repr)
def test_frozen_parameters(planner):
    model = mlp_ode(features=4, hidden=8, blocks=2, nt=4, method="rk2").double()
    model.embed.requires_grad_(False)
    model.blocks[1].func.fc1.requires_grad_(False)
    x = torch.randn(5, 4, dtype=torch.float64)
    compiled = _compare_with_uncompiled(model, x, planner)
    assert model.embed.weight.grad is None and model.blocks[1].func.fc1.weight.grad is None
    trainable_bytes = sum(compiled.plan.chain.param_grad_bytes)
    model.requires_grad_(True)  # unfreezing adds gradients, so the next training call plans again
    compiled(x).sum().backward()
    assert len(compiled.plans) == 2 and sum(compiled.plan.chain.param_grad_bytes) > trainable_bytes
