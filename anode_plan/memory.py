"""Measure the peak memory of a training step, the quantity ``memory_budget`` bounds.

The peak is the most memory allocated at any moment of the measured call *on top of*
what was allocated when it started: parameters, optimizer state and the input batch
do not count; activations, recompute temporaries and gradients do.

* On CUDA it reads the caching allocator: ``max_memory_allocated()`` minus
  ``memory_allocated()`` at the start, after ``reset_peak_memory_stats()``.
* On the CPU, where PyTorch keeps no allocator statistics, :class:`LiveStorageTracker`
  counts the bytes of every tensor storage created during the call and subtracts them
  when the storage is freed (a weakref finalizer on the storage object). Workspace a
  single kernel allocates and frees internally is not seen; everything that outlives
  an operator is.

The tracker works on fake tensors too, which is how :mod:`anode_plan.costmodel`
measures a stage's memory without running the real model. On fake CUDA tensors it counts
each storage in the CUDA allocator's 512-byte blocks (:func:`allocated_bytes`).
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


CUDA_BLOCK_BYTES = 512
"""The CUDA caching allocator rounds every block up to a multiple of this (``kMinBlockSize``
in PyTorch's ``c10/cuda/CUDACachingAllocator.cpp``: "all sizes are rounded to at least 512
bytes"), and its allocated-bytes statistic, which ``max_memory_allocated`` reads, counts
the rounded block. Taken from the source; no GPU run has checked it yet."""


def allocation_bytes(nbytes: int, device: torch.device) -> int:
    """What an allocator on ``device`` charges for ``nbytes``: rounded up to 512 on CUDA."""
    if device.type == "cuda" and nbytes:
        return -(-nbytes // CUDA_BLOCK_BYTES) * CUDA_BLOCK_BYTES
    return nbytes


def allocated_bytes(tensor: torch.Tensor) -> int:
    """What the allocator of ``tensor``'s device charges for its storage.

    ``nbytes()`` of the storage, rounded up to :data:`CUDA_BLOCK_BYTES` on CUDA, so a
    tracker on fake CUDA tensors counts what ``torch.cuda.max_memory_allocated`` would.
    """
    return allocation_bytes(tensor.untyped_storage().nbytes(), tensor.device)


class LiveStorageTracker(TorchDispatchMode):
    """Count the bytes of live tensor storages created while the mode is active.

    ``live_bytes`` is what is live now, ``peak_bytes`` the most since the last
    :meth:`reset_peak`. Views, in-place results and outputs that share an input's
    storage are not new allocations and are not counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._live: dict[int, int] = {}

    def reset_peak(self) -> int:
        self.peak_bytes = self.live_bytes
        return self.live_bytes

    def _freed(self, key: int) -> None:
        self.live_bytes -= self._live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage._cdata
            if key in inputs or key in self._live:
                continue
            nbytes = allocated_bytes(tensor)
            self._live[key] = nbytes
            self.live_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
            weakref.finalize(storage, self._freed, key)
        return out


@dataclass(frozen=True)
class MemoryMeasurement:
    """The measured peak of one call and how long it took.

    Attributes:
        peak_bytes: the most memory allocated at once on top of what was allocated at
            the start of the call.
        time_ms: wall-clock time of the call (with tracking overhead on the CPU).
        method: ``"cuda-allocator"`` or ``"cpu-storage-tracking"``.
    """

    peak_bytes: int
    time_ms: float
    method: str


def measure_peak_memory(fn: Callable[[], Any], *, device: str | torch.device = "cpu") -> MemoryMeasurement:
    """Call ``fn()`` once and measure its peak memory on ``device``.

    Use it on one training step, e.g.
    ``measure_peak_memory(lambda: loss_fn(compiled(x), y).backward())``, and compare the
    result with the ``memory_budget`` given to :func:`anode_plan.compile`. On CUDA the
    call is synchronised before and after.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        began = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        elapsed = (time.perf_counter() - began) * 1e3
        return MemoryMeasurement(torch.cuda.max_memory_allocated(device) - start, elapsed, "cuda-allocator")
    tracker = LiveStorageTracker()
    began = time.perf_counter()
    with tracker:
        fn()
    elapsed = (time.perf_counter() - began) * 1e3
    return MemoryMeasurement(tracker.peak_bytes, elapsed, "cpu-storage-tracking")
