"""Which plan a call runs: the plans of one compiled model, keyed by what their memory depends on.

A plan's memory promise holds for the inputs it was measured on and for any smaller
batch: every activation shrinks with the batch and nothing else grows. It does not hold
for a larger batch, inputs that need a gradient where the plan's did not (their gradients
are memory), other non-batch shapes, another dtype or device of the inputs or
the parameters, another autocast state (autocast halves activations but adds casted
weights), a parameter that was frozen when it was planned and now trains, a module
switched between train and eval (BatchNorm saves other tensors, dropout draws random
numbers only in training), or, on CUDA,
other cuDNN and TF32 settings (``cudnn.benchmark`` picks algorithms with other
workspaces, and the plan was calibrated under the settings it saw), or, on the CPU,
another intra-op thread count or oneDNN switched on or off (oneDNN's convolutions take a
scratch buffer per thread: the MNIST-sized test ODE-net's smallest schedule measured
63,843 bytes with one thread and 71,732 with two). So
:class:`CompiledModel` describes each training call by a :class:`PlanKey` plus its batch
sizes, runs the cached plan with the same key and the smallest batch that covers the
call, and otherwise measures and plans again (about as long as ``compile`` took). A
plan that cannot fit raises :class:`~anode_plan.InfeasibleBudgetError` instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn


@dataclass(frozen=True)
class PlanKey:
    """Everything except the batch sizes that a plan's memory depends on.

    Attributes:
        inputs: for each input, its shape without the batch dimension, its rank and dtype.
        training: ``training`` of each module, in module order.
        tensors: the (dtype, device) pairs of the model's parameters and buffers.
        trainable: ``requires_grad`` of each parameter, in module order.
        autocast: the (device type, dtype) of every enabled autocast context.
        kernels: the settings that choose kernels and so their workspaces: on CUDA
            ``cudnn.enabled``, ``cudnn.benchmark``, ``cudnn.deterministic``,
            ``cudnn.allow_tf32``, ``cuda.matmul.allow_tf32``; on the CPU
            ``torch.get_num_threads()`` and ``mkldnn.enabled``.
    """

    inputs: tuple[tuple[tuple[int, ...], int, str], ...]
    tensors: frozenset
    trainable: tuple[bool, ...]
    autocast: tuple[tuple[str, str], ...]
    kernels: tuple[int | bool, ...] = ()
    training: tuple[bool, ...] = ()


@dataclass(frozen=True)
class CachedPlan:
    """A plan, the key, batch sizes and input ``requires_grad`` flags it was made for, and the runner that
    executes it."""

    key: PlanKey
    batches: tuple[int | None, ...]
    plan: Any
    runner: Any
    input_grads: tuple[bool, ...] = ()


def _autocast_state(tensors: frozenset) -> tuple[tuple[str, str], ...]:
    """The enabled autocast contexts among the CPU, CUDA and the model's devices."""
    devices = sorted({"cpu", "cuda", *(device.type for _, device in tensors)})
    return tuple((device, str(torch.get_autocast_dtype(device))) for device in devices
                 if torch.is_autocast_enabled(device))


def _kernel_settings(tensors: frozenset) -> tuple[int | bool, ...]:
    """The global settings that choose the kernels of the model's devices (and so their workspaces)."""
    settings: tuple[int | bool, ...] = ()
    if any(device.type == "cpu" for _, device in tensors):
        settings += (torch.get_num_threads(), torch.backends.mkldnn.enabled)
    if any(device.type == "cuda" for _, device in tensors):
        cudnn = torch.backends.cudnn
        settings += (cudnn.enabled, cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32,
                     torch.backends.cuda.matmul.allow_tf32)
    return settings


def _model_state(modules: Sequence[nn.Module]) -> tuple[frozenset, tuple[bool, ...]]:
    kinds = set()
    trainable = []
    for module in modules:
        for param in module._parameters.values():
            if param is not None:
                kinds.add((param.dtype, param.device))
                trainable.append(param.requires_grad)
        for buf in module._buffers.values():
            if buf is not None:
                kinds.add((buf.dtype, buf.device))
    return frozenset(kinds), tuple(trainable)


def describe_call(inputs: Sequence[torch.Tensor], modules: Sequence[nn.Module]) -> tuple[PlanKey, tuple]:
    """The key and batch sizes (``None`` for a 0-dim input) of a call with ``inputs``."""
    return describe_plan([tuple(x.shape) for x in inputs], [str(x.dtype) for x in inputs], modules)


def describe_plan(shapes: Sequence[tuple[int, ...]], dtypes: Sequence[str],
                  modules: Sequence[nn.Module]) -> tuple[PlanKey, tuple]:
    """The key and batch sizes of a plan (or call) with inputs of ``shapes`` and ``dtypes``, as the model is now."""
    tensors, trainable = _model_state(modules)
    key = PlanKey(inputs=tuple((tuple(shape[1:]), len(shape), dtype) for shape, dtype in zip(shapes, dtypes)),
                  tensors=tensors, trainable=trainable, autocast=_autocast_state(tensors),
                  kernels=_kernel_settings(tensors), training=tuple(module.training for module in modules))
    return key, tuple(shape[0] if shape else None for shape in shapes)


def covers(planned: Sequence[int | None], batches: Sequence[int | None]) -> bool:
    """Whether a plan for batch sizes ``planned`` keeps its promise for ``batches``."""
    return all(b is None or b <= p for b, p in zip(batches, planned))


class PlanCache:
    """The plans of one compiled model, most recent last; at most :attr:`MAX_PLANS` are kept."""

    MAX_PLANS = 8

    def __init__(self) -> None:
        self.entries: list[CachedPlan] = []

    def find(self, key: PlanKey, batches: tuple, input_grads: Sequence[bool], *,
             exact: bool = False) -> CachedPlan | None:
        """The plan for ``key`` with the smallest batch that covers ``batches``, or ``None``.

        A plan made for inputs that require a gradient (it charges their gradients) also
        covers a call whose inputs do not; not the other way round. ``exact``: only a plan
        for these very batch sizes and input flags (compiled stages, ``backend="inductor"``,
        run code compiled and measured for one shape: another would compile unmeasured code).
        """
        if exact:
            return next((entry for entry in reversed(self.entries) if entry.key == key and entry.batches == batches
                         and tuple(entry.input_grads) == tuple(input_grads)), None)
        fits = [entry for entry in self.entries if entry.key == key and covers(entry.batches, batches)
                and all(planned or not needed for planned, needed in zip(entry.input_grads, input_grads))]
        return min(fits, key=lambda e: sum(b or 0 for b in e.batches), default=None)

    def add(self, entry: CachedPlan) -> CachedPlan:
        self.entries.append(entry)
        del self.entries[:-self.MAX_PLANS]
        return entry
