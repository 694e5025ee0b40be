"""The memory a device has free, and what measuring a chain at a batch allocates: where a batch search must stop.

Measuring a chain runs the model at that batch for real, and allocates more than a training
step under a tight plan (:mod:`anode_plan.analysis.batch` gives the numbers), so
:func:`anode_plan.analysis.batch.search_batch_size` meters
each measurement (:func:`metered`) and compares what the next one needs with what is free
(:func:`available_memory`) before allocating it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable

import torch

from anode_plan.memory import AllocatorMeter
from planners import Chain, format_bytes


@dataclass(frozen=True)
class MachineMemory:
    """The memory a device has free now, and where the number comes from (``source``)."""

    available_bytes: int
    device: str
    source: str


@dataclass(frozen=True)
class MachineMemoryStop:
    """Where :func:`search_batch_size` stopped short of the budget: ``batch`` needs more memory than the device has.

    Predicted on the measured chains' line, before anything at ``batch`` was allocated:
    ``measuring_bytes``, the most that measuring its chain would allocate at once (on the
    line through what measuring the smaller batches did; ``None`` where it cannot be
    metered), and ``step_peak_bytes`` + ``input_bytes``, what a training step under its
    plan needs (the plan's peak, or where no plan fits the budget the smallest budget one
    needs, plus the batch of inputs, which a budget excludes). ``needed_bytes``, the larger,
    is over ``memory.available_bytes``. ``largest_batch_within`` is the largest batch
    predicted to fit the memory (at least the largest confirmed). Where it is larger,
    ``budget_within_bytes`` is the smallest budget the batch below it needs: a search
    under at most that budget answers below ``largest_batch_within``, and the batch past
    its answer that it measures to confirm it fits the memory too.
    """

    batch: int
    step_peak_bytes: int
    input_bytes: int
    measuring_bytes: int | None
    memory: MachineMemory
    largest_batch_within: int
    budget_within_bytes: int | None

    @property
    def needed_bytes(self) -> int:
        return max(self.step_peak_bytes + self.input_bytes, self.measuring_bytes or 0)

    def describe(self) -> str:
        """``batch 30511 needs 28.39 GiB to measure and 15.26 GiB (...) to train, and the cpu has 20.80 GiB ...``."""
        measure = "" if self.measuring_bytes is None else f"{format_bytes(self.measuring_bytes)} to measure and "
        return (f"batch {self.batch} needs {measure}{format_bytes(self.step_peak_bytes + self.input_bytes)} to train "
                f"(predicted step peak {format_bytes(self.step_peak_bytes)} + input batch "
                f"{format_bytes(self.input_bytes)}), and the {self.memory.device} has "
                f"{format_bytes(self.memory.available_bytes)} available ({self.memory.source})")

    def advice(self) -> str:
        """How to search within this machine: the budget that its largest batch within memory needs."""
        if self.budget_within_bytes is None:
            return f"no batch above {self.largest_batch_within} fits this machine's memory"
        return (f"batches up to about {self.largest_batch_within} fit this machine's memory; a budget up to "
                f"{format_bytes(self.budget_within_bytes)} ({self.budget_within_bytes} bytes, the least batch "
                f"{self.largest_batch_within - 1} needs) keeps the search within it")


def available_memory(device: torch.device | str) -> MachineMemory | None:
    """The memory ``device`` has free now, or ``None`` where it cannot be read.

    CPU: ``MemAvailable`` in ``/proc/meminfo`` on Linux (free memory plus what the kernel
    can reclaim), else the free pages of ``os.sysconf`` (which leaves out the page cache,
    so it reads low). CUDA: ``torch.cuda.mem_get_info``'s free bytes plus what PyTorch's
    caching allocator holds reserved but unused.
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return MachineMemory(free + cached, str(device), "torch.cuda.mem_get_info, with the allocator's free cache")
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return MachineMemory(int(line.split()[1]) * 1024, "cpu", "MemAvailable in /proc/meminfo")
    except OSError:
        pass
    try:
        pages, page_bytes = os.sysconf("SC_AVPHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None
    return MachineMemory(pages * page_bytes, "cpu", "free pages, os.sysconf('SC_AVPHYS_PAGES')")


def metered(measure: Callable[[], Chain], device: torch.device) -> tuple[Chain, int | None]:
    """``measure()``, and the most memory it allocated at once on ``device``, as the allocator counts it
    (:class:`~anode_plan.memory.AllocatorMeter`, which the cost model's own meters nest inside); ``None`` on a
    device without one."""
    if device.type not in ("cpu", "cuda"):
        return measure(), None
    with AllocatorMeter(device) as meter:
        chain = measure()
    return chain, meter.peak_bytes()


def on_line(values: dict[int, int], batch: int) -> int:
    """The value at ``batch`` on the line through the two nearest batches of ``values`` (in proportion, with one)."""
    nearest = sorted(values, key=lambda b: (abs(b - batch), -b))[:2]
    if len(nearest) == 1:
        return math.ceil(values[nearest[0]] * batch / nearest[0])
    (a, value_a), (b, value_b) = ((n, values[n]) for n in nearest)
    return max(0, math.ceil(value_a + (value_b - value_a) * (batch - a) / (b - a)))
