"""examples/train_cifar10.py, run as a user runs it: a subprocess on FakeData, its JSON log and checkpoints read back.

Budgets are the landmarks of the same model and batch measured here (the allocator's numbers
on this machine), never a constant: the script must hold each of them, measured.
"""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys

import pytest
import torch

import anode_plan
from models import ode_resnet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "train_cifar10.py")
BATCH = 16
MODEL_FLAGS = ["--width", "8", "--nt", "2", "--method", "euler", "--batch-size", str(BATCH), "--workers", "0",
               "--no-progress"]


def run_script(*flags: str, expect_rc: int = 0) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, SCRIPT, *MODEL_FLAGS, *flags], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == expect_rc, f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return done


def read_log(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def landmarks() -> anode_plan.BudgetLandmarks:
    """The budget landmarks of the script's model (width 8, nt 2, euler, BatchNorm) for a batch of BATCH images."""
    model = ode_resnet(width=8, nt=2, method="euler", norm="batch", seed=0).train()
    x = torch.randn(BATCH, 3, 32, 32)
    traced = anode_plan.trace_model(model, (x,))
    return anode_plan.find_landmarks(anode_plan.lower_to_chain(model, traced, (x,)))


def between(marks: anode_plan.BudgetLandmarks, fraction: float) -> int:
    return marks.minimum_bytes + int((marks.store_all_bytes - marks.minimum_bytes) * fraction)


def test_memorises_a_fixed_fake_set_within_the_budget(tmp_path, landmarks):
    """Random labels on a fixed set of 64 images, no augmentation: only memorising lowers the training loss."""
    budget = between(landmarks, 0.25)
    log, checkpoint = tmp_path / "log.jsonl", tmp_path / "ckpt.pt"
    done = run_script("--fake-data", "64", "--epochs", "6", "--lr", "0.05", "--milestones", "4", "--no-augment",
                      "--budget", str(budget), "--json-log", str(log), "--checkpoint", str(checkpoint))
    records = read_log(log)

    assert [r["epoch"] for r in records] == list(range(1, 7))
    first, last = records[0], records[-1]
    assert last["train_loss"] < 0.75 * first["train_loss"], [r["train_loss"] for r in records]
    assert last["train_acc"] > first["train_acc"] + 0.2, [r["train_acc"] for r in records]
    assert [r["lr"] for r in records] == pytest.approx([0.05] * 4 + [0.005] * 2)
    for r in records:
        assert r["budget_bytes"] == budget
        assert r["peak_method"] == "cpu-allocator"
        assert 0 < r["peak_bytes"] <= budget, r
        assert r["step_ms"] > 0 and r["timed_steps"] == 64 // BATCH - 1
    # the report printed at start is the plan's, and every epoch line states the measured peak against the budget
    assert f"anode-plan: ODEResNet (batch {BATCH}), budget " in done.stdout and f"({budget} bytes)" in done.stdout
    epoch_lines = [line for line in done.stdout.splitlines() if line.startswith("epoch ")]
    assert len(epoch_lines) == 6 and all(", within;" in line and " ms  (" in line for line in epoch_lines)

    saved = torch.load(checkpoint, weights_only=False)
    assert saved["epoch"] == 6 and saved["best_acc"] == max(r["test_acc"] for r in records)
    assert set(saved) >= {"model", "optimizer", "scheduler", "epoch", "best_acc"}
    assert saved["scheduler"]["last_epoch"] == 6


def test_resume_continues_as_an_uninterrupted_run(tmp_path, landmarks):
    """Two epochs straight, against one epoch and a resume to two: the same losses, lr schedule and weights."""
    budget = str(between(landmarks, 0.5))
    common = ["--fake-data", "64", "--lr", "0.05", "--milestones", "1", "--budget", budget]
    straight_log, straight_ckpt = tmp_path / "straight.jsonl", tmp_path / "straight.pt"
    run_script(*common, "--epochs", "2", "--json-log", str(straight_log), "--checkpoint", str(straight_ckpt))
    log, ckpt = tmp_path / "resumed.jsonl", tmp_path / "resumed.pt"
    run_script(*common, "--epochs", "1", "--json-log", str(log), "--checkpoint", str(ckpt))
    assert torch.load(ckpt, weights_only=False)["epoch"] == 1
    resumed = run_script(*common, "--epochs", "2", "--json-log", str(log), "--checkpoint", str(ckpt),
                         "--resume", str(ckpt))

    assert "continuing at epoch 2 with lr 0.005" in resumed.stdout
    assert [line.split()[1] for line in resumed.stdout.splitlines() if line.startswith("epoch ")] == ["2/2"]
    straight, interrupted = read_log(straight_log), read_log(log)
    assert [r["epoch"] for r in interrupted] == [1, 2]
    assert [r["lr"] for r in interrupted] == pytest.approx([0.05, 0.005])
    for a, b in zip(straight, interrupted):
        assert (a["train_loss"], a["train_acc"], a["test_loss"]) == (b["train_loss"], b["train_acc"], b["test_loss"])
        assert b["peak_bytes"] <= b["budget_bytes"]
    a, b = torch.load(straight_ckpt, weights_only=False), torch.load(ckpt, weights_only=False)
    assert b["epoch"] == 2 and b["scheduler"] == a["scheduler"]
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name


def script_main():
    """The script's main(argv), to call in this process (the error paths: no interpreter startup to pay)."""
    return runpy.run_path(SCRIPT, run_name="train_cifar10")["main"]


def test_budget_below_the_minimum_is_one_clear_line(tmp_path, landmarks, capsys):
    """The planner's InfeasibleBudgetError, with the smallest budget, as one line and exit status 2."""
    main = script_main()
    rc = main([*MODEL_FLAGS, "--fake-data", "32", "--epochs", "1", "--budget", str(landmarks.minimum_bytes // 2),
               "--checkpoint", str(tmp_path / "never.pt")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("InfeasibleBudgetError: ") and err.count("\n") == 1
    assert "Give at least" in err
    assert not (tmp_path / "never.pt").exists()


def test_resume_refuses_another_model(tmp_path, capsys):
    """The error names each flag that differs from the checkpoint's, before any data is read or anything planned."""
    checkpoint = tmp_path / "other.pt"
    torch.save({"config": {"width": 16, "stages": 3, "blocks_per_stage": 1, "nt": 2, "method": "euler",
                           "norm": "batch", "seed": 0, "schedule": "cosine"}, "epoch": 1}, checkpoint)
    main = script_main()
    assert main([*MODEL_FLAGS, "--fake-data", "32", "--epochs", "2", "--resume", str(checkpoint)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("TrainScriptError: ") and err.count("\n") == 1
    assert "--width 16 saved, 8 given; --schedule cosine saved, step given" in err


def test_help_says_what_is_measured_and_which_schedule(capsys):
    with pytest.raises(SystemExit) as exit_:
        script_main()(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert exit_.value.code == 0
    assert "MultiStepLR" in out and "CosineAnnealingLR" in out and "anode_plan.measure_peak_memory" in out
    assert "40% of the way from the smallest feasible budget to store-all" in out
