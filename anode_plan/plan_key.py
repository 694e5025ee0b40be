"""What a plan's memory depends on besides the batch size: the key a compiled model finds its plans by.

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
scratch buffer per thread: plain autograd's step on the tiny ODE-net of
``tests/factories.py`` peaks at 144,492 bytes with one thread and 152,380 with two, as
the allocator counts it on an AVX-512 CPU; :mod:`anode_plan.memory`). A call is described
by a :class:`PlanKey` plus its batch sizes; :mod:`anode_plan.compiler.plan_cache` finds
the plan for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

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
