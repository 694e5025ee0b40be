"""The compiled mode's unit against ``torch.compile`` of the same model: step time side by side, many rounds.

``benchmarks/compare.py`` times every method in 7 rotated rounds, on a shared machine
where step-time ratios within about ±8% are not distinguishable. This benchmark asks one
narrower question more precisely: at each ``activation_memory_budget`` fraction, does
``anode_plan.compile(model, <that fraction's peak>, (x,), backend="inductor")`` run as fast
as ``torch.compile`` of the model at that fraction? It compiles both (each in a cold Inductor
cache of its own), checks the plan is a unit at the peer's fraction (else says which), then
times ``ROUNDS`` training steps of each, alternating, and reports the median of the paired
ratios with its interquartile range, and both peaks as the allocator counts them.

    PYTHONPATH=. python benchmarks/unit_parity.py [--write]
"""

from __future__ import annotations

import argparse
import atexit
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

import anode_plan

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_PATH, load_average, machine_info, mib, source_version, write_section  # noqa: E402
from _compare_report import CompareConfig  # noqa: E402
from models import example_input_shape  # noqa: E402

ROUNDS = 20
FRACTIONS = (1.0, 0.5)
TITLE = "## The compiled mode's unit against torch.compile, paired (CPU)"


def _cold_cache() -> str:
    directory = tempfile.mkdtemp(prefix="anode-plan-unit-parity-")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return directory


def run(threads: int) -> list[str]:
    torch.set_num_threads(threads)
    config = CompareConfig()
    model = config.build_model()
    generator = torch.Generator().manual_seed(config.seed)
    x = torch.randn(example_input_shape("ode_resnet", config.batch_size), generator=generator)
    y = torch.randint(0, 10, (config.batch_size,), generator=generator)

    def step(forward) -> float:
        began = time.perf_counter()
        F.cross_entropy(forward(x), y).backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - began

    rows = []
    for k, fraction in enumerate(FRACTIONS):
        def peer_forward(inputs, _model=model):
            return _model(inputs)
        peer_forward.__code__ = peer_forward.__code__.replace(co_name=f"unit_parity_peer_{k}")
        peer = torch.compile(peer_forward)
        with temporary_cache_dir(_cold_cache()), torch._functorch.config.patch(activation_memory_budget=fraction):
            peer_compile = step(peer)
        peer_peak = anode_plan.measure_peak_memory(lambda: F.cross_entropy(peer(x), y).backward()).peak_bytes
        model.zero_grad(set_to_none=True)
        with temporary_cache_dir(_cold_cache()):
            began = time.perf_counter()
            compiled = anode_plan.compile(model, peer_peak, (x,), backend="inductor")
            ours_compile = time.perf_counter() - began
        step(compiled)
        ours_peak = anode_plan.measure_peak_memory(lambda: F.cross_entropy(compiled(x), y).backward()).peak_bytes
        model.zero_grad(set_to_none=True)
        for forward in (peer, compiled, peer, compiled):  # warm both
            step(forward)
        ours, theirs = [], []
        for _ in range(ROUNDS):
            ours.append(step(compiled))
            theirs.append(step(peer))
        ratios = [a / b for a, b in zip(ours, theirs)]
        low, median, high = statistics.quantiles(ratios, n=4)
        unit = compiled.plan.unit
        rows.append(f"| {fraction:g} | {mib(peer_peak)} | {peer_compile:.0f} | "
                     f"{'one unit at ' + format(unit.fraction, 'g') if unit else compiled.plan.schedule.description} | "
                     f"{mib(ours_peak)} | {'yes' if ours_peak <= peer_peak else '**NO**'} | {ours_compile:.0f} | "
                     f"{1e3 * statistics.median(theirs):.1f} | {1e3 * statistics.median(ours):.1f} | "
                     f"{statistics.median(ratios):.3f} ({low:.3f}-{high:.3f}) |")
        print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write", nargs="?", type=Path, const=RESULTS_PATH, default=None, metavar="PATH")
    args = parser.parse_args(argv)
    began, load_before = time.perf_counter(), load_average()
    rows = run(args.threads)
    lines = [
        TITLE,
        "",
        f"**Measured:** `torch.compile` of `{CompareConfig().model_call()}` (batch {CompareConfig().batch_size}) at "
        f"activation_memory_budget {', '.join(f'{f:g}' for f in FRACTIONS)}, and `anode_plan.compile(..., "
        f"backend=\"inductor\")` at each one's allocator peak; {ROUNDS} training steps of each, alternating.",
        "",
        f"Written by `benchmarks/unit_parity.py` in {time.perf_counter() - began:.0f} s.",
        "",
        f"- Machine: {machine_info(args.threads)}; 1-minute load average {load_before[0]:.2f} before, "
        f"{load_average()[0]:.2f} after.",
        f"- Library: {source_version()}.",
        "- Each side's first compile in a cold Inductor cache of its own; peaks by `anode_plan.measure_peak_memory` "
        "(the allocator's events, replayed); ratio: the median of the per-step ratios (anode-plan over the peer) "
        "with its interquartile range.",
        "",
        "| fraction | peer peak (MiB) | peer compile (s) | anode-plan plan | its peak (MiB) | held | its first compile "
        "(s) | peer step (ms) | anode-plan step (ms) | anode-plan / peer (IQR) |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    print("\n".join(lines))
    if args.write is not None:
        write_section(args.write, TITLE, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
