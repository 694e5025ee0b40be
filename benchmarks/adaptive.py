"""Adaptive solves: ``anode_plan.odeint`` against torchdiffeq's ``odeint`` (backprop) and ``odeint_adjoint``.

    python benchmarks/adaptive.py             # print the section
    python benchmarks/adaptive.py --write     # and replace it in benchmarks/RESULTS.md

Two vector fields, float32 on the CPU, dopri5 at the same rtol/atol for every solver:

* the ODE block of torchdiffeq's own MNIST example (``examples/odenet_mnist.py``: GroupNorm-ReLU-
  ConcatConv-GroupNorm-ReLU-ConcatConv-GroupNorm, 64 channels, 7x7, batch 32);
* a small MLP field (64 → 256 → 64, tanh, batch 256).

One training step each (``loss = out.square().mean(); loss.backward()``): the allocator's peak
(``anode_plan.measure_peak_memory``), the step time (median of interleaved rounds, as a ratio
to backprop's), the function evaluations of forward and backward, and the gradient error
(max over parameters of max|g − g*| / max|g*|) against float64 backprop through torchdiffeq's
``odeint`` at the same tolerances. anode-plan runs at the adjoint's measured peak as its budget,
and without a budget (every accepted state kept, no recompute).
"""

from __future__ import annotations

import copy
import statistics
import sys
import time

import torch
from torch import nn

from _common import (RESULTS_PATH, gradients, log, machine_info, max_relative_grad_error, mib, publish_section,
                     quick_or_write_args, source_version)

import anode_plan

import torchdiffeq

SECTION_TITLE = "## Adaptive solves: online checkpointing against backprop and the adjoint"
RTOL, ATOL = 1e-5, 1e-7


class ConcatConv2d(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self._layer = nn.Conv2d(dim_in + 1, dim_out, 3, 1, 1)

    def forward(self, t, x):
        return self._layer(torch.cat([torch.ones_like(x[:, :1, :, :]) * t, x], 1))


class ODEfunc(nn.Module):
    """torchdiffeq's examples/odenet_mnist.py ODEfunc, with an evaluation counter."""

    def __init__(self, dim=64):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = (nn.GroupNorm(min(32, dim), dim) for _ in range(3))
        self.relu = nn.ReLU(inplace=True)
        self.conv1, self.conv2 = ConcatConv2d(dim, dim), ConcatConv2d(dim, dim)
        self.nfe = 0

    def forward(self, t, x):
        self.nfe += 1
        out = self.conv1(t, self.relu(self.norm1(x)))
        return self.norm3(self.conv2(t, self.relu(self.norm2(out))))


class MLPField(nn.Module):
    def __init__(self, width=64, hidden=256):
        super().__init__()
        self.a, self.b = nn.Linear(width, hidden), nn.Linear(hidden, width)
        self.nfe = 0

    def forward(self, t, y):
        self.nfe += 1
        return self.b(torch.tanh(self.a(y)))


def problems():
    torch.manual_seed(0)
    conv = ODEfunc()
    x_conv = torch.randn(32, 64, 7, 7, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    mlp = MLPField()
    x_mlp = torch.randn(256, 64, generator=torch.Generator().manual_seed(2))
    return {"ODE-net block (torchdiffeq MNIST example)": (conv, x_conv), "MLP field": (mlp, x_mlp)}


def solvers(budget: int | None):
    t = torch.tensor([0.0, 1.0])
    return {
        "torchdiffeq odeint (backprop)": lambda f, y: torchdiffeq.odeint(f, y, t, rtol=RTOL, atol=ATOL)[-1],
        "torchdiffeq odeint_adjoint": lambda f, y: torchdiffeq.odeint_adjoint(f, y, t, rtol=RTOL, atol=ATOL)[-1],
        "anode_plan.odeint, no budget": lambda f, y: anode_plan.odeint(f, y, t, rtol=RTOL, atol=ATOL)[-1],
        "anode_plan.odeint at the adjoint's peak": lambda f, y: anode_plan.odeint(
            f, y, t, rtol=RTOL, atol=ATOL, options={"memory_budget": budget})[-1],
    }


def step(solve, field, y) -> None:
    solve(field, y).square().mean().backward()


def run(name: str, field: nn.Module, y: torch.Tensor, rounds: int) -> list[str]:
    reference = copy.deepcopy(field).double()
    step(lambda f, x: torchdiffeq.odeint(f, x, torch.tensor([0.0, 1.0], dtype=torch.float64), rtol=RTOL,
                                         atol=ATOL)[-1], reference, y.double())
    exact = gradients(reference.parameters())
    adjoint = solvers(None)["torchdiffeq odeint_adjoint"]
    step(adjoint, field, y)  # warm up
    field.zero_grad(set_to_none=True)
    adjoint_peak = anode_plan.measure_peak_memory(lambda: step(adjoint, field, y)).peak_bytes
    field.zero_grad(set_to_none=True)
    table = solvers(adjoint_peak)
    rows: dict[str, dict] = {}
    for label, solve in table.items():
        step(solve, field, y)  # warm up (anode-plan measures a step's costs once)
        field.zero_grad(set_to_none=True)
        field.nfe = 0
        peak = anode_plan.measure_peak_memory(lambda: step(solve, field, y)).peak_bytes
        nfe = field.nfe
        got = gradients(field.parameters())
        field.zero_grad(set_to_none=True)
        error = max_relative_grad_error(got, exact)
        rows[label] = {"peak": peak, "nfe": nfe, "error": error, "times": []}
        log(f"{name} / {label}: peak {mib(peak)} MiB, nfe {nfe}, error {error:.2e}")
    for _ in range(rounds):
        for label, solve in table.items():
            began = time.perf_counter()
            step(solve, field, y)
            rows[label]["times"].append(time.perf_counter() - began)
            field.zero_grad(set_to_none=True)
    base = statistics.median(rows["torchdiffeq odeint (backprop)"]["times"])
    lines = []
    for label, row in rows.items():
        ratio = statistics.median(row["times"]) / base
        lines.append(f"| {name} | {label} | {mib(row['peak'])} | {ratio:.2f}x | {row['nfe']} | {row['error']:.1e} |")
    ours, theirs = rows["anode_plan.odeint at the adjoint's peak"], rows["torchdiffeq odeint_adjoint"]
    met = ours["peak"] <= adjoint_peak and statistics.median(ours["times"]) < statistics.median(theirs["times"])
    lines.append(f"| {name} | headline: exact gradients at or below the adjoint's peak, in less time | "
                 f"{'met' if met else 'not met'} | | | |")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = quick_or_write_args(argv, __doc__, "fewer timing rounds")
    began = time.time()
    rounds = 2 if args.quick else 5
    rows = [row for name, (field, y) in problems().items() for row in run(name, field, y, rounds)]
    section = "\n".join([
        SECTION_TITLE,
        "",
        f"`python benchmarks/adaptive.py --write` ({source_version()}; {machine_info(2)}; {time.time() - began:.0f} s).",
        f"dopri5, rtol {RTOL}, atol {ATOL}, t = [0, 1], float32; one step `odeint(...)[-1].square().mean().backward()`. "
        "Peak: the allocator's. Time: median of "
        f"{rounds} interleaved rounds over backprop's. Evaluations: forward and backward. Error: against float64 "
        "backprop through torchdiffeq's odeint (so it includes float32 round-off and the float64 solve's own steps).",
        "",
        "| field | solver | peak (MiB) | step time | function evaluations | gradient error |",
        "|---|---|---|---|---|---|",
        *rows,
    ])
    publish_section(section, RESULTS_PATH if args.write else None, time.time() - began)
    return 0


if __name__ == "__main__":
    sys.exit(main())
