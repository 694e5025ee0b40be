"""The same model measured twice gives the same chain: in one process, after other work, and in another process.

Its bytes, that is: the stage times calibration measures vary with the machine's load from
one measurement to the next, so chains are compared priced by the FLOP model
(:meth:`planners.Chain.nominal`, deterministic); that a plan does not flip with that noise
is ``tests/test_timing.py``'s.

What may vary, and is keyed: the intra-op thread count (oneDNN's convolutions keep a buffer
per thread, so a step's peak depends on it) and oneDNN switched on or off. A compiled model
plans again when either changes, and the budget holds at the new setting.
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch
import torch.nn.functional as F

import anode_plan
from factories import tiny_odenet
from promise import assert_budget_promise, step_peak

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_MEASURE = """
import sys, torch
sys.path[:0] = [{tests!r}, {root!r}]
import anode_plan
from factories import tiny_odenet
torch.manual_seed(0)
model, x = tiny_odenet(channels=4, nt=3), torch.randn(4, 3, 8, 8)
print(repr(anode_plan.lower_to_chain(model, anode_plan.trace_model(model, (x,)), (x,)).nominal()))
"""


def _chain():
    torch.manual_seed(0)
    model, x = tiny_odenet(channels=4, nt=3), torch.randn(4, 3, 8, 8)
    return anode_plan.lower_to_chain(model, anode_plan.trace_model(model, (x,)), (x,)).nominal()


def _other_work():
    """What ran before in the suite's process: an XConv compile (its own generators, patched convolutions),
    an adaptive solve, a step of another model, at another batch."""
    model, x = tiny_odenet(channels=6, nt=2), torch.randn(2, 3, 10, 10)
    compiled = anode_plan.compile(model, "1GB", (x,), approximate=anode_plan.XConv(probes=4))
    F.cross_entropy(compiled(x), torch.tensor([0, 1])).backward()
    y0 = torch.randn(3, requires_grad=True)
    anode_plan.odeint(lambda t, y: -y, y0, torch.linspace(0, 1, 3), method="dopri5").sum().backward()


def test_the_same_model_measured_twice_in_one_process_and_in_another_gives_the_same_chain():
    first = _chain()
    _other_work()
    assert _chain() == first
    script = _MEASURE.format(tests=os.path.join(ROOT, "tests"), root=ROOT)
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == repr(first)


def test_another_thread_count_plans_again_and_holds_the_budget():
    model, x = tiny_odenet(channels=4, nt=3), torch.randn(4, 3, 8, 8)
    y = torch.randint(0, 5, (4,))
    before = torch.get_num_threads()
    marks = anode_plan.find_landmarks(anode_plan.lower_to_chain(model, anode_plan.trace_model(model, (x,)), (x,)))
    budget = anode_plan.budget_for_peak(marks.store_all_bytes)
    compiled = anode_plan.compile(model, budget, (x,))
    try:
        torch.set_num_threads(before + 1)
        measured = step_peak(compiled, model, x, y)
        assert len(compiled.plans) == 2  # measured and planned again at the new count
        assert_budget_promise(measured.peak_bytes, compiled.plan.predicted_peak_bytes, budget, "after the change")
    finally:
        torch.set_num_threads(before)
    step_peak(compiled, model, x, y)
    assert len(compiled.plans) == 2  # back at the first count: the first plan again
