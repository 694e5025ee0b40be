"""XConv's sketched convolution: exact input and bias gradients, an unbiased weight gradient whose error falls
like 1/√probes, the input not kept, the same probes under recompute, and the user's random stream untouched."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from anode_plan import XConv2d

from anode_plan.stages.sketch import expected_relative_error, supports


def _layer(stride=1, padding=1, bias=True, shape=(3, 5, 3)):
    torch.manual_seed(0)
    return nn.Conv2d(shape[0], shape[1], shape[2], stride=stride, padding=padding, bias=bias).double()


def _exact(conv, x, seed=1):
    torch.manual_seed(seed)
    weights = torch.randn_like(conv(x))
    x = x.detach().clone().requires_grad_()
    conv.zero_grad(set_to_none=True)
    (conv(x) * weights).sum().backward()
    return weights, x.grad, conv.weight.grad.clone(), None if conv.bias is None else conv.bias.grad.clone()


def _sketched(conv, x, weights, probes, seed):
    x = x.detach().clone().requires_grad_()
    conv.zero_grad(set_to_none=True)
    (XConv2d(conv, probes=probes, seed=seed)(x) * weights).sum().backward()
    return x.grad, conv.weight.grad.clone(), None if conv.bias is None else conv.bias.grad.clone()


@pytest.mark.parametrize("stride,padding,size", [(1, 1, (6, 6)), (2, 1, (9, 7)), (1, 0, (5, 8)), (2, 2, (4, 4))])
def test_input_and_bias_gradients_are_exact(stride, padding, size):
    conv = _layer(stride, padding)
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    weights, grad_x, _, grad_b = _exact(conv, x)
    sketched_x, _, sketched_b = _sketched(conv, x, weights, probes=8, seed=3)
    torch.testing.assert_close(sketched_x, grad_x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sketched_b, grad_b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("stride,padding,size", [(1, 1, (4, 4)), (2, 1, (5, 4))])
def test_the_weight_gradient_is_unbiased_border_pixels_included(stride, padding, size):
    """1,000 seeds on a 4×4 input (every kernel offset touches the zero border): each weight's mean estimate
    is within 4.5 standard errors of the exact gradient."""
    conv = _layer(stride, padding, shape=(2, 2, 3))
    x = torch.randn(2, 2, *size, dtype=torch.float64)
    weights, _, exact, _ = _exact(conv, x)
    estimates = torch.stack([_sketched(conv, x, weights, probes=4, seed=seed)[1] for seed in range(1000)])
    mean, spread = estimates.mean(0), estimates.std(0) / math.sqrt(len(estimates))
    z = ((mean - exact).abs() / spread.clamp_min(1e-12)).max()
    assert float(z) < 4.5, float(z)


def test_the_relative_error_falls_like_one_over_root_probes():
    conv = _layer(1, 1, shape=(4, 6, 3))
    x = torch.randn(3, 4, 10, 12, dtype=torch.float64)
    weights, _, exact, _ = _exact(conv, x)
    counts = [4, 16, 64, 256]
    errors = []
    for probes in counts:
        trials = [_sketched(conv, x, weights, probes, seed)[1] for seed in range(24)]
        errors.append(float(np.mean([float((t - exact).norm() / exact.norm()) for t in trials])))
    slope = np.polyfit(np.log(counts), np.log(errors), 1)[0]
    assert -0.6 <= slope <= -0.4, (slope, errors)
    assert errors[-1] < 2 * expected_relative_error(counts[-1]) * errors[0] / expected_relative_error(counts[0])


def test_the_input_is_not_kept_and_the_sketch_is_what_is():
    conv = _layer(1, 1, shape=(3, 5, 3))
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = XConv2d(conv, probes=8)(x)
    storages = {t.untyped_storage().data_ptr() for t in saved}
    assert x.untyped_storage().data_ptr() not in storages
    kept = sum(t.numel() * t.element_size() for t in saved if t is not conv.weight)
    assert kept == 4 * 3 * 8 * 8  # b · ci · probes, in float64
    out.sum().backward()


def test_a_recompute_sees_the_same_probes_and_the_rng_stream_is_untouched():
    conv = _layer(2, 1)
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    grads = []
    for recompute in (False, True):
        sketched = XConv2d(conv, probes=6, seed=5)
        conv.zero_grad(set_to_none=True)
        state = torch.get_rng_state()
        inputs = x.clone().requires_grad_()
        out = checkpoint(sketched, inputs, use_reentrant=False) if recompute else sketched(inputs)
        out.square().sum().backward()
        assert torch.equal(torch.get_rng_state(), state)
        assert sketched.step == 1  # one backward: the next step draws new probes
        grads.append(conv.weight.grad.clone())
    assert torch.equal(grads[0], grads[1])


def test_each_training_step_draws_new_probes():
    conv = _layer()
    sketched = XConv2d(conv, probes=4)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    found = []
    for _ in range(2):
        conv.zero_grad(set_to_none=True)
        sketched(x).square().sum().backward()
        found.append(conv.weight.grad.clone())
    assert not torch.equal(found[0], found[1])


def test_unsupported_convolutions_are_named():
    assert not supports(nn.Conv2d(4, 4, 3, groups=2)) and not supports(nn.Conv2d(4, 4, 3, dilation=2))
    assert not supports(nn.Conv2d(4, 4, 3, padding="same")) and supports(nn.Conv2d(4, 4, 3, stride=2, padding=1))

    class Standardised(nn.Conv2d):  # its own forward: a sketch of nn.Conv2d's would skip it
        def forward(self, x):
            w = self.weight
            return self._conv_forward(x, (w - w.mean()) / w.std(), self.bias)

    class Renamed(nn.Conv2d):
        pass

    assert not supports(Standardised(4, 4, 3)) and supports(Renamed(4, 4, 3))
    with pytest.raises(ValueError, match="groups=1, dilation=1"):
        XConv2d(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="positive int"):
        XConv2d(nn.Conv2d(4, 4, 3), probes=0)
