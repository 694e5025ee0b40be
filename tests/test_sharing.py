"""Blocks built alike share one measurement, and the chain is the one measured block by block.

The key (:mod:`anode_plan.measure.sharing`) must separate anything that could change a step's
bytes or cost; these tests check the two halves of that: sharing gives the same chain,
stage for stage, as measuring every block; and blocks that differ in a way shapes do
not show (a hyper-parameter, train/eval mode, a parameter from outside the block) are
measured apart.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from torch import nn

import anode_plan
import anode_plan.measure.chain as costmodel
from models import mlp_ode, ode_resnet, unet_ode
from test_random_networks import build, net_specs
from test_training import _SharedNet, _TupleStateNet

MODELS = {
    "mlp-rk4": lambda: (mlp_ode(features=16, hidden=16, blocks=6, nt=3, method="rk4"), torch.randn(8, 16)),
    "mlp-dropout-time": lambda: (mlp_ode(features=16, hidden=16, blocks=4, nt=2, method="rk2", dropout=0.1,
                                         time_dependent=True), torch.randn(8, 16)),
    "resnet-3-per-stage": lambda: (ode_resnet(width=4, stages=2, blocks_per_stage=3, nt=2, method="rk2"),
                                   torch.randn(2, 3, 8, 8)),
    "unet": lambda: (unet_ode(width=4, nt=2), torch.randn(2, 3, 16, 16)),
    "tuple-state": lambda: (_TupleStateNet().double(), torch.randn(7, 3, dtype=torch.float64)),
    "shared-function": lambda: (_SharedNet().double(), torch.randn(5, 4, dtype=torch.float64)),
}


def _chains(model, x, **kwargs):
    traced = anode_plan.trace_model(model, (x,))
    return (anode_plan.lower_to_chain(model, traced, (x,), **kwargs),
            anode_plan.lower_to_chain(model, traced, (x,), share=False, **kwargs))


@pytest.mark.parametrize("calibrate", [False, True], ids=["fake", "calibrated"])
@pytest.mark.parametrize("name", list(MODELS))
def test_sharing_gives_the_chain_measured_block_by_block(name, calibrate):
    """Bytes, offers and FLOP-model costs (``Chain.nominal()``): the milliseconds of a calibrated chain are timed
    afresh for each lowering, and vary by noise."""
    shared, alone = (chain.nominal() for chain in _chains(*MODELS[name](), calibrate=calibrate))
    for at, (a, b) in enumerate(zip(shared.stages, alone.stages)):
        assert a == b, (at, a.name)
    assert shared == alone


@settings(max_examples=10, deadline=None)
@given(spec=net_specs())
def test_sharing_is_sound_on_random_networks(spec):
    model = build(spec)
    x = torch.randn(spec.batch, spec.features, dtype=torch.float64)
    shared, alone = _chains(model, x, calibrate=False)
    assert shared == alone


_MEASURE = costmodel.measure_stage


def _profiles_measured(model, x, monkeypatch, **kwargs):
    calls = []
    monkeypatch.setattr(costmodel, "measure_stage", lambda spec, *a: calls.append(spec.name) or _MEASURE(spec, *a))
    traced = anode_plan.trace_model(model, (x,))
    anode_plan.lower_to_chain(model, traced, (x,), calibrate=False, **kwargs)
    return calls


def test_blocks_built_alike_are_measured_once(monkeypatch):
    model, x = MODELS["mlp-rk4"]()
    shared = _profiles_measured(model, x, monkeypatch)
    alone = _profiles_measured(model, x, monkeypatch, share=False)
    assert len(alone) == 2 + 6  # two layer groups and one step per block
    assert len(shared) == 2 + 1


class _Scaled(nn.Module):
    """dz/dt = scale * tanh(W z): ``scale`` is a hyper-parameter no shape shows."""

    def __init__(self, width: int, scale: float, outside: nn.Linear | None = None) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.scale = scale
        self.__dict__["outside"] = outside  # not a submodule: its parameters belong to no block

    def forward(self, t, z):
        h = self.outside(z) if self.outside is not None else z
        out = torch.tanh(self.fc(h))
        return out * self.scale if self.scale != 1.0 else out


def test_blocks_that_differ_only_in_a_hyperparameter_or_mode_are_measured_apart(monkeypatch):
    blocks = [anode_plan.ODEBlock(_Scaled(8, scale), nt=2) for scale in (1.0, 1.0, 2.0)]
    model = nn.Sequential(nn.Linear(4, 8), *blocks, nn.Linear(8, 3))
    x = torch.randn(5, 4)
    assert len(_profiles_measured(model, x, monkeypatch)) == 2 + 2  # the two scale=1.0 blocks share
    blocks[1].train(False)
    assert len(_profiles_measured(model, x, monkeypatch)) == 2 + 3
    shared, alone = _chains(model, x, calibrate=False)
    assert shared == alone


class _WithOutside(nn.Module):
    def __init__(self, body: nn.Module, outside: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.outside = outside

    def forward(self, x):
        return self.body(x)


def test_a_function_with_parameters_outside_its_block_is_measured_per_block(monkeypatch):
    """The parameters a step touches must map from block to block; one from outside cannot."""
    outside = nn.Linear(8, 8)
    blocks = [anode_plan.ODEBlock(_Scaled(8, 1.0, outside), nt=2) for _ in range(3)]
    model = _WithOutside(nn.Sequential(nn.Linear(4, 8), *blocks, nn.Linear(8, 3)), outside)
    x = torch.randn(5, 4)
    assert len(_profiles_measured(model, x, monkeypatch)) == 2 + 3
    shared, alone = _chains(model, x, calibrate=False)
    assert shared == alone
