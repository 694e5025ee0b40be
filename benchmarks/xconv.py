"""XConv sketches as a planner option: memory, time and error against the number of probes, and training.

    python benchmarks/xconv.py             # print the section
    python benchmarks/xconv.py --quick     # a smoke run
    python benchmarks/xconv.py --write     # and replace it in benchmarks/RESULTS.md

An ODE-ResNet (``models.ode_resnet``, GroupNorm, float32, on the CPU) on one-channel 16x16
images of the project's synthetic classification set (``gradient_accuracy.synthetic_images``).

1. **Against the number of probes.** For ps = 2 ... 64, compiled with
   ``approximate=anode_plan.XConv(probes=ps)``: the lowest budget the planner reaches
   (``InfeasibleBudgetError.min_budget_bytes``), and at one budget below the exact
   store-all peak (where the exact schedule must recompute) the allocator's peak of a
   training step, its time as a ratio to plain autograd measured in the same round
   (median of interleaved rounds), how many layers the plan sketches, and their relative
   weight-gradient error (the plan's measured figure, and the one in the training step
   against exact autograd on the same batch).
2. **Training.** From the same initial weights over the same batches: plain autograd,
   anode-plan exact at the budget of part 1, and anode-plan with ``XConv(probes=16)`` at
   a budget only sketches reach (between the two minima). Loss every few steps and
   held-out accuracy at the end.

Peaks are the allocator's (``anode_plan.measure_peak_memory``: the CPU allocator's events
under the profiler, kernel workspaces included).
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from _common import (RESULTS_PATH, log, machine_info, mib, publish_section, quick_or_write_args, source_version,
                     train_step)
from gradient_accuracy import synthetic_images

import anode_plan
from models import ode_resnet

SECTION_TITLE = "## XConv sketches: memory, time and error against probes, and training"
PROBES = (2, 4, 8, 16, 32, 64)


class TanhField(nn.Module):
    """dz/dt = tanh(conv3x3(z)): the convolution alone keeps its input (tanh keeps its output)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, t, z):
        return torch.tanh(self.conv(z))


def build(kind: str, nt: int = 4) -> nn.Module:
    """``"norm"``: the ANODE ODE-ResNet (f = conv-GroupNorm-ReLU-conv-GroupNorm); ``"tanh"``: one with f = tanh(conv)."""
    if kind == "norm":
        return ode_resnet(width=8, stages=2, nt=nt, method="rk2", norm="group", in_channels=1, num_classes=10, seed=0)
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), anode_plan.ODEBlock(TanhField(16), nt=nt, method="rk4"),
                         nn.Conv2d(16, 32, 3, stride=2, padding=1), anode_plan.ODEBlock(TanhField(32), nt=nt, method="rk4"),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


MODELS = {"norm": "`ode_resnet(width=8, stages=2, nt=4, method='rk2', norm='group', in_channels=1)`",
          "tanh": "conv(1→16) · ODEBlock(tanh(conv3x3), nt=4, rk4) · strided conv(16→32) · ODEBlock(tanh(conv3x3), "
                  "nt=4, rk4) · pool · linear"}


def minimum(model, x, approximate=None) -> int:
    try:
        anode_plan.compile(model, 1, (x,), approximate=approximate)
    except anode_plan.InfeasibleBudgetError as error:
        return error.min_budget_bytes
    raise RuntimeError("a 1-byte budget was accepted")


def step_peak(forward, model, x, y) -> int:
    forward(x)
    model.zero_grad(set_to_none=True)
    peak = anode_plan.measure_peak_memory(lambda: train_step(forward, x, y)).peak_bytes
    model.zero_grad(set_to_none=True)
    return peak


def weight_errors(model, compiled, x, y) -> float:
    """The largest relative weight-gradient error ‖ĝ - g‖/‖g‖ over the sketched layers, in one training step."""
    grads = []
    for forward in (model, compiled):
        model.zero_grad(set_to_none=True)
        train_step(forward, x, y)
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    model.zero_grad(set_to_none=True)
    return max((float((grads[1][f"{layer.layer}.weight"] - grads[0][f"{layer.layer}.weight"]).norm()
                      / grads[0][f"{layer.layer}.weight"].norm()) for layer in compiled.plan.approximated),
               default=0.0)


def timing(model, forwards: dict, x, y, rounds: int) -> dict[str, float]:
    """Median over interleaved rounds of each forward's training-step time over plain autograd's."""
    ratios: dict[str, list[float]] = {name: [] for name in forwards}
    for _ in range(rounds):
        began = time.perf_counter()
        train_step(model, x, y)
        plain = time.perf_counter() - began
        for name, forward in forwards.items():
            began = time.perf_counter()
            train_step(forward, x, y)
            ratios[name].append((time.perf_counter() - began) / plain)
        model.zero_grad(set_to_none=True)
    return {name: statistics.median(values) for name, values in ratios.items()}


def probes_table(kind: str, batch: int, rounds: int) -> tuple[list[str], int, int, int]:
    model = build(kind)
    x, y = synthetic_images(batch, 16, seed=1)
    store_all = anode_plan.compile(model, "1GB", (x,)).plan.predicted_peak_bytes
    budget = int(store_all * 0.6)
    exact_min = minimum(model, x)
    exact_min_peak = step_peak(anode_plan.compile(model, exact_min, (x,)), model, x, y)
    exact = anode_plan.compile(model, budget, (x,))
    rows, forwards, compiled_by = [], {"exact": exact}, {}
    for probes in PROBES:
        config = anode_plan.XConv(probes=probes)
        compiled = anode_plan.compile(model, budget, (x,), approximate=config)
        low = minimum(model, x, config)
        compiled_by[probes] = (compiled, low, step_peak(anode_plan.compile(model, low, (x,), approximate=config),
                                                        model, x, y))
        forwards[f"ps={probes}"] = compiled
        log(f"probes {probes}: {len(compiled.plan.approximated)} layers sketched")
    times = timing(model, forwards, x, y, rounds)
    rows.append(f"| {kind} | exact (no XConv) | {mib(store_all)} | {mib(budget)} | {mib(exact_min)} | "
                f"{mib(exact_min_peak)} | {mib(step_peak(exact, model, x, y))} | "
                f"{exact.plan.recompute_overhead:+.0%} | {exact.plan.predicted_slowdown:.2f}x | {times['exact']:.2f}x | "
                "0 | 0 | 0 |")
    for probes, (compiled, low, low_peak) in compiled_by.items():
        plan = compiled.plan
        measured_error = max((layer.relative_error for layer in plan.approximated), default=0.0)
        rows.append(f"| {kind} | XConv(probes={probes}) | {mib(store_all)} | {mib(budget)} | {mib(low)} | "
                    f"{mib(low_peak)} | {mib(step_peak(compiled, model, x, y))} | "
                    f"{plan.recompute_overhead:+.0%} | {plan.predicted_slowdown:.2f}x | {times[f'ps={probes}']:.2f}x | "
                    f"{len(plan.approximated)} | "
                    f"{measured_error:.2f} | {weight_errors(model, compiled, x, y):.2f} |")
    return rows, store_all, budget, exact_min


def training(kind: str, batch: int, steps: int, every: int) -> tuple[list[str], list[str], int, int]:
    train_x, train_y = synthetic_images(batch * steps, 16, seed=2)
    test_x, test_y = synthetic_images(1000, 16, seed=3)
    example = train_x[:batch]
    probe_model = build(kind)
    config = anode_plan.XConv(probes=16)
    exact_min, sketched_min = minimum(probe_model, example), minimum(probe_model, example, config)
    budget = (exact_min + sketched_min) // 2 if sketched_min < exact_min else exact_min
    runs: dict[str, list[float]] = {}
    accuracy: dict[str, float] = {}
    notes = []
    for name in ("plain autograd", "anode-plan exact at its minimum", f"anode-plan XConv(probes=16) at {mib(budget)} MiB"):
        model = build(kind)
        if name.startswith("plain"):
            forward = model
        elif "exact" in name:
            forward = anode_plan.compile(model, exact_min, (example,))
        else:
            forward = anode_plan.compile(model, budget, (example,), approximate=config)
            notes.append(", ".join(f"{layer.layer} (error {layer.relative_error:.2f})"
                                   for layer in forward.plan.approximated))
            notes.append(f"its first step's measured peak {mib(step_peak(forward, model, example, train_y[:batch]))} "
                         "MiB")
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        losses = []
        for step in range(steps):
            xb, yb = train_x[step * batch:(step + 1) * batch], train_y[step * batch:(step + 1) * batch]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(forward(xb), yb)
            loss.backward()
            opt.step()
            losses.append(float(loss))
        with torch.no_grad():
            model.eval()
            accuracy[name] = float((model(test_x).argmax(1) == test_y).float().mean())
        runs[name] = losses
        log(f"{name}: final loss {losses[-1]:.3f}, accuracy {accuracy[name]:.1%}")
    header = "| step | " + " | ".join(runs) + " |"
    lines = [header, "|" + "---|" * (len(runs) + 1)]
    for step in list(range(0, steps, every)) + [steps - 1]:
        window = slice(max(0, step - every + 1), step + 1)
        lines.append(f"| {step + 1} | " + " | ".join(f"{statistics.mean(v[window]):.3f}" for v in runs.values()) + " |")
    lines.append("| held-out accuracy (1,000 images) | " + " | ".join(f"{accuracy[n]:.1%}" for n in runs) + " |")
    return lines, notes, budget, exact_min


def main(argv: list[str] | None = None) -> int:
    args = quick_or_write_args(argv, __doc__, "fewer rounds and training steps")
    began = time.time()
    batch = 32
    rounds, steps, every = (3, 20, 5) if args.quick else (9, 300, 50)
    rows = [row for kind in MODELS for row in probes_table(kind, batch, rounds)[0]]
    curve, notes, train_budget, exact_min = training("tanh", batch, steps, every)
    section = "\n".join([
        SECTION_TITLE,
        "",
        f"`python benchmarks/xconv.py --write` ({source_version()}; {machine_info(2)}; {time.time() - began:.0f} s).",
        f"Models, float32, batch {batch} of 1x16x16 synthetic images: `norm` = {MODELS['norm']}; `tanh` = "
        f"{MODELS['tanh']}. The budget of the table is 60% of the exact store-all peak. Lowest budget: the smallest "
        "`compile` accepts. Peaks: the allocator's, one training step (store-all's is the plan's prediction). "
        f"Time: median over {rounds} "
        "interleaved rounds of the step time over plain autograd's; predicted: `plan.predicted_slowdown`, the plan's "
        "predicted step over plain autograd's, in the milliseconds calibration measured. Errors: the largest over the sketched layers of "
        "‖ĝ − g‖/‖g‖ for the weight gradient, as the plan measured it on the example batch (random output gradient, "
        "3 draws of the probes) and as one training step with the cross-entropy loss gives it against exact autograd.",
        "",
        "| model | compile | store-all, predicted (MiB) | budget (MiB) | lowest budget (MiB) | peak at the lowest "
        "budget (MiB) | peak at the budget (MiB) | recompute | predicted step time | step time | layers sketched | error (plan) | error "
        "(training step) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Training the `tanh` model, {steps} SGD steps (lr 0.05, momentum 0.9), mean loss over the last {every} steps; the XConv run's "
        f"budget {mib(train_budget)} MiB is below the exact minimum {mib(exact_min)} MiB. Sketched: "
        f"{'; '.join(notes) or 'nothing'}.",
        "",
        *curve,
    ])
    publish_section(section, RESULTS_PATH if args.write else None, time.time() - began)
    return 0


if __name__ == "__main__":
    sys.exit(main())
