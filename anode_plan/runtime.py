"""Execute a schedule: each ``Region`` becomes a nested non-reentrant checkpoint region.

A :class:`planners.Region` keeps only its input in forward and is re-run when backward
reaches it, which is precisely what ``torch.utils.checkpoint(use_reentrant=False)``
does; nested regions re-run their inner regions when those are needed in turn, and
early stop ends a re-run as soon as the tensors backward needs exist again. So a
schedule runs as written, with PyTorch's own machinery doing the bookkeeping, and:

* gradients are plain autograd's (``backward``, ``autograd.grad``, ``inputs=``, DDP);
* random operations replay identically on every re-run (checkpoint restores the CPU
  and device RNG states it saw at the region's first run);
* a re-run runs under the autocast state of the original forward;
* BatchNorm running statistics are updated once per step: a re-run's updates are
  undone by :class:`RestoreRunningStats` (the ``context_fn`` recompute context).
"""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from anode_plan.trace import TracedModel, run_layer_group, run_step
from planners import Op, Run


class RestoreRunningStats:
    """Keep a re-run forward from updating running statistics.

    On entry, every norm layer in training mode that tracks running statistics
    (BatchNorm, InstanceNorm with ``track_running_stats``) gets throwaway copies of its
    ``running_mean``, ``running_var`` and ``num_batches_tracked``; on exit the real
    buffers are put back, untouched. The real buffers are never written, so their
    version counters (which autograd checks) do not change either. Use it as the
    recompute context of a checkpoint region.
    """

    _NAMES = ("running_mean", "running_var", "num_batches_tracked")

    def __init__(self, norm_layers: Sequence[nn.Module]) -> None:
        self.norm_layers = norm_layers
        self._real: list[tuple[nn.Module, str, torch.Tensor]] = []

    def __enter__(self) -> "RestoreRunningStats":
        for layer in self.norm_layers:
            if not layer.training:
                continue
            for name in self._NAMES:
                buf = layer._buffers.get(name)
                if buf is not None:
                    self._real.append((layer, name, buf))
                    layer._buffers[name] = buf.detach().clone()
        return self

    def __exit__(self, *exc: Any) -> None:
        for layer, name, buf in self._real:
            layer._buffers[name] = buf
        self._real = []


def norm_layers_with_stats(root: nn.Module) -> list[nn.Module]:
    """The norm layers whose forward updates running statistics."""
    return [m for m in root.modules()
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats]


class ScheduleRunner:
    """Runs a traced model's stages, by a schedule under autograd, or straight through without it."""

    def __init__(self, traced: TracedModel, ops: tuple[Op, ...], root: nn.Module) -> None:
        self.traced = traced
        self.ops = ops
        self.norm_layers = norm_layers_with_stats(root)

    def run_stage(self, root: nn.Module, index: int, values: tuple) -> tuple:
        spec = self.traced.stages[index]
        if spec.block is None:
            return run_layer_group(root, self.traced, spec, values)
        return run_step(root, spec, values)

    def run_plain(self, root: nn.Module, values: tuple) -> tuple:
        """All stages, no checkpoints: for ``no_grad`` and inference."""
        for index in range(len(self.traced.stages)):
            values = self.run_stage(root, index, values)
        return values

    def run_schedule(self, root: nn.Module, values: tuple, ops: tuple[Op, ...] | None = None) -> tuple:
        """The stages of ``ops`` (the whole schedule by default), regions as checkpoints."""
        for op in self.ops if ops is None else ops:
            if isinstance(op, Run):
                values = self.run_stage(root, op.stage, values)
            else:
                values = checkpoint(self._region, root, op.body, *values, use_reentrant=False,
                                    preserve_rng_state=True, context_fn=self._contexts)
        return values

    def _region(self, root: nn.Module, body: tuple[Op, ...], *values: Any) -> tuple:
        return self.run_schedule(root, tuple(values), body)

    def _contexts(self) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        return contextlib.nullcontext(), RestoreRunningStats(self.norm_layers)
