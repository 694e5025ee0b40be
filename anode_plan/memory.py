"""Measure the peak memory of a training step as the allocator counts it: what ``memory_budget`` bounds.

The peak is the most memory allocated at any moment of the measured call *on top of*
what was allocated when it started: parameters, optimizer state and the input batch
do not count; activations, recompute temporaries, gradients and the buffers a kernel
allocates and frees inside itself (convolution workspaces, cuDNN, internal copies) do.

* On CUDA it reads the caching allocator: ``max_memory_allocated()`` minus
  ``memory_allocated()`` at the start, after ``reset_peak_memory_stats()``.
* On the CPU, where PyTorch keeps no allocator statistics, :class:`AllocatorMeter`
  records every allocation and free of c10's CPU allocator with ``torch.profiler``
  (``profile_memory=True``) and replays them in time order, pairing each free with an
  allocation made inside the window. That is the CPU counterpart of
  ``max_memory_allocated``: it sees memory a kernel takes for the length of one call.

What the CPU meter does not see: allocations made on OpenMP worker threads inside an
ATen parallel region. The profiler's memory hook is thread-local and ATen does not carry
it into its intra-op workers; measured on torch 2.14.1 with two threads, of eight 4 MiB
buffers allocated in an ``at::parallel_for`` body, the four made on the calling thread
were recorded and the four made on the worker were not (``tests/test_memory.py``
documents the experiment). The kernels of the test models allocate on the calling thread, so their steps are seen
whole. What they allocate there depends on the thread count all the same: oneDNN's
convolutions take a scratch buffer per thread (plain autograd's step on the tiny ODE-net
of ``tests/factories.py``, batch 4 at 8×8: 144,492 bytes with one thread and 152,380 with
two, on an AVX-512 CPU; 125,468 and 152,380 under ``ONEDNN_MAX_CPU_ISA=AVX2``), so a plan
holds for the thread count it was measured at, and a compiled model plans again when
it changes (:mod:`anode_plan.compiler.plan_cache`). Memory outside c10's
allocator (malloc inside a third-party library) is not counted either, on any device.

:class:`LiveStorageTracker`, a ``TorchDispatchMode`` that counts tensor storages, cannot
see inside a kernel: it is the cost model's tool on fake tensors, where no kernel runs,
and never the measure of a real step. On fake CUDA tensors it counts each storage in
the CUDA allocator's 512-byte blocks (:func:`allocated_bytes`).

Background, papers and test values: ``docs/algorithms.md`` §7.
"""

from __future__ import annotations

import os
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

    Use it on fake tensors (the cost model does). On real tensors it misses what a
    kernel allocates inside itself, so it is no measure of a budget: use
    :func:`measure_peak_memory` for that.

    ``random_ops`` counts the operators run that draw from a default random generator
    (those tagged ``nondeterministic_seeded``: dropout's ``bernoulli_``, ``rand_like``,
    ...). A draw from a generator passed explicitly (``torch.randn(..., generator=g)``, as
    XConv's probes are drawn) is not counted: replaying a re-run's random numbers restores
    the default generators only, and such a draw needs no replay.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self.random_ops = 0
        self._live: dict[int, int] = {}

    def reset_peak(self) -> int:
        self.peak_bytes = self.live_bytes
        return self.live_bytes

    def _freed(self, key: int) -> None:
        self.live_bytes -= self._live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if torch.Tag.nondeterministic_seeded in func.tags and (kwargs or {}).get("generator") is None:
            self.random_ops += 1
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


_MARK = "anode_plan::mark#"
# Ops that only allocate: a peak inside them is charged to the kernel that called them.
_ALLOCATING_OPS = frozenset({"aten::empty", "aten::empty_like", "aten::empty_strided", "aten::new_empty",
                             "aten::new_empty_strided", "aten::resize_", "aten::zeros", "aten::zeros_like",
                             "aten::new_zeros", "aten::ones", "aten::ones_like", "aten::full", "aten::full_like"})


def _quiet_kineto() -> None:
    """Kineto logs two lines per profiling session (and a CUDA probe error without a GPU) unless told not to.

    Read once, when kineto starts; a level the user set is left alone.
    """
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")


def _kernel_path(outer: str | None, name: str) -> str:
    """The kernel to name for an allocation inside op ``name`` within ``outer``.

    The outermost ATen op (what the model called: ``aten::conv2d``,
    ``aten::convolution_backward``), and in parentheses the innermost one that is not a
    plain allocation, where that differs (``aten::mkldnn_convolution``).
    """
    if outer is None:
        return name
    top = outer.split(" (", 1)[0]
    if name in _ALLOCATING_OPS or name == top:
        return outer
    return f"{top} ({name})"


def _allocation_events(roots: list) -> list[tuple[int, str | None, int, str | None, int]]:
    """The CPU allocations and frees, and the marks, in a profiler event tree:
    ``(time, mark name or None, bytes, kernel, pointer)``, in the tree's order."""
    found = []
    stack = [(node, None) for node in reversed(roots)]
    while stack:
        node, kernel = stack.pop()
        fields = node.extra_fields
        if isinstance(fields, torch._C._profiler._ExtraFields_Allocation):
            if fields.device.type == "cpu":
                found.append((node.start_time_ns, None, fields.alloc_size, kernel, fields.ptr))
            continue
        name = node.name
        if name.startswith(_MARK):
            found.append((node.start_time_ns, name, 0, None, 0))
            continue
        if name.startswith("aten::"):
            kernel = _kernel_path(kernel, name)
        stack.extend((child, kernel) for child in reversed(node.children))
    return found


class AllocatorMeter:
    """Record what one device's allocator allocates while active; read peaks between marks afterwards.

    Use it to measure parts of one run against each other (the cost model's calibration
    measures each phase of a stage this way); :func:`measure_peak_memory` is the simple
    form for one call::

        with AllocatorMeter("cpu") as meter:
            forward_done = meter.mark()
            ...
        meter.peak_bytes()                      # the whole window
        meter.peak_bytes(forward_done)          # from the mark to the end
        meter.kernel_at_peak(forward_done)      # "aten::convolution_backward", say

    ``peak_bytes(start, end)`` is the most allocated at any moment between the two marks,
    on top of what was allocated at ``start``. On the CPU the numbers exist only once the
    ``with`` block has ended (the profiler's events are read then); on CUDA each mark
    synchronises the device and reads the caching allocator's statistics. Meters nest:
    one entered inside another (a training step that plans again, and so calibrates,
    while it is measured) suspends the outer one's profiling session and hands its
    events back when it ends; on CUDA, each reset of the device's peak statistic first
    folds the peak so far into every meter active on the device. So each sees
    everything in its window. See the module docstring for what the CPU meter cannot see.
    """

    _active: list["AllocatorMeter"] = []  # the CPU meters entered and not yet left, innermost last
    _active_cuda: list["AllocatorMeter"] = []  # the CUDA meters entered and not yet left

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self._marks: list[tuple[int, int]] = []  # CUDA, per mark: (allocated then, most allocated since the last)
        self._count = 0
        self._events: list[tuple[int, int, int, str | None, int]] = []  # CPU: (time, mark or -1, bytes, kernel, ptr)
        self._kernels: list[str | None] = []  # CPU: the kernel of each allocation event, for kernel_at_peak
        self._levels: list[int] = []           # CPU: bytes allocated after each allocation event
        self._positions: list[int] = []        # CPU: per mark, the number of allocation events before it
        self._profile: Any = None
        self._peak_before_reset = 0  # CUDA: the most allocated since this meter's last mark, across others' resets
        self._done = False
        self._name = f"{_MARK}{id(self):x}#"

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def __enter__(self) -> "AllocatorMeter":
        if self.is_cuda:
            torch.cuda.synchronize(self.device)
            self._active_cuda.append(self)
            self._reset_cuda_peak()
        else:
            if self._active:
                self._active[-1]._stop_session()
            self._active.append(self)
            self._start_session()
        self.mark()
        return self

    def _start_session(self) -> None:
        _quiet_kineto()
        self._profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
        self._profile.__enter__()

    def _stop_session(self) -> None:
        self._profile.__exit__(None, None, None)
        self._events += _allocation_events(self._profile.profiler.kineto_results.experimental_event_tree())
        self._profile = None

    def mark(self) -> int:
        """Note this moment; returns the mark's number for :meth:`peak_bytes`."""
        index = self._count
        self._count += 1
        if self.is_cuda:
            torch.cuda.synchronize(self.device)
            peak = max(self._peak_before_reset, torch.cuda.max_memory_allocated(self.device))
            self._marks.append((torch.cuda.memory_allocated(self.device), peak))
            self._reset_cuda_peak()
            self._peak_before_reset = 0
        else:
            with torch.profiler.record_function(f"{self._name}{index}"):
                pass
        return index

    def _reset_cuda_peak(self) -> None:
        """Reset the device's peak statistic, keeping the peak so far for every meter active on the device."""
        peak = torch.cuda.max_memory_allocated(self.device)
        for meter in self._active_cuda:
            if meter.device == self.device:
                meter._peak_before_reset = max(meter._peak_before_reset, peak)
        torch.cuda.reset_peak_memory_stats(self.device)

    def __exit__(self, *exc: Any) -> None:
        self.mark()
        self._done = True
        if self.is_cuda:
            self._active_cuda.remove(self)
            return
        self._stop_session()
        self._active.pop()
        if self._active:  # the outer meter resumes, and sees what this one saw
            outer = self._active[-1]
            outer._events += self._events
            outer._start_session()
        if exc[0] is None:
            self._replay()

    def _replay(self) -> None:
        """Replay the allocation events in time order: live bytes after each, this meter's marks placed."""
        live, table = 0, {}
        marks: dict[int, int] = {}
        for _, mark, nbytes, kernel, pointer in sorted(self._events, key=lambda event: event[0]):
            if mark is not None:
                if mark.startswith(self._name):
                    marks[int(mark[len(self._name):])] = len(self._levels)
                continue
            if nbytes > 0:
                table[pointer] = nbytes
                live += nbytes
            elif pointer in table:  # a free of what was allocated in the window
                live -= table.pop(pointer)
            else:
                continue
            self._levels.append(live)
            self._kernels.append(kernel)
        self._positions = [marks[index] for index in range(self._count)]

    def _level_before(self, position: int) -> int:
        return self._levels[position - 1] if position else 0

    def peak_bytes(self, start: int = 0, end: int | None = None) -> int:
        """The most allocated at once between marks ``start`` and ``end`` (default: the whole window),
        on top of what was allocated at ``start``."""
        if not self._done:
            raise RuntimeError("AllocatorMeter: read peaks after the with block has ended")
        end = self._count - 1 if end is None else end
        if self.is_cuda:
            base = self._marks[start][0]
            return max((peak for _, peak in self._marks[start + 1:end + 1]), default=base) - base
        first, last = self._positions[start], self._positions[end]
        base = self._level_before(first)
        return max(self._levels[first:last], default=base) - base

    def allocated_bytes(self, mark: int) -> int:
        """What was allocated at ``mark``, on top of what was allocated when the meter started."""
        if not self._done:
            raise RuntimeError("AllocatorMeter: read allocations after the with block has ended")
        if self.is_cuda:
            return self._marks[mark][0] - self._marks[0][0]
        return self._level_before(self._positions[mark])

    def kernel_at_peak(self, start: int = 0, end: int | None = None) -> str | None:
        """The ATen op whose allocation made the peak of :meth:`peak_bytes` (CPU only; ``None`` on CUDA)."""
        if self.is_cuda or not self._done:
            return None
        end = self._count - 1 if end is None else end
        first, last = self._positions[start], self._positions[end]
        if first == last:
            return None
        window = self._levels[first:last]
        return self._kernels[first + window.index(max(window))]


@dataclass(frozen=True)
class MemoryMeasurement:
    """The measured peak of one call and how long it took.

    Attributes:
        peak_bytes: the most memory the allocator had allocated at once on top of what
            was allocated at the start of the call.
        time_ms: wall-clock time of the call (with the profiler's overhead on the CPU:
            time steps apart from measuring them).
        method: ``"cuda-allocator"`` or ``"cpu-allocator"``.
        kernel: on the CPU, the ATen op whose allocation made the peak.
    """

    peak_bytes: int
    time_ms: float
    method: str
    kernel: str | None = None


def measure_peak_memory(fn: Callable[[], Any], *, device: str | torch.device = "cpu") -> MemoryMeasurement:
    """Call ``fn()`` once and measure its peak memory on ``device``, as the allocator counts it.

    Use it on one training step, e.g.
    ``measure_peak_memory(lambda: loss_fn(compiled(x), y).backward())``, and compare the
    result with the ``memory_budget`` given to :func:`anode_plan.compile`. On CUDA it is
    ``max_memory_allocated()`` minus what was allocated at the start (the call is
    synchronised before and after); on the CPU the profiler's allocation events, replayed
    (:class:`AllocatorMeter`). Kernel workspaces count on both.
    """
    meter = AllocatorMeter(device)
    with meter:
        began = time.perf_counter()
        fn()
        if meter.is_cuda:
            torch.cuda.synchronize(meter.device)
        elapsed = (time.perf_counter() - began) * 1e3
    method = "cuda-allocator" if meter.is_cuda else "cpu-allocator"
    return MemoryMeasurement(meter.peak_bytes(), elapsed, method, meter.kernel_at_peak())
