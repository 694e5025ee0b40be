"""Plans as YAML files: exact round trips, reuse without planning, and rejection of mismatched or broken plans."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml
from torch.nn import functional as F

import anode_plan
import planners
from models import ode_resnet

PLANNERS = [planners.StoreAll(), planners.Anode(), planners.Anode(snapshots=1), planners.Revolve(),
            planners.Revolve(snapshots=1), planners.Landmarks()]
HUGE = 10**12


def _model(nt: int = 3):
    return ode_resnet(width=4, stages=2, nt=nt, method="rk2", norm="batch").double()


@pytest.fixture(scope="module")
def setup():
    """A tiny ODE-ResNet in float64, its input, trace and chain, and a plan with nested regions."""
    model = _model()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    traced = anode_plan.trace_model(model, (x,))
    chain = anode_plan.lower_to_chain(model, traced, (x,))
    plan = anode_plan.plan_for_budget(chain, traced, (x,), HUGE, planners.Revolve(snapshots=1))
    assert planners.nesting_depth(plan.schedule.ops) >= 2
    return model, x, traced, chain, plan


def _save(plan, tmp_path, name="plan.yaml"):
    path = tmp_path / name
    anode_plan.save_plan(plan, path)
    return path


def _edit(path, change):
    """Load the YAML, let ``change`` edit the data in place, write it back (comments are lost)."""
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.parametrize("planner", PLANNERS, ids=repr)
def test_yaml_round_trip_preserves_the_plan_exactly(setup, tmp_path, planner):
    model, x, traced, chain, _ = setup
    plan = anode_plan.plan_for_budget(chain, traced, (x,), HUGE, planner)
    path = _save(plan, tmp_path)
    loaded = anode_plan.load_plan(path)
    assert loaded == plan  # schedule, chain, budget, simulation with its timeline, shapes, dtypes, fingerprint
    assert anode_plan.dump_plan(loaded) == path.read_text()


def test_the_file_records_what_the_issue_asks_for(setup, tmp_path):
    *_, plan = setup
    data = yaml.safe_load(_save(plan, tmp_path).read_text())
    assert data["format"] == "anode-plan plan" and data["version"] == 1
    assert data["fingerprint"] == plan.fingerprint and len(plan.fingerprint) == 16
    assert data["inputs"] == [{"shape": [4, 3, 8, 8], "dtype": "torch.float64"}]
    assert data["budget_bytes"] == HUGE
    assert data["planner"] == "revolve"
    assert {"region", "body"} <= set(next(op for op in data["schedule"] if isinstance(op, dict)))


def test_compile_reuses_a_saved_plan_without_planning(setup, tmp_path, monkeypatch):
    _, x, _, _, plan = setup
    path = _save(plan, tmp_path)

    def no_planning(self, chain, *, budget_bytes):
        raise AssertionError("compile(plan=...) must not plan again")

    for cls in (planners.StoreAll, planners.Anode, planners.Revolve, planners.Landmarks):
        monkeypatch.setattr(cls, "plan", no_planning)
    model, reference = _model(), _model()
    compiled = anode_plan.compile(model, plan=str(path))
    # Re-traced and re-measured: the same bytes, so the same plan; its milliseconds were timed afresh.
    assert compiled.plan.schedule == plan.schedule and compiled.plan.chain.nominal() == plan.chain.nominal()
    assert compiled.plan.predicted_peak_bytes == plan.predicted_peak_bytes

    target = torch.tensor([0, 1, 2, 3])
    F.cross_entropy(compiled(x), target).backward()
    F.cross_entropy(reference(x), target).backward()
    for (name, mine), theirs in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-10, atol=1e-12, msg=name)


def test_compile_accepts_a_plan_object_and_explicit_inputs(setup):
    model, x, _, _, plan = setup
    compiled = anode_plan.compile(copy.deepcopy(model), example_inputs=(x,), plan=plan)
    assert compiled.plan.schedule == plan.schedule and compiled.plan.budget_bytes == HUGE


def test_a_given_memory_budget_replaces_the_files_and_must_hold(setup, tmp_path):
    model, _, _, _, plan = setup
    path = _save(plan, tmp_path)
    peak = plan.predicted_peak_bytes
    budget = anode_plan.budget_for_peak(peak)  # the peak, and the share of the budget plans keep free
    assert anode_plan.compile(copy.deepcopy(model), budget, plan=path).plan.budget_bytes == budget
    with pytest.raises(anode_plan.PlanOverBudgetError) as info:
        anode_plan.compile(copy.deepcopy(model), budget - 1, plan=path)
    assert (info.value.peak_bytes, info.value.budget_bytes) == (peak, budget - 1)
    assert f"memory_budget={budget} or more" in str(info.value)


def test_plan_and_planner_together_are_refused(setup, tmp_path):
    model, *_, plan = setup
    with pytest.raises(TypeError, match="pass plan= or planner=, not both"):
        anode_plan.compile(model, plan=plan, planner=planners.StoreAll())


def test_a_plan_for_another_model_is_refused_saying_what_differs(setup, tmp_path):
    *_, plan = setup
    path = _save(plan, tmp_path)
    with pytest.raises(anode_plan.PlanMismatchError) as info:
        anode_plan.compile(_model(nt=4), plan=path)
    message = str(info.value)
    assert str(path) in message
    assert "ODE block body.0 (nt=3, rk2) in the plan is body.0 (nt=4, rk2) in the model" in message
    assert "the plan has 12 stages, the model 14" in message
    assert "plan again" in message
    assert info.value.differences


def test_a_plan_for_another_input_shape_or_dtype_is_refused(setup, tmp_path):
    model, *_, plan = setup
    path = _save(plan, tmp_path)
    with pytest.raises(anode_plan.PlanMismatchError) as info:
        anode_plan.compile(copy.deepcopy(model), example_inputs=(torch.randn(8, 3, 8, 8, dtype=torch.float64),),
                           plan=path)
    assert "input 0 has shape (8, 3, 8, 8), the plan (4, 3, 8, 8)" in str(info.value)
    with pytest.raises(anode_plan.PlanMismatchError, match="input 0 has dtype torch.float32, the plan torch.float64"):
        anode_plan.compile(copy.deepcopy(model).float(), example_inputs=(torch.randn(4, 3, 8, 8),), plan=path)


def _skip_a_stage(data):
    region = next(op for op in data["schedule"] if isinstance(op, dict))
    region["body"] = region["body"][1:]


def _run_a_stage_twice(data):
    data["schedule"].insert(1, data["schedule"][0])


@pytest.mark.parametrize("corrupt", [_skip_a_stage, _run_a_stage_twice])
def test_a_schedule_that_would_break_the_gradients_is_rejected(setup, tmp_path, corrupt):
    model, *_, plan = setup
    path = _edit(_save(plan, tmp_path), corrupt)
    for load in (lambda: anode_plan.load_plan(path), lambda: anode_plan.compile(copy.deepcopy(model), plan=path)):
        with pytest.raises(anode_plan.PlanInvariantError) as info:
            load()
        assert str(path) in str(info.value) and "does not compute the gradients" in str(info.value)


def test_a_budget_edited_below_the_schedules_peak_is_rejected(setup, tmp_path):
    *_, plan = setup
    path = _edit(_save(plan, tmp_path), lambda data: data.update(budget_bytes=plan.predicted_peak_bytes - 1))
    with pytest.raises(anode_plan.PlanOverBudgetError, match="above the budget"):
        anode_plan.load_plan(path)


def test_edited_measurements_do_not_fool_compile(setup, tmp_path):
    """Shrink every recorded tape and lower the budget to match: the file alone looks fine, the model does not."""
    model, *_, plan = setup
    store_all = anode_plan.plan_for_budget(plan.chain, setup[2], (setup[1],), HUGE, planners.StoreAll())

    def shrink(data):
        for stage in data["chain"]["stages"]:
            stage["tape_bytes"] = 0
            stage["fwd_taped_bytes"] = stage["fwd_untaped_bytes"]
        data["budget_bytes"] = store_all.predicted_peak_bytes - 1

    path = _edit(_save(store_all, tmp_path), shrink)
    anode_plan.load_plan(path)  # consistent with its own (false) numbers
    with pytest.raises(anode_plan.PlanOverBudgetError):
        anode_plan.compile(copy.deepcopy(model), plan=path)


@pytest.mark.parametrize("text, reason", [
    ("schedule: [0, 1\n", "not valid YAML"),
    ("- just\n- a list\n", "the file must be a mapping"),
    ("format: something else\n", "not an anode-plan plan file"),
    ("!!python/object/apply:os.system ['echo owned']\n", "a YAML tag that safe loading refuses"),
])
def test_files_that_are_not_plans_are_rejected(tmp_path, text, reason):
    path = tmp_path / "plan.yaml"
    path.write_text(text)
    with pytest.raises(anode_plan.PlanFileError, match=reason):
        anode_plan.load_plan(path)


@pytest.mark.parametrize("change, reason", [
    (lambda d: d.update(version=2), "version 2, but this anode-plan reads version 1"),
    (lambda d: d.pop("fingerprint"), "fingerprint is missing"),
    (lambda d: d.update(budget_bytes="30MB"), "budget_bytes must be an int >= 1, got '30MB'"),
    (lambda d: d["schedule"].__setitem__(0, "zero"), r"schedule\[0\] must be a stage number"),
    (lambda d: d["schedule"].__setitem__(0, True), r"schedule\[0\] must be a stage number"),
    (lambda d: d["inputs"][0].update(dtype="torch.float99"), "not a torch dtype"),
    (lambda d: d["chain"]["stages"][0].update(tape_bytes=-5), r"chain.stages\[0\].tape_bytes must be an int >= 0"),
    (lambda d: d["chain"]["stages"][0].update(colour="red"), "unknown fields"),
    (lambda d: d["chain"]["value_bytes"].pop(), "the recorded chain is inconsistent"),
    (lambda d: d["chain"]["stages"][1].update(param_ids=[999]), "beyond the"),
])
def test_hand_edits_with_wrong_types_are_rejected_with_the_field(setup, tmp_path, change, reason):
    *_, plan = setup
    path = _edit(_save(plan, tmp_path), change)
    with pytest.raises(anode_plan.PlanFileError, match=reason):
        anode_plan.load_plan(path)


def test_a_missing_file_is_a_plan_file_error(tmp_path):
    with pytest.raises(anode_plan.PlanFileError, match="cannot read plan file"):
        anode_plan.compile(_model(), plan=tmp_path / "nope.yaml")


def test_structure_digest_ignores_sizes_but_not_structure():
    x = torch.randn(2, 3, 8, 8)
    digest = lambda model: anode_plan.plans.serialise.structure_digest(anode_plan.trace_model(model, (x,)))  # noqa: E731
    base = digest(ode_resnet(width=4, stages=2, nt=3))
    assert base == digest(ode_resnet(width=8, stages=2, nt=3, seed=1))
    assert base != digest(ode_resnet(width=4, stages=2, nt=4))
    assert base != digest(ode_resnet(width=4, stages=2, nt=3, method="rk4"))


def test_a_schedule_nested_two_hundred_regions_deep_round_trips(tmp_path):
    """Revolve's tree with one snapshot nests nt-1 regions deep (planners cap trees at 100; a file may not); PyYAML recurses per level."""
    nt = 200
    chain = planners.Chain(tuple(planners.Stage(f"block@{i}", 100, 100, 50, block=0, step=i) for i in range(nt)),
                           blocks=(planners.Block("block", 0, nt),), name="deep chain")
    schedule = planners.Schedule(planners.revolve_ops(0, nt, 1), planner="revolve", description="one snapshot")
    assert planners.nesting_depth(schedule.ops) == nt - 1
    plan = anode_plan.Plan(schedule=schedule, chain=chain, budget_bytes=HUGE,
                           simulation=planners.simulate_plan(chain, schedule, timeline=True),
                           input_shapes=((4, 100),), input_dtypes=("torch.float32",), fingerprint="0" * 16)
    assert anode_plan.load_plan(_save(plan, tmp_path)) == plan
