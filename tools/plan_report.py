#!/usr/bin/env python
"""Inspect the schedule anode-plan picks for a model and a memory budget.

    python tools/plan_report.py                                   # the default ODE-ResNet, a few budgets
    python tools/plan_report.py --model ode_resnet --kwargs nt=16 method=rk4 --batch 64 --budget 300MB
    python tools/plan_report.py --budget 100MB 200MB 400MB        # a sweep: the trade-off curve
    python tools/plan_report.py --model mypkg.nets:build --input-shape 3,64,64 --budget 1GiB
"""

from __future__ import annotations

import argparse

import torch

from _common import input_shape, load_model, parse_kwargs

import anode_plan
import planners
from planners import format_bytes

PLANNERS = {
    "landmarks": planners.Landmarks,
    "store-all": planners.StoreAll,
    "anode": planners.Anode,
    "revolve": planners.Revolve,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ode_resnet",
                        help=f"a model name ({', '.join(sorted(__import__('models').MODELS))}) or package.module:factory")
    parser.add_argument("--kwargs", nargs="*", default=[], metavar="KEY=VALUE", help="arguments of the model factory")
    parser.add_argument("--batch", type=int, default=32, help="batch size of the example input (default 32)")
    parser.add_argument("--input-shape", help="input shape without the batch, e.g. 3,32,32 (default: the model's)")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--budget", nargs="*", default=[],
                        help="one or more budgets (4GB, 512MiB, bytes); default: the landmarks and points between")
    parser.add_argument("--planner", choices=sorted(PLANNERS), default="landmarks")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    kwargs = parse_kwargs(args.kwargs)
    model, label = load_model(args.model, kwargs)
    dtype = getattr(torch, args.dtype)
    model = model.to(dtype)
    x = torch.randn(input_shape(args.model, args.batch, args.input_shape, kwargs), dtype=dtype)
    traced = anode_plan.trace_model(model, (x,))
    chain = anode_plan.lower_to_chain(model, traced, (x,))
    planner = PLANNERS[args.planner]()
    marks = anode_plan.find_landmarks(chain, planner)
    budgets = args.budget or _default_budgets(marks)
    print(f"model {label} {kwargs or ''}, input {tuple(x.shape)} {args.dtype}, {len(chain.stages)} stages, "
          f"{len(chain.blocks)} ODE blocks")
    curve = []
    for budget in budgets:
        print()
        try:
            plan = anode_plan.plan_for_budget(chain, traced, (x,), budget, planner)
        except anode_plan.InfeasibleBudgetError as error:
            print(f"budget {budget}: infeasible. {error}")
            curve.append((budget, None, None))
            continue
        print(anode_plan.format_report(plan, marks))
        curve.append((budget, plan.simulation.peak_bytes, plan.simulation.recompute_overhead))
    if len(curve) > 1:
        print("\ntrade-off: budget -> predicted peak, recompute overhead")
        for budget, peak, overhead in curve:
            shown = format_bytes(budget) if isinstance(budget, int) else budget
            print(f"  {shown:>12}  " + ("infeasible" if peak is None else
                                        f"{format_bytes(peak):>12}  {overhead:+7.1%}"))
    return 0


def _default_budgets(marks: anode_plan.BudgetLandmarks) -> list[int]:
    low, high = marks.minimum_bytes, marks.store_all_bytes
    points = {low, marks.anode_bytes, high, (low + marks.anode_bytes) // 2, (marks.anode_bytes + high) // 2}
    return sorted(points, reverse=True)


if __name__ == "__main__":
    raise SystemExit(main())
