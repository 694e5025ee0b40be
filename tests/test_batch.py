"""``max_batch_size``: the largest batch that trains under a budget, checked against the allocator."""

from __future__ import annotations

import logging
import math
import os
import re

import pytest
import torch

import anode_plan
import factories
import planners
import published
from anode_plan import MachineMemoryError, available_memory
from anode_plan.analysis.batch_chains import batch_inputs, interpolate_chain
from promise import assert_budget_promise, step_peak

BUDGET = 12 * 2**20


@pytest.fixture(scope="module")
def mnist():
    torch.manual_seed(0)
    return published.odenet_mnist(nt=3, method="rk4"), torch.randn(4, 1, 28, 28)


@pytest.fixture(scope="module")
def search(mnist):
    """``search_batch_size`` of the MNIST ODE-net under ``BUDGET``, searched once for the tests that read it."""
    model, x = mnist
    return anode_plan.search_batch_size(model, BUDGET, (x,))


def test_the_largest_batch_fits_as_the_allocator_counts_and_five_percent_more_does_not(mnist, search):
    model, x = mnist
    found = search
    batch = found.batch
    assert batch > x.shape[0] and found.limited_by == "budget" and found.stopped is None
    assert len(found.measured_batches) <= 6  # two to fit the lines, then confirmations; not one per candidate
    big = batch_inputs((x,), batch)[0]
    compiled = anode_plan.compile(model, BUDGET, (big,))
    measured = step_peak(compiled, model, big, torch.arange(batch) % 10)
    assert_budget_promise(measured.peak_bytes, compiled.plan.predicted_peak_bytes, BUDGET, batch)
    larger = max(batch + 1, math.ceil(1.05 * batch))
    with pytest.raises(anode_plan.InfeasibleBudgetError):
        anode_plan.compile(model, BUDGET, batch_inputs((x,), larger))
    assert anode_plan.max_batch_size(model, BUDGET, (x,)) == batch


def test_a_recompute_limit_gives_a_smaller_batch_within_it(mnist, search):
    model, x = mnist
    free = search
    limited = anode_plan.search_batch_size(model, BUDGET, (x,), max_overhead=0.0)
    assert 0 < limited.batch < free.batch
    assert limited.plan.recompute_overhead == 0
    assert limited.limited_by == "max_overhead"
    above = next(p for p in limited.points if p.measured and p.batch == limited.batch + 1)
    assert above.excluded_by == "max_overhead" and above.peak_bytes is not None  # a plan fits, recomputing
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


@pytest.fixture(scope="module")
def tiny():
    return factories.tiny_odenet(channels=4, nt=2), torch.randn(4, 3, 8, 8)


def test_a_budget_beyond_the_machine_stops_at_its_memory_before_measuring_there(tiny, caplog):
    """A budget eight times the memory free: the search measures the two small batches it starts from, predicts
    the next on their line, finds it needs more than the machine has and stops without allocating it."""
    model, x = tiny
    free = available_memory(x.device)
    assert free is not None  # Linux reads /proc/meminfo; elsewhere os.sysconf
    budget = 8 * free.available_bytes
    with caplog.at_level(logging.INFO, logger="anode_plan.analysis.batch"):
        found = anode_plan.search_batch_size(model, budget, (x,), max_batch=1 << 50)
    stop = found.stopped
    assert found.limited_by == "machine memory" and stop is not None
    assert found.measured_batches == (4, 6)  # nothing measured past the examples' batch and the line's second point
    assert found.batch == 6 and found.plan is not None and found.plan.budget_bytes == budget
    assert stop.batch > 6 and stop.batch not in found.measured_batches
    assert stop.needed_bytes > stop.memory.available_bytes
    assert stop.input_bytes == stop.batch * x[0].numel() * x.element_size()
    predicted = next(p for p in found.points if p.batch == stop.batch and not p.measured)
    assert predicted.fits and stop.step_peak_bytes == predicted.peak_bytes <= budget
    # Measuring a chain allocates in proportion to the batch: the stop's figure is on the line through the two.
    (small, large) = [(m.batch, m.peak_bytes) for m in found.measurements]
    slope = (large[1] - small[1]) / (large[0] - small[0])
    assert slope > 0 and stop.measuring_bytes == pytest.approx(large[1] + slope * (stop.batch - large[0]), rel=1e-6)
    assert stop.needed_bytes == max(stop.measuring_bytes, stop.step_peak_bytes + stop.input_bytes)
    # The advice: the largest batch within the memory, and the smallest budget it needs, which keeps a search there.
    assert 6 <= stop.largest_batch_within < stop.batch and stop.budget_within_bytes < budget
    lines = [record.getMessage() for record in caplog.records if record.name == "anode_plan.analysis.batch"]
    assert lines[0] == "max batch: measuring the chain at batch 4"
    assert re.fullmatch(r"max batch: measured batch 4 in [\d.]+ s, [\d.]+ [KM]iB at the peak", lines[1]), lines
    assert re.fullmatch(r"max batch: measuring the chain at batch 6 \(expect about [\d.]+ s and [\d.]+ [KM]iB: batch "
                        r"4 took [\d.]+ s, time scaled by batch, memory on the line through the measured batches\)",
                        lines[2]), lines
    assert any(line.startswith(f"max batch: stopped at the machine's memory, not the budget: batch {stop.batch} "
                               f"needs ") and "the largest batch confirmed is 6" in line for line in lines), lines


def test_max_batch_size_says_where_the_machine_stopped_it(tiny, monkeypatch):
    """With less memory free than one more sample needs, max_batch_size raises, naming the batch confirmed."""
    model, x = tiny
    scarce = anode_plan.analysis.machine_memory.MachineMemory(1, "cpu", "a test's reading")
    monkeypatch.setattr(anode_plan.analysis.batch, "available_memory", lambda device: scarce)
    with pytest.raises(MachineMemoryError) as info:
        anode_plan.max_batch_size(model, BUDGET, (x,))
    error = info.value
    assert error.batch == 6 and error.stop.memory is scarce and error.stop.batch > 6
    assert isinstance(error, anode_plan.AnodePlanError)
    message = str(error)
    assert f"batch {error.stop.batch} needs {planners.format_bytes(error.stop.needed_bytes)}" in message
    assert "stopped at this machine's memory, not the budget" in message
    assert "The largest batch confirmed to fit the budget is 6" in message
    assert message.endswith("or within this one: no batch above 6 fits this machine's memory.")


def test_available_memory_is_at_most_the_machine_has():
    free = available_memory("cpu")
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert 0 < free.available_bytes <= total and free.device == "cpu"
    assert available_memory("meta") is None
