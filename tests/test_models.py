"""Tests of the reference models: shapes, seeding, torch.fx traceability, gradients, argument errors."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

from anode_plan import ODEBlock
from models import MODELS, ModelConfigError, build_model, example_input_shape

# Small configurations, so that the whole file runs in seconds on a CPU.
SMALL = {
    "ode_resnet": dict(width=4, stages=2, blocks_per_stage=2, nt=2),
    "squeezenext_ode": dict(width=8, stages=2, nt=2),
    "mlp_ode": dict(features=5, hidden=6, blocks=2, nt=2),
    "unet_ode": dict(width=4, nt=2),
}
SPATIAL = {"ode_resnet": (8, 8), "squeezenext_ode": (8, 8), "unet_ode": (8, 8)}
NAMES = sorted(MODELS)


def small_model(name: str, **overrides) -> nn.Module:
    return build_model(name, **{**SMALL[name], **overrides})


def small_input(name: str, dtype: torch.dtype = torch.float32, batch_size: int = 2) -> torch.Tensor:
    shape = example_input_shape(name, batch_size, **SMALL[name])
    shape = shape[:2] + SPATIAL.get(name, ())
    return torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=dtype)


def expected_output_shape(name: str, batch_size: int) -> tuple[int, ...]:
    if name == "unet_ode":
        return (batch_size, 3, *SPATIAL[name])
    return (batch_size, 3 if name == "mlp_ode" else 10)


class ODELeafTracer(fx.Tracer):
    """Keeps every ODEBlock as one call_module node, as anode_plan's tracer does."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, ODEBlock) or super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module) -> fx.GraphModule:
    return fx.GraphModule(model, ODELeafTracer().trace(model))


def ode_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), ODEBlock)]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("train", [True, False])
def test_output_shape_and_dtype(name, dtype, train):
    model = small_model(name).to(dtype).train(train)
    out = model(small_input(name, dtype, batch_size=3))
    assert out.shape == expected_output_shape(name, 3)
    assert out.dtype == dtype and torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_defaults_accept_example_input(name):
    model = build_model(name).eval()
    with torch.no_grad():
        out = model(torch.randn(example_input_shape(name, 2)))
    assert out.shape[0] == 2


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("method", ["rk2", "rk4"])
def test_other_methods(name, method):
    model = small_model(name, method=method)
    assert all(b.method == method for b in model.modules() if isinstance(b, ODEBlock))
    assert model(small_input(name)).shape == expected_output_shape(name, 2)


@pytest.mark.parametrize("name", NAMES)
def test_seed_determines_every_tensor_and_global_rng_is_untouched(name):
    rng_before = torch.random.get_rng_state()
    a, b, c = small_model(name, seed=3).state_dict(), small_model(name, seed=3).state_dict(), \
        small_model(name, seed=4).state_dict()
    assert torch.equal(rng_before, torch.random.get_rng_state())
    assert a.keys() == b.keys() == c.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert any(not torch.equal(a[key], c[key]) for key in a if a[key].is_floating_point())


@pytest.mark.parametrize("name", NAMES)
def test_traces_with_ode_blocks_as_leaves(name):
    model = small_model(name).double().eval()
    gm = trace(model)
    n_blocks = sum(isinstance(m, ODEBlock) for m in model.modules())
    assert n_blocks > 0 and len(ode_nodes(gm)) == n_blocks
    x = small_input(name, torch.float64)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


def test_unet_graph_is_a_dag_with_skips_across_ode_blocks():
    gm = trace(small_model("unet_ode"))
    nodes = ode_nodes(gm)
    skips = [n for n in nodes if len(n.users) > 1]
    assert [n.target for n in skips] == ["enc1", "enc2"]
    cats = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.cat]
    assert len(cats) == 2


@pytest.mark.parametrize("name", NAMES)
def test_backward_gives_finite_gradient_for_every_parameter(name):
    model = small_model(name).double().train()
    x = small_input(name, torch.float64).requires_grad_()
    model(x).square().sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name", NAMES)
def test_single_euler_step_is_a_residual_block(name):
    model = small_model(name, nt=1, method="euler").double().eval()
    inputs: dict[ODEBlock, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args: inputs.__setitem__(mod, args[0]))
             for m in model.modules() if isinstance(m, ODEBlock)]
    with torch.no_grad():
        model(small_input(name, torch.float64))
        for hook in hooks:
            hook.remove()
        assert len(inputs) == len(hooks)
        for block, z in inputs.items():
            t0 = torch.zeros((), dtype=z.dtype)
            assert torch.equal(block(z), z + block.func(t0, z))


def test_mlp_time_dependence_and_dropout():
    x = small_input("mlp_ode", torch.float64)
    plain = small_model("mlp_ode").double().eval()
    timed = small_model("mlp_ode", time_dependent=True).double().eval()
    dropped = small_model("mlp_ode", dropout=0.5).double()
    assert not torch.allclose(plain(x), timed(x))
    torch.testing.assert_close(dropped.eval()(x), plain(x), rtol=0, atol=0)
    dropped.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        first = dropped(x)
        torch.manual_seed(0)
        torch.testing.assert_close(dropped(x), first, rtol=0, atol=0)
        assert not torch.allclose(dropped(x), first)


@pytest.mark.parametrize("name", ["ode_resnet", "squeezenext_ode", "unet_ode"])
def test_group_norm_groups_divide_channels(name):
    model = small_model(name, norm="group", width=12)
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    for m in norms:
        assert m.num_channels % m.num_groups == 0 and m.num_groups <= 8
        assert m.num_groups == max(g for g in range(1, 9) if m.num_channels % g == 0)


BAD_ARGS = [
    ("ode_resnet", "width", 0), ("ode_resnet", "stages", -1), ("ode_resnet", "blocks_per_stage", 1.5),
    ("ode_resnet", "nt", 0), ("ode_resnet", "nt", True), ("ode_resnet", "method", "dopri5"),
    ("ode_resnet", "norm", "layer"), ("ode_resnet", "num_classes", 0), ("ode_resnet", "in_channels", "3"),
    ("ode_resnet", "seed", -7), ("squeezenext_ode", "width", 6), ("squeezenext_ode", "method", "rk3"),
    ("squeezenext_ode", "norm", None), ("mlp_ode", "features", 0), ("mlp_ode", "hidden", 2.0),
    ("mlp_ode", "blocks", 0), ("mlp_ode", "dropout", 1.0), ("mlp_ode", "dropout", -0.25),
    ("mlp_ode", "time_dependent", "yes"), ("mlp_ode", "seed", 0.5), ("unet_ode", "width", -8),
    ("unet_ode", "out_channels", 0), ("unet_ode", "norm", "instance"), ("unet_ode", "nt", 2.0),
]


@pytest.mark.parametrize("name, arg, value", BAD_ARGS)
def test_bad_arguments_raise_value_error_naming_the_value(name, arg, value):
    with pytest.raises(ValueError) as info:
        MODELS[name](**{arg: value})
    assert isinstance(info.value, ModelConfigError)
    assert f"{arg}={value!r}" in str(info.value) and name in str(info.value)


def test_unknown_model_name_lists_known_models():
    with pytest.raises(ValueError) as info:
        build_model("resnet50")
    assert not isinstance(info.value, KeyError)
    assert "'resnet50'" in str(info.value) and all(name in str(info.value) for name in MODELS)
    with pytest.raises(ValueError, match="'nope'"):
        example_input_shape("nope", 2)


def test_unknown_keyword_is_rejected():
    with pytest.raises(ValueError, match="blocks_per_stage"):
        build_model("unet_ode", blocks_per_stage=2)
    with pytest.raises(ValueError, match="batch_size=0"):
        example_input_shape("mlp_ode", 0)


def test_example_input_shape_follows_model_kwargs():
    assert example_input_shape("ode_resnet", 4) == (4, 3, 32, 32)
    assert example_input_shape("squeezenext_ode", 2, in_channels=1) == (2, 1, 32, 32)
    assert example_input_shape("mlp_ode", 5, features=11) == (5, 11)
    assert example_input_shape("unet_ode", 1) == (1, 3, 16, 16)
