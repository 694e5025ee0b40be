"""``max_batch_size``: the largest batch that trains under a budget, checked against the allocator."""

from __future__ import annotations

import math

import pytest
import torch

import anode_plan
import planners
import published
from anode_plan.batch import batch_inputs, interpolate_chain
from promise import assert_budget_promise, step_peak

BUDGET = 12 * 2**20


@pytest.fixture(scope="module")
def mnist():
    torch.manual_seed(0)
    return published.odenet_mnist(nt=3, method="rk4"), torch.randn(4, 1, 28, 28)


def test_the_largest_batch_fits_as_the_allocator_counts_and_five_percent_more_does_not(mnist):
    model, x = mnist
    found = anode_plan.search_batch_size(model, BUDGET, (x,))
    batch = found.batch
    assert batch > x.shape[0]
    assert len(found.measured_batches) <= 6  # two to fit the lines, then confirmations; not one per candidate
    big = batch_inputs((x,), batch)[0]
    compiled = anode_plan.compile(model, BUDGET, (big,))
    measured = step_peak(compiled, model, big, torch.arange(batch) % 10)
    assert_budget_promise(measured.peak_bytes, compiled.plan.predicted_peak_bytes, BUDGET, batch)
    larger = max(batch + 1, math.ceil(1.05 * batch))
    with pytest.raises(anode_plan.InfeasibleBudgetError):
        anode_plan.compile(model, BUDGET, batch_inputs((x,), larger))
    assert anode_plan.max_batch_size(model, BUDGET, (x,)) == batch


def test_a_recompute_limit_gives_a_smaller_batch_within_it(mnist):
    model, x = mnist
    free = anode_plan.search_batch_size(model, BUDGET, (x,))
    limited = anode_plan.search_batch_size(model, BUDGET, (x,), max_overhead=0.0)
    assert 0 < limited.batch < free.batch
    assert limited.plan.recompute_overhead == 0
    above = anode_plan.compile(model, BUDGET, batch_inputs((x,), limited.batch + 1))
    assert above.plan.recompute_overhead > 0  # it fits only by recomputing
    curve = [p for p in free.points if p.fits and p.overhead is not None]
    assert curve and all(a.overhead <= b.overhead + 1e-12 for a, b in zip(curve, curve[1:]) if a.batch < b.batch)


def test_the_chain_between_two_measured_batches_is_the_measured_chain(mnist):
    """Tensor bytes grow with the batch on a line: the chain predicted at batch 6 from 4 and 9 is the one measured
    at 6. Kernel workspaces are not quite (mkldnn's convolution backward): peaks agree to 1%, and the search
    confirms its answer on measured chains for this reason."""
    model, x = mnist
    traced = anode_plan.trace_model(model, (x,))
    chains = {b: anode_plan.lower_to_chain(model, traced, batch_inputs((x,), b)) for b in (4, 6, 9)}
    predicted = interpolate_chain(chains[4], 4, chains[9], 9, 6)
    for mine, real in zip(predicted.stages, chains[6].stages):
        for field in ("input_bytes", "output_bytes", "tape_bytes"):
            assert abs(getattr(mine, field) - getattr(real, field)) <= 64, (mine.name, field)
    store_all = planners.StoreAll().plan(chains[6], budget_bytes=1 << 60)
    peaks = [planners.simulate_plan(chain, store_all).peak_bytes for chain in (predicted, chains[6])]
    assert abs(peaks[0] - peaks[1]) <= 0.01 * peaks[1]


def test_a_budget_below_one_sample_gives_zero(mnist):
    model, x = mnist
    assert anode_plan.max_batch_size(model, 2**20, (x,)) == 0


def test_bad_arguments_are_named(mnist):
    model, x = mnist
    with pytest.raises(ValueError, match="max_overhead=-0.1"):
        anode_plan.max_batch_size(model, BUDGET, (x,), max_overhead=-0.1)
    with pytest.raises(anode_plan.ExampleInputsError, match="disagree"):
        anode_plan.max_batch_size(model, BUDGET, (x, torch.randn(3, 2)))
