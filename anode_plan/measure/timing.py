"""Timing runs on the device: what the planners' milliseconds are made of.

Rotor (Beaumont et al., arXiv 1911.13214) and Rockmate (Zhao et al., ICML 2023) time
every stage on the device, repeated, and plan on the medians; so does this. A
:class:`Stopwatch` times the phases of one repeated run: on a GPU with CUDA events
(recorded on the stream, read after one synchronisation per repeat), on the CPU with
``time.perf_counter_ns``. Garbage collection is off while timing (a collection inside a
phase would land in one sample), the run is made once untimed first (lazy
initialisation, allocator growth, cuDNN autotuning), and it repeats until it has at
least :data:`MIN_REPEATS` samples and :data:`MIN_TIMED_MS` of them, at most
:data:`MAX_REPEATS`: a stage of 50 microseconds gets more samples than one of 50 ms.
Each phase's cost is its median; its noise the interquartile range over the median.
Timing runs with the intra-op thread count in force, which is the one training uses (a
compiled model plans again when it changes: :mod:`anode_plan.plan_key`).
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

MIN_REPEATS = 5
MAX_REPEATS = 25
MIN_TIMED_MS = 5.0


@dataclass(frozen=True)
class PhaseTimes:
    """The median milliseconds of each timed phase of a run, and their relative spread.

    ``noise``: per phase, the interquartile range of its samples over their median.
    """

    ms: dict[str, float]
    noise: dict[str, float]
    repeats: int

    def get(self, phase: str, default: float = 0.0) -> float:
        return self.ms.get(phase, default)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Garbage collection off for the block (and back on after it, if it was on)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class Stopwatch:
    """Marks phase boundaries of one repeat on ``device``; :meth:`lap` closes a phase under a label."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self._marks: list[tuple[str, object, object]] = []
        self._start: object = None

    def _now(self) -> object:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter_ns()

    def start(self) -> None:
        """Start (or restart) the phase that the next :meth:`lap` closes."""
        self._start = self._now()

    def lap(self, label: str) -> None:
        """Close the phase begun by :meth:`start` (or the previous lap) as ``label``; the next one starts now."""
        end = self._now()
        self._marks.append((label, self._start, end))
        self._start = end

    def read(self) -> dict[str, float]:
        """Milliseconds per label of this repeat (summed, if a label closed twice); clears the marks."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        found: dict[str, float] = {}
        for label, start, end in self._marks:
            ms = start.elapsed_time(end) if self.cuda else (end - start) / 1e6  # type: ignore[union-attr,operator]
            found[label] = found.get(label, 0.0) + ms
        self._marks = []
        return found


def time_phases(run: Callable[[Stopwatch], None], device: torch.device, *, min_repeats: int = MIN_REPEATS,
                max_repeats: int = MAX_REPEATS, min_timed_ms: float = MIN_TIMED_MS, warm: bool = False) -> PhaseTimes:
    """Time ``run(stopwatch)``, which marks its phases with ``stopwatch.start()`` and ``stopwatch.lap(label)``.

    One untimed run first (none if the caller has just run it: ``warm``), then repeats
    (see the module docstring); returns each phase's median.
    """
    watch = Stopwatch(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if not warm:
        run(watch)
        watch.read()
    samples: dict[str, list[float]] = {}
    repeats = 0
    with gc_paused():
        while repeats < max_repeats:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            run(watch)
            for label, ms in watch.read().items():
                samples.setdefault(label, []).append(ms)
            repeats += 1
            timed = sum(sum(values) for values in samples.values())
            if repeats >= min_repeats and timed >= min_timed_ms:
                break
    medians = {label: statistics.median(values) for label, values in samples.items()}
    return PhaseTimes(medians, {label: relative_spread(values) for label, values in samples.items()}, repeats)


def relative_spread(values: list[float]) -> float:
    """The interquartile range of ``values`` over their median (0 for fewer than 4 values or a zero median)."""
    median = statistics.median(values)
    if len(values) < 4 or median <= 0:
        return 0.0
    low, _, high = statistics.quantiles(values, n=4)
    return (high - low) / median
