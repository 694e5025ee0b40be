"""tools/plan_report.py: the command line, checked against the API's numbers.

Two tests run the tool as a subprocess, as a user would (the default model; a model from
``tests/factories.py`` given as ``module:factory``); the rest call its ``main`` in-process
on tiny models to stay fast.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys

import pytest
import torch
import yaml

import anode_plan
import planners
from models import ode_resnet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "plan_report.py")
TINY = ["--kwargs", "width=4", "stages=2", "nt=2", "--batch", "4", "--input-shape", "3,16,16"]


def _run_tool(*args: str) -> str:
    result = subprocess.run([sys.executable, TOOL, *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _printed_landmarks(text: str) -> dict[str, int]:
    found = dict(re.findall(r"^\s+(store-all|ANODE|minimum)\s+[\d.]+ \w+\s+\((\d+) bytes\)", text, re.MULTILINE))
    assert set(found) == {"store-all", "ANODE", "minimum"}, text
    return {name: int(nbytes) for name, nbytes in found.items()}


def _api_landmarks(model, x) -> dict[str, int]:
    traced = anode_plan.trace_model(model, (x,))
    marks = anode_plan.find_landmarks(anode_plan.lower_to_chain(model, traced, (x,)))
    return {"store-all": marks.store_all_bytes, "ANODE": marks.anode_bytes, "minimum": marks.minimum_bytes}


@pytest.fixture(scope="module")
def tool():
    """The tool's module, imported as ``python tools/plan_report.py`` would import it."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    try:
        yield importlib.import_module("plan_report")
    finally:
        sys.path.remove(os.path.join(ROOT, "tools"))


def test_cli_with_no_arguments_reports_on_the_default_model():
    out = _run_tool()
    assert "model ode_resnet, input (32, 3, 32, 32) float32" in out
    x = torch.randn(32, 3, 32, 32)
    assert _printed_landmarks(out) == _api_landmarks(ode_resnet(), x)
    assert "trade-off: budget -> predicted step time" in out
    assert "memory at the predicted peak" in out and "kept states (steps)" in out


def test_cli_piped_into_a_reader_that_stops_early_ends_quietly():
    """``plan_report.py | head -1``: no BrokenPipeError traceback on stderr."""
    tool = subprocess.Popen([sys.executable, TOOL, *TINY], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = tool.stdout.readline()
    tool.stdout.close()  # what head does after its lines
    stderr = tool.stderr.read().decode()
    tool.wait(timeout=300)
    assert first.startswith(b"model ode_resnet")
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr


def test_cli_on_a_module_factory_model_matches_the_api_and_writes_plan_and_pictures(tmp_path):
    sys.path.insert(0, ROOT)
    try:
        factories = importlib.import_module("tests.factories")
    finally:
        sys.path.remove(ROOT)
    model, x = factories.tiny_odenet(channels=4, nt=3), torch.randn(4, 3, 8, 8)
    traced = anode_plan.trace_model(model, (x,))
    chain = anode_plan.lower_to_chain(model, traced, (x,))
    marks = anode_plan.find_landmarks(chain)
    budget = (marks.minimum_bytes + marks.anode_bytes) // 2
    plan = anode_plan.plan_for_budget(chain, traced, (x,), budget)

    saved, picture = tmp_path / "plan.yaml", tmp_path / "out.png"
    out = _run_tool("--model", "tests.factories:tiny_odenet", "--kwargs", "channels=4", "nt=3",
                    "--input-shape", "3,8,8", "--batch", "4", "--budget", str(budget),
                    "--save", str(saved), "--plot", str(picture))
    assert _printed_landmarks(out) == _api_landmarks(model, x)
    assert f"budget {planners.format_bytes(budget)} ({budget} bytes)" in out
    assert f"({plan.predicted_peak_bytes} bytes)" in out  # the predicted peak, in the memory breakdown
    assert plan.schedule.description in out  # the same schedule (its milliseconds were timed afresh)
    for block in ("ode1", "ode2"):
        assert re.search(rf"^\s+{block}\s+3\s+rk2\s", out, re.MULTILINE)
    loaded = anode_plan.load_plan(saved)  # planned and measured in another process: the same plan, timed afresh
    assert loaded.schedule == plan.schedule and loaded.chain.nominal() == plan.chain.nominal()
    for path in (tmp_path / "out-tradeoff.png", tmp_path / "out-timeline.png"):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size < 200_000


def test_a_range_of_budgets_with_measure_prints_the_curve_and_measurements(tool, capsys):
    assert tool.main([*TINY, "--budget", "180KB:280KB:3", "--measure"]) == 0
    out = capsys.readouterr().out
    table = out[out.index("trade-off"):out.index("plain autograd")]
    assert "measured peak" in table and "step time" in table
    assert len(re.findall(r"^\s+[\d.]+ [KM]iB\s", table, re.MULTILINE)) == 3
    assert "plain autograd (no plan): measured peak" in out


def test_one_budget_with_measure_prints_measured_beside_predicted(tool, capsys):
    assert tool.main([*TINY, "--budget", "240KB", "--measure"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"measured\s+peak [\d.]+ \w+ \(within budget; prediction [+-][\d.]+% of it\), step time", out)


def test_an_infeasible_budget_says_what_would_fit(tool, capsys):
    assert tool.main([*TINY, "--budget", "10KB"]) == 1
    out = capsys.readouterr().out
    assert "is infeasible: the smallest schedule of auto needs" in out and "Give at least that" in out


def test_report_on_a_saved_plan_with_and_without_the_model(tool, capsys, tmp_path):
    model, x = ode_resnet(width=4, stages=2, nt=2), torch.randn(4, 3, 16, 16)
    compiled = anode_plan.compile(model, "240KB", (x,))
    path = tmp_path / "plan.yaml"
    anode_plan.save_plan(compiled.plan, path)

    assert tool.main(["--plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"saved plan {path}: planner {compiled.plan.schedule.planner}" in out
    assert "budget 234.38 KiB (240000 bytes)" in out and "landmarks" in out

    assert tool.main(["--plan", str(path), "--model", "ode_resnet", *TINY[:4], "--measure"]) == 0
    out = capsys.readouterr().out
    assert "checked against model ode_resnet" in out and "measured     peak" in out

    assert tool.main(["--plan", str(path), "--model", "ode_resnet", "--kwargs", "width=4", "stages=2", "nt=3"]) == 1
    out = capsys.readouterr().out
    assert "PlanMismatchError" in out and "ODE block body.0 (nt=2, euler) in the plan is body.0 (nt=3, euler)" in out


def test_dump_prints_a_plan_file(tool, capsys):
    assert tool.main([*TINY, "--budget", "260KB", "--dump"]) == 0
    out = capsys.readouterr().out
    data = yaml.safe_load(out[out.index("# anode-plan plan"):])
    assert data["format"] == "anode-plan plan" and data["budget_bytes"] == 260_000


@pytest.mark.parametrize("argv, message", [
    (["--budget", "20MB:80MB"], "a range is start:stop:count"),
    (["--budget", "12 Mb"], "reads as bits"),
    (["--plan", "p.yaml", "--budget", "1MB"], "leave out --budget"),
    (["--plan", "p.yaml", "--measure"], "give --model"),
])
def test_bad_arguments_are_usage_errors(tool, capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        tool.main(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_help_lists_the_options(tool, capsys):
    with pytest.raises(SystemExit) as info:
        tool.main(["--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0
    for option in ("--model", "--kwargs", "--batch", "--input-shape", "--budget", "--measure", "--plot", "--plan",
                   "--save"):
        assert option in out


def test_budget_lists_and_ranges():
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    try:
        common = importlib.import_module("_common")
    finally:
        sys.path.remove(os.path.join(ROOT, "tools"))
    assert common.parse_budgets(["20MB:80MB:7"]) == [20_000_000 + 10_000_000 * k for k in range(7)]
    assert common.parse_budgets(["1MiB", "2MB,3000"]) == [2**20, 2_000_000, 3000]
    assert common.parse_budgets(["1MB:1MB:1"]) == [1_000_000]
    with pytest.raises(ValueError, match="start:stop:count"):
        common.parse_budgets(["1MB:2MB:0"])


def test_plots_need_matplotlib_and_say_how_to_get_it(monkeypatch):
    model, x = ode_resnet(width=4, stages=2, nt=2), torch.randn(4, 3, 16, 16)
    plan = anode_plan.compile(model, "240KB", (x,)).plan
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(anode_plan.PlotUnavailableError, match=r'pip install "anode-plan\[plot\]"'):
        anode_plan.plot_timeline(plan)


# --- block labels, checked against the schedule ------------------------------------------------------------------------

def _first_forward(ops, where=None):
    """Per stage: ``"taped"`` for a top-level Run, else the top-level Region it first runs in."""
    found = {}
    for op in ops:
        if isinstance(op, planners.Run):
            found[op.stage] = "taped"
        else:
            for stage in range(op.start, op.stop):
                found[stage] = op
    return found


@pytest.fixture(scope="module")
def small_chain():
    model = ode_resnet(width=4, stages=3, nt=4, method="rk2")
    x = torch.randn(4, 3, 16, 16)
    traced = anode_plan.trace_model(model, (x,))
    return traced, anode_plan.lower_to_chain(model, traced, (x,), calibrate=False), x


@pytest.mark.parametrize("planner,fraction", [("store-all", 1.0), ("anode", 1.0), ("revolve", 0.5),
                                              ("chain-dp", 0.35), ("chain-dp", 0.6), ("chain-dp", 0.85),
                                              ("nested", 0.5), ("auto", 0.0)])
def test_block_labels_say_what_the_schedule_does_to_each_step(small_chain, planner, fraction):
    traced, chain, x = small_chain
    landmarks = anode_plan.find_landmarks(chain)
    budget = int(landmarks.minimum_bytes + fraction * (landmarks.store_all_bytes - landmarks.minimum_bytes))
    plan = anode_plan.plan_for_budget(chain, traced, (x,), budget, planner)
    where = _first_forward(plan.schedule.ops)
    for summary, block in zip(anode_plan.summarize_blocks(plan), chain.blocks):
        steps = range(block.nt)
        taped = tuple(s for s in steps if where[block.start + s] == "taped")
        regions = {id(where[block.start + s]): where[block.start + s] for s in steps if s not in taped}
        assert summary.taped_steps == taped
        assert summary.snapshot_steps == tuple(sorted(r.start - block.start for r in regions.values()
                                                      if r.start >= block.start))
        outer = [r for r in regions.values() if r.start < block.start or r.stop > block.stop]
        expected = ("inside a region" if outer else "store tapes" if not regions else
                    "checkpointed + tapes" if taped else
                    ("ANODE", "ANODE+revolve") if [(r.start, r.stop) for r in regions.values()] ==
                    [(block.start, block.stop)] else "checkpointed")
        assert summary.strategy in (expected if isinstance(expected, tuple) else (expected,)), (summary, plan)
        assert (summary.region is not None) == bool(outer)
        assert (summary.recomputed_steps == 0) == (not regions)  # a step in a region is run again in backward
        if outer:
            assert summary.region == (chain.stages[outer[0].start].name, chain.stages[outer[0].stop - 1].name)


def test_max_batch_prints_the_search_the_curve_and_the_plan_at_the_answer(tool, capsys, tmp_path):
    budget = 600_000
    args = ["--kwargs", "width=4", "stages=2", "nt=2", "--batch", "4", "--input-shape", "3,16,16"]
    assert tool.main([*args, "--budget", str(budget), "--max-batch", "--max-overhead", "0.5",
                      "--plot", str(tmp_path / "b.png")]) == 0
    captured = capsys.readouterr()
    out = captured.out
    found = int(re.search(r"largest batch under [\d.]+ \w+ \(600000 bytes\) within 50% recompute overhead: (\d+)",
                          out).group(1))
    torch.manual_seed(0)
    model = ode_resnet(width=4, stages=2, nt=2)
    assert found == anode_plan.max_batch_size(model, budget, (torch.randn(4, 3, 16, 16),), max_overhead=0.5)
    assert f"batch {found} fits, batch {found + 1} does not" in out
    assert re.search(rf"^\s+{found}\s+[\d.]+ \w+\s+\+[\d.]+%\s+yes \(measured\)", out, re.MULTILINE)
    assert re.search(rf"^\s+{found + 1}\s+(needs [\d.]+ \w+\s+-\s+no, over the budget|[\d.]+ \w+\s+\+[\d.]+%\s+no, "
                     rf"over the recompute cap) \(measured\)", out, re.MULTILINE)
    assert f"ODEResNet (batch {found})" in out  # the report of the plan at the answer
    assert (tmp_path / "b-batch.png").read_bytes()[:4] == b"\x89PNG"
    progress = captured.err
    measured = re.findall(r"^max batch: measuring the chain at batch (\d+)", progress, re.MULTILINE)
    assert measured[:2] == ["4", "6"] and str(found + 1) in measured  # each batch measured, as it starts
    assert re.search(r"^max batch: measuring the chain at batch 6 \(expect about [\d.]+ s and [\d.]+ KiB: batch 4 took "
                     r"[\d.]+ s", progress, re.MULTILINE)
    assert "chains measured at batches 4 (" in out and re.search(rf"{found} \([\d.]+ s, [\d.]+ \w+ at the peak\)", out)


def test_max_batch_past_the_machines_memory_says_where_it_stopped(tool, capsys, monkeypatch):
    """When the next batch to measure needs more memory than the machine has free, the tool stops there and says so
    (here a reading of 1 MB free against a 1 GB budget: the batch the search would measure after the examples' batch
    and the line's second point is near the budget), with a budget that keeps the search within the machine."""
    scarce = anode_plan.analysis.machine_memory.MachineMemory(1_000_000, "cpu", "a test's reading")
    monkeypatch.setattr(anode_plan.analysis.batch, "available_memory", lambda device: scarce)
    assert tool.main([*TINY, "--budget", "1GB", "--max-batch"]) == 1
    captured = capsys.readouterr()
    found = re.search(r"the search stopped at this machine's memory, not the budget: batch (\d+) needs [\d.]+ \w+ to "
                      r"measure and [\d.]+ \w+ to train \(predicted step peak [\d.]+ \w+ \+ input batch [\d.]+ \w+\), "
                      r"and the cpu has 976.56 KiB available \(a test's reading\), so it was not measured", captured.out)
    assert found and int(found.group(1)) > 6, captured.out
    assert re.search(r"largest batch confirmed under 953.67 MiB \(1000000000 bytes\): 6 \(chains measured at batches "
                     r"4 \([\d.]+ s, [\d.]+ KiB at the peak\), 6 \(", captured.out), captured.out
    assert "max batch: stopped at the machine's memory, not the budget" in captured.err
    advice = re.search(r"a larger batch may fit 953.67 MiB on a device with more memory; batches up to about (\d+) "
                       r"fit this machine's memory; a budget up to [\d.]+ \w+ \((\d+) bytes, the least batch (\d+) "
                       r"needs\) keeps the search within it", captured.out)
    assert advice and int(advice.group(3)) == int(advice.group(1)) - 1, captured.out
    # The advice holds: under that budget the search answers within the machine's memory, as the budget limits it
    # (at the batch the advice names, or below where the measured chains need a little more than their line).
    assert tool.main([*TINY, "--budget", advice.group(2), "--max-batch"]) == 0
    out = capsys.readouterr().out
    answer = re.search(rf"largest batch under [\d.]+ \w+ \({advice.group(2)} bytes\): (\d+)\n", out)
    assert answer and int(answer.group(1)) <= int(advice.group(3)), out
    assert f"batch {answer.group(1)} fits, batch {int(answer.group(1)) + 1} does not (over the budget)" in out
    assert "stopped at this machine's memory" not in out


def test_max_batch_needs_one_budget(tool, capsys):
    with pytest.raises(SystemExit):
        tool.main([*TINY, "--budget", "1MB", "2MB", "--max-batch"])
    with pytest.raises(SystemExit):
        tool.main([*TINY, "--budget", "1MB", "--max-overhead", "0.2"])
    assert "exactly one --budget" in capsys.readouterr().err


def test_xconv_at_a_budget_only_sketches_reach_flags_the_sketched_layers(tool, capsys):
    # A model where sketches lower the smallest budget under every CPU kernel family tried (AVX-512, AVX2, SSE4.1);
    # with wider channels at batch 32, SSE4.1's convolutions keep workspaces as large as the tapes a sketch saves.
    factory = ["--model", "tests.factories:tiny_odenet", "--input-shape", "3,10,10", "--batch", "4", "--kwargs",
               "channels=6", "nt=6"]

    def smallest(*extra: str) -> int:  # as this machine's kernels measure it: the tool's own answer to 1 byte
        assert tool.main([*factory, "--budget", "1B", *extra]) == 1
        found = re.search(r"infeasible: the smallest schedule of auto needs [\d.]+ \w+ \((\d+) bytes\)",
                          capsys.readouterr().out)
        assert found
        return int(found.group(1))

    exact, sketched = smallest(), smallest("--xconv", "8")
    assert sketched < exact
    budget = f"{(exact + sketched) // 2}B"  # below the exact minimum, above the sketched one
    assert tool.main([*factory, "--budget", budget]) == 1
    capsys.readouterr()
    assert tool.main([*factory, "--budget", budget, "--xconv", "8", "--measure"]) == 0
    out = capsys.readouterr().out
    assert "INEXACT" in out and re.search(r"ode1\.func\.conv: 8 probes, in 6 stages, relative weight-gradient", out)
    assert re.search(r"measured\s+peak [\d.]+ \w+ \(within budget", out)


def test_inductor_backend_reports_compiled_stages_and_holds_the_budget(tool, capsys):
    assert tool.main([*TINY, "--budget", "1MB", "--backend", "inductor", "--measure"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"backend\s+inductor: (\d+) of \1 stages compiled by torch\.compile", out)
    assert "(measured on the device)" in out and re.search(r"measured\s+peak [\d.]+ \w+ \(within budget", out)
