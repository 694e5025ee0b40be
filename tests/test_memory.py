"""The allocator meter, on cases whose answer is known without it.

``measure_peak_memory`` is what every budget claim rests on, so it is checked against
allocations whose sizes are fixed by construction: an internal copy no dispatch-mode
tracker can see, a ``torch.empty`` that is never written (no page is touched, so RSS
would not see it either), and a peak that exists only while a checkpoint re-runs.
"""

from __future__ import annotations

import contextlib
import shutil

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import anode_plan
from anode_plan import AllocatorMeter, LiveStorageTracker

MIB = 2**20


def test_an_internal_copy_counts_which_the_storage_tracker_misses():
    """``mm`` of a doubly strided matrix copies it inside the kernel: output and copy are 16 MiB each."""
    a = torch.randn(2048, 4096)[:, ::2]
    b = torch.randn(2048, 2048)
    measured = anode_plan.measure_peak_memory(lambda: a @ b)
    with LiveStorageTracker() as tracker:
        a @ b
    assert tracker.peak_bytes == 16 * MIB
    assert measured.peak_bytes == 32 * MIB
    assert measured.method == "cpu-allocator"
    assert measured.kernel.startswith("aten::matmul")


def test_an_unwritten_empty_counts_in_full():
    measured = anode_plan.measure_peak_memory(lambda: torch.empty(10_000_000))
    assert measured.peak_bytes == 40_000_000
    assert measured.kernel == "aten::empty"


def test_memory_allocated_before_the_call_and_freed_in_it_does_not_count():
    """Frees of blocks allocated before the window are not paired with anything in it."""
    held = [torch.ones(MIB)]
    measured = anode_plan.measure_peak_memory(lambda: held.clear() or torch.ones(MIB // 4))
    assert measured.peak_bytes == MIB


def test_a_peak_that_exists_only_while_a_checkpoint_reruns():
    """The function allocates 8 MiB only when its recompute context is active, i.e. in backward."""
    rerunning = []

    @contextlib.contextmanager
    def recompute():
        rerunning.append(True)
        yield
        rerunning.pop()

    def f(x):
        if rerunning:
            scratch = torch.empty(2 * MIB)  # 8 MiB, freed at once
            del scratch
        return x.sin()

    x = torch.randn(256, requires_grad=True)  # 1 KiB tensors: everything else is small
    forward = anode_plan.measure_peak_memory(
        lambda: checkpoint(f, x, use_reentrant=False, context_fn=lambda: (contextlib.nullcontext(), recompute())))
    step = anode_plan.measure_peak_memory(
        lambda: checkpoint(f, x, use_reentrant=False,
                           context_fn=lambda: (contextlib.nullcontext(), recompute())).sum().backward())
    assert forward.peak_bytes < 64 * 1024
    assert 8 * MIB <= step.peak_bytes <= 8 * MIB + 64 * 1024
    assert step.kernel == "aten::empty"


def test_peaks_between_marks():
    with AllocatorMeter() as meter:
        first = torch.ones(MIB)  # 4 MiB
        mark = meter.mark()
        second = torch.ones(MIB // 2)  # 2 MiB on top
        del first, second
        after = meter.mark()
        third = torch.ones(MIB // 4)  # 1 MiB, from nothing held
        del third
    assert meter.peak_bytes() == 6 * MIB
    assert meter.peak_bytes(mark, after) == 2 * MIB
    assert meter.peak_bytes(after) == 1 * MIB
    assert meter.kernel_at_peak(after) == "aten::ones"


def test_peaks_are_read_after_the_window():
    meter = AllocatorMeter()
    with meter:
        with pytest.raises(RuntimeError, match="after the with block"):
            meter.peak_bytes()


def test_allocations_on_openmp_workers_are_not_seen():
    """What the meter's docstring says of OpenMP workers, measured: the profiler's memory
    hook is thread-local and ATen's ``parallel_for`` does not carry it to its workers.

    Compiling the probe needs ninja (the ``[test]`` extra installs it) and a C++ compiler."""
    assert shutil.which("ninja") and shutil.which("c++"), "the probe extension needs ninja and a C++ compiler (c++)"
    from torch.utils.cpp_extension import load_inline

    source = r"""
    #include <torch/extension.h>
    #include <ATen/Parallel.h>
    torch::Tensor threads_used(int64_t n, int64_t numel) {
      std::vector<int64_t> thread(n, 0);
      at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          auto buffer = at::ones({numel});  // allocated and freed on whichever thread runs i
          thread[i] = at::get_thread_num() + 0 * buffer.numel();
        }
      });
      auto out = torch::empty({n}, torch::kLong);
      for (int64_t i = 0; i < n; ++i) out[i] = thread[i];
      return out;
    }
    """
    # Built in torch's extension cache (~/.cache/torch_extensions): compiled once per machine and source.
    probe = load_inline("anode_plan_thread_probe", cpp_sources=source, functions=["threads_used"],
                        extra_cflags=["-O1", "-fopenmp"])
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            used = probe.threads_used(8, MIB)
    finally:
        torch.set_num_threads(previous)
    on_caller = int((used == 0).sum())
    assert on_caller < 8, "OpenMP ran every iteration on the calling thread: the experiment needs a worker thread"
    recorded = [node for node in _walk(prof.profiler.kineto_results.experimental_event_tree())
                if isinstance(node.extra_fields, torch._C._profiler._ExtraFields_Allocation)
                and node.extra_fields.alloc_size == 4 * MIB]
    assert len(recorded) == on_caller < 8


def _walk(nodes):
    for node in nodes:
        yield node
        yield from _walk(node.children)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_meters_nest_and_each_sees_its_whole_window(device):
    """A step that plans again while it is measured calibrates with a meter of its own inside. On CUDA the
    inner meter resets the device's peak statistic; the outer one still sees the 6 MiB both buffers made."""
    with AllocatorMeter(device) as outer:
        first = torch.ones(MIB, device=device)  # 4 MiB
        with AllocatorMeter(device) as inner:
            second = torch.ones(MIB // 2, device=device)  # 2 MiB
            del second
        third = torch.ones(MIB // 4, device=device)  # 1 MiB
        del first, third
    assert inner.peak_bytes() == 2 * MIB
    assert outer.peak_bytes() == 6 * MIB


def test_the_storage_tracker_counts_draws_from_the_default_generators_only():
    """Replaying a re-run's random numbers restores the default generators (5 KB of Mersenne Twister
    state on the CPU, charged to every re-run); a draw from a generator of its own needs none."""
    own = torch.Generator().manual_seed(0)
    with LiveStorageTracker() as tracker:
        torch.randn(3, generator=own)
        torch.rand(3, generator=own)
    assert tracker.random_ops == 0
    with LiveStorageTracker() as tracker:
        torch.randn(3)
        torch.nn.functional.dropout(torch.ones(4), 0.5)
    assert tracker.random_ops == 2
