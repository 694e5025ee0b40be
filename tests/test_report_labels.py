"""Words and labels people read: counts agree with their nouns, plot legends name every line and shade,
the demo's columns have headers."""

from __future__ import annotations

import importlib
import os
import re
import sys
from dataclasses import dataclass

import pytest
import torch

import anode_plan
import planners
from anode_plan import BatchPoint
from models import ode_resnet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def small():
    model, x = ode_resnet(width=4, stages=2, nt=2), torch.randn(4, 3, 16, 16)
    traced = anode_plan.trace_model(model, (x,))
    return traced, anode_plan.lower_to_chain(model, traced, (x,), calibrate=False), x


@dataclass(frozen=True)
class RegionOver:
    """A planner that keeps every tape except in one checkpoint region over ``stages`` stages from stage 1."""

    stages: int

    def plan(self, chain, *, budget_bytes):
        inside = range(1, 1 + self.stages)
        ops = [planners.Run(i) for i in range(len(chain.stages)) if i not in inside]
        if self.stages:
            ops.insert(1, planners.Region(1, 1 + self.stages, tuple(planners.Run(i) for i in inside)))
        return planners.Schedule(tuple(ops), "region-over", description=f"one region over {self.stages} stages")


@pytest.mark.parametrize("stages, words", [(0, "0 extra stage forwards"), (1, "1 extra stage forward,"),
                                           (2, "2 extra stage forwards")])
def test_report_counts_agree_with_their_nouns(small, stages, words):
    traced, chain, x = small
    plan = anode_plan.plan_for_budget(chain, traced, (x,), 1 << 40, RegionOver(stages))
    assert plan.simulation.recomputed_forwards == stages  # a region's stages run twice
    report = anode_plan.format_report(plan, anode_plan.find_landmarks(chain))
    assert f"  recompute    {words}" in report
    assert f"({plan.budget_bytes} bytes)" in report
    # The report's own phrases (the schedule's description is the planner's): no count of one with a plural noun.
    own = report.replace(plan.schedule.description, "")
    assert not re.search(r"(?<![\d.,])1 (extra stage forwards|stages|probes|checkpoints|bytes)\b", own), own


def test_the_timeline_tells_the_budget_from_the_peak(small):
    pytest.importorskip("matplotlib")
    traced, chain, x = small
    plan = anode_plan.plan_for_budget(chain, traced, (x,), anode_plan.find_landmarks(chain).anode_bytes)
    ax = anode_plan.plot_timeline(plan).axes[0]
    handles, labels = ax.get_legend_handles_labels()
    lines = dict(zip(labels, handles))
    budget = lines[f"budget {planners.format_bytes(plan.budget_bytes)}"]
    peak = lines[f"predicted peak {planners.format_bytes(plan.predicted_peak_bytes)}"]
    assert (budget.get_color(), budget.get_linestyle()) != (peak.get_color(), peak.get_linestyle())
    assert budget.get_color() != peak.get_color()
    assert [text.get_text() for text in ax.get_legend().get_texts()] == labels  # every label is drawn


def test_the_batch_curve_says_why_each_batch_is_left_out():
    """Batches 1-4 fit, 5 fits the budget but recomputes over the cap, 6-7 fit no schedule: each is shaded by its
    reason, and the legend names the shades, the cap, the budget and the peak."""
    pytest.importorskip("matplotlib")
    from matplotlib.colors import to_rgba

    from anode_plan.analysis.plot import EXCLUDED_SHADES
    budget = 10 * 2**20
    points = [BatchPoint(b, True, b == 4, peak_bytes=2 * b * 2**20, overhead=0.05 * (b - 1)) for b in range(1, 5)]
    points.append(BatchPoint(5, False, True, peak_bytes=9 * 2**20, overhead=0.4))
    points += [BatchPoint(b, False, False, min_budget_bytes=(b + 5) * 2**20) for b in (6, 7)]
    assert [p.excluded_by for p in points] == [None] * 4 + ["max_overhead", "budget", "budget"]
    figure = anode_plan.plot_batch_curve(points, batch=4, budget_bytes=budget, max_overhead=0.3)
    ax, twin = figure.axes
    labels = ax.get_legend_handles_labels()[1] + twin.get_legend_handles_labels()[1]
    shown = [text.get_text() for text in ax.get_legend().get_texts()]
    assert shown == labels
    for expected in (EXCLUDED_SHADES["budget"][1], EXCLUDED_SHADES["max_overhead"][1], "recompute cap: 30%",
                     "largest batch: 4", "predicted peak", f"budget {planners.format_bytes(budget)}",
                     "predicted recompute overhead"):
        assert shown.count(expected) == 1, (expected, shown)
    shades = [(patch.get_x(), patch.get_x() + patch.get_width(), patch.get_facecolor()) for patch in ax.patches]
    for point in points:
        covering = [color for left, right, color in shades if left < point.batch < right]
        if point.fits:
            assert not covering, point
        else:
            assert covering == [to_rgba(EXCLUDED_SHADES[point.excluded_by][0])], point


def test_the_demo_labels_every_column_of_its_steps(capsys):
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    try:
        demo = importlib.import_module("demo")
    finally:
        sys.path.remove(os.path.join(ROOT, "tools"))
    assert demo.main(["--batch", "4", "--steps", "2", "--nt", "1", "--method", "euler"]) == 0
    out = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(out) if line.lstrip().startswith("step"))
    names = re.split(r"\s{2,}", out[header].strip())
    assert names == ["step", "loss (planned)", "loss (plain autograd)", "time (planned)", "time (plain autograd)"]
    for line in out[header + 1:header + 3]:
        cells = re.split(r"\s{2,}", line.strip())
        assert len(cells) == len(names) and cells[3].endswith(" ms") and cells[4].endswith(" ms"), line
        assert cells[1] == cells[2]  # the same loss, planned or not
