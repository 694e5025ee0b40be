#!/usr/bin/env python
"""The main job: plan an ODE-ResNet under a memory budget, print the plan, and train it.

    python tools/demo.py                       # ODE-ResNet, batch 32, a budget 40% of the way from minimum to store-all
    python tools/demo.py --budget 30MB --steps 20

It trains on random data (no download), checks every step's loss against plain
autograd on an identical copy of the model, and measures the peak memory of a step.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch.nn import functional as F

from _common import ROOT  # noqa: F401  (puts the checkout on sys.path)

import anode_plan
from models import ode_resnet
from planners import format_bytes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", help="memory budget, e.g. 30MB or 64MiB (default: 40%% from minimum to store-all)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--nt", type=int, default=4)
    parser.add_argument("--method", default="rk2", choices=["euler", "rk2", "rk4"])
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = ode_resnet(width=16, stages=3, nt=args.nt, method=args.method, norm="batch", seed=0)
    reference = copy.deepcopy(model)
    x = torch.randn(args.batch, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch,))

    traced = anode_plan.trace_model(model, (x,))
    chain = anode_plan.lower_to_chain(model, traced, (x,))
    marks = anode_plan.find_landmarks(chain)
    budget = args.budget or marks.minimum_bytes + (marks.store_all_bytes - marks.minimum_bytes) * 2 // 5
    compiled = anode_plan.compile(model, budget, (x,))
    print(anode_plan.format_report(compiled.plan, marks))

    opt = torch.optim.SGD(compiled.parameters(), lr=0.05, momentum=0.9)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
    print(f"\ntraining {args.steps} steps on random data (batch {args.batch}); plain autograd on a copy alongside")
    print(f"  {'step':>4}  {'loss (planned)':>14}  {'loss (plain autograd)':>21}  {'time (planned)':>14}  "
          f"{'time (plain autograd)':>21}")
    for step in range(args.steps):
        began = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(compiled(x), y)
        loss.backward()
        opt.step()
        step_ms = (time.perf_counter() - began) * 1e3
        began = time.perf_counter()
        ref_opt.zero_grad(set_to_none=True)
        ref_loss = F.cross_entropy(reference(x), y)
        ref_loss.backward()
        ref_opt.step()
        ref_ms = (time.perf_counter() - began) * 1e3
        print(f"  {step:>4}  {loss.item():>14.6f}  {ref_loss.item():>21.6f}  {step_ms:>11.1f} ms  {ref_ms:>18.1f} ms")

    same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    print(f"parameters and BatchNorm statistics after training identical to plain autograd: {same}")

    opt.zero_grad(set_to_none=True)
    measured = anode_plan.measure_peak_memory(lambda: F.cross_entropy(compiled(x), y).backward())
    budget_bytes = compiled.plan.budget_bytes
    predicted = compiled.plan.predicted_peak_bytes
    print(f"\nmeasured peak of a training step: {format_bytes(measured.peak_bytes)} "
          f"(budget {format_bytes(budget_bytes)}, predicted {format_bytes(predicted)}, "
          f"{'within' if measured.peak_bytes <= budget_bytes else 'OVER'} budget; "
          f"prediction off by {(predicted - measured.peak_bytes) / measured.peak_bytes:+.1%})")
    return 0 if measured.peak_bytes <= budget_bytes else 1


if __name__ == "__main__":
    raise SystemExit(main())
