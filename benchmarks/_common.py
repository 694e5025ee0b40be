"""Plumbing shared by the benchmark scripts: machine description, gradients, memory, RESULTS.md sections.

Private to ``benchmarks/``; may change without notice. Import it as ``from _common import ...``
(a script's own directory is first on ``sys.path``).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

import anode_plan
from models import ode_resnet

MIB = 2**20
RESULTS_PATH = Path(__file__).resolve().parent / "RESULTS.md"


TRAIN_STEP_FORM = ("`outputs = model(x); loss = F.cross_entropy(outputs, y); loss.backward()`, the PyTorch "
                   "tutorials' loop: the output and the loss stay referenced until backward ends")


def train_step(forward: Callable, x: torch.Tensor, y: torch.Tensor) -> None:
    """One training step, forward to backward, as the PyTorch tutorials write it (:data:`TRAIN_STEP_FORM`).

    The caller keeps the output and the loss (for accuracy and logging) until backward ends,
    which is what anode-plan's predicted peak assumes; a loop that drops the output
    before backward peaks lower by up to the output's size.
    """
    outputs = forward(x)
    loss = F.cross_entropy(outputs, y)
    loss.backward()


def log(message: str) -> None:
    """Progress goes to stderr, so stdout stays the markdown report."""
    print(message, file=sys.stderr, flush=True)


def mib(num_bytes: float) -> str:
    return f"{num_bytes / MIB:.2f}"


def percent(fraction: float) -> str:
    """``0.318 -> '31.8%'``."""
    return f"{100 * fraction:.1f}%"


def machine_info(num_threads: int) -> str:
    return (f"{platform.machine()} CPU, os.cpu_count()={os.cpu_count()}, torch.set_num_threads({num_threads}), "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, torch {torch.__version__}, "
            f"Python {platform.python_version()}, {platform.system()}")


def source_version() -> str:
    """The commit the library was run from, and whether its files outside benchmarks/ had local changes."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--", ".", ":!benchmarks"], cwd=root,
                                capture_output=True, text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    if not status:
        return f"commit {commit}"
    return f"commit {commit} plus local changes to {len(status)} files outside benchmarks/"


def load_average() -> tuple[float, float, float]:
    try:
        return os.getloadavg()
    except OSError:  # pragma: no cover - not on every platform
        return (float("nan"),) * 3


# --- gradients -----------------------------------------------------------------------------------------------------

def clear_grads(params: Iterable[nn.Parameter]) -> None:
    for param in params:
        param.grad = None


def gradients(params: Iterable[nn.Parameter]) -> list[torch.Tensor]:
    """Detached copies of the parameters' gradients (zeros where a parameter got none)."""
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]


def max_relative_grad_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    """max over parameters of max|got - want| / max|want|, computed in float64.

    Each parameter is scaled by its own largest reference gradient, so a small layer's
    gradient counts as much as a large one's. A parameter whose reference gradient is
    zero everywhere contributes its absolute error.
    """
    worst = 0.0
    for g, w in zip(got, want, strict=True):
        g, w = g.detach().to(torch.float64).cpu(), w.detach().to(torch.float64).cpu()
        scale = float(w.abs().max())
        diff = float((g - w).abs().max())
        worst = max(worst, diff / scale if scale else diff)
    return worst


# --- memory --------------------------------------------------------------------------------------------------------

def min_budget_bytes(model: nn.Module, x: torch.Tensor, **compile_options) -> int:
    """The smallest budget ``anode_plan.compile`` accepts for ``model`` on ``x`` (from its error at 1 byte)."""
    try:
        anode_plan.compile(model, 1, (x,), **compile_options)
    except anode_plan.InfeasibleBudgetError as error:
        return error.min_budget_bytes
    raise RuntimeError("anode_plan.compile(memory_budget=1) succeeded; the minimum budget cannot be read from "
                       "the error")


def kept_after_forward_bytes(forward: Callable[[], torch.Tensor], *, device: str | torch.device = "cpu") -> int:
    """Bytes allocated by ``forward()`` that are still allocated when it returns (what is kept for backward).

    ``forward`` returns the loss; it is then dropped, which frees the graph. Measured by
    the allocator (:class:`anode_plan.AllocatorMeter`): a mark right after ``forward()``
    returns, and what was allocated at that mark on top of the window's start. Like
    :func:`anode_plan.measure_peak_memory`, it sees inside ``torch.compile``d code.
    """
    with anode_plan.AllocatorMeter(device) as meter:
        loss = forward()
        after_forward = meter.mark()
        del loss
    return meter.allocated_bytes(after_forward)


# --- timing --------------------------------------------------------------------------------------------------------

def timed_ms(fn: Callable[[], object]) -> float:
    began = time.perf_counter()
    fn()
    return (time.perf_counter() - began) * 1e3


# --- RESULTS.md ----------------------------------------------------------------------------------------------------

def write_section(path: Path, title: str, section: str) -> None:
    """Replace the section whose heading line is ``title`` in ``path`` (up to the next ``## ``), or append it.

    Re-reads the file right before writing, so sections other scripts wrote in the
    meantime are kept.
    """
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == title), None)
    if start is None:
        new_text = text.rstrip("\n") + "\n\n" + section
    else:
        stop = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        new_text = "\n".join(lines[:start] + section.rstrip("\n").splitlines() + [""] + lines[stop:])
    path.write_text(new_text.rstrip("\n") + "\n")


def quick_or_write_args(argv: list[str] | None, doc: str, quick_help: str) -> argparse.Namespace:
    """``--quick`` (a smoke run: ``quick_help`` says what is cut) and ``--write`` (replace the section in
    RESULTS.md), for a script whose first docstring line is its description; the run uses 2 threads."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--write", action="store_true", help=f"replace the section in {RESULTS_PATH.name}")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    return args


def publish_section(section: str, write_path: Path | None, runtime_s: float) -> None:
    """Print ``section`` (the markdown report, to stdout) and, given a path, write it there under its heading line."""
    print(section)
    if write_path is not None:
        title = section.splitlines()[0]
        write_section(write_path, title, section)
        log(f"wrote the section {title[3:]!r} of {write_path}")
    log(f"done in {runtime_s:.0f} s")


@dataclass(frozen=True)
class ModelRunConfig:
    """The ODE-ResNet, batch and timing settings every measured benchmark shares."""

    width: int = 16
    stages: int = 3
    nt: int = 4
    method: str = "rk2"
    norm: str = "batch"
    batch_size: int = 32
    seed: int = 0
    repeats: int = 7
    num_threads: int = 2

    def model_call(self) -> str:
        """The model factory call, for the reports."""
        return (f"ode_resnet(width={self.width}, stages={self.stages}, nt={self.nt}, method={self.method!r}, "
                f"norm={self.norm!r}, seed={self.seed})")

    def build_model(self) -> nn.Module:
        """The ODE-ResNet of :meth:`model_call`, in train mode."""
        return ode_resnet(width=self.width, stages=self.stages, nt=self.nt, method=self.method, norm=self.norm,
                          seed=self.seed).train()
