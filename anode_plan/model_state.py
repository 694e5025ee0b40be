"""Putting a model's state back: BatchNorm running statistics and the random generators.

A checkpoint region re-runs its stages in backward; a measurement runs the model's stages
to see what they allocate. Neither may leave a trace in the model the user trains: running
statistics are updated once per step (:class:`RestoreRunningStats`), and the random
generators are where they were (:func:`state_restored`). Imports only torch, so every layer
above (the solver, the measurements, the runner) can use it.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
from torch import nn


@contextlib.contextmanager
def state_restored(model: nn.Module, device: torch.device) -> Iterator[None]:
    """On exit ``model``'s buffers (BatchNorm statistics) are as they were, and the RNG state too."""
    saved = [(buf, buf.detach().clone()) for buf in model.buffers()]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            yield
        finally:
            with torch.no_grad():
                for buf, value in saved:
                    buf.copy_(value)


def generator_states(device: torch.device) -> list[torch.Tensor]:
    """The states of the default generators a stage on ``device`` can draw from."""
    states = [torch.default_generator.get_state()]
    if device.type == "cuda":
        states.append(torch.cuda.default_generators[device.index or 0].get_state())
    return states


class RestoreRunningStats:
    """Keep a re-run forward from updating running statistics, allocating nothing where it can.

    A re-run must compute exactly what the first run did but leave the running statistics
    as the first run left them, and it must save the same tensors for backward (a
    non-reentrant checkpoint matches saved tensors by position). Two ways, by layer:

    * a BatchNorm layer with PyTorch's own ``_BatchNorm.forward`` (``BatchNorm1d/2d/3d``,
      materialized lazy ones) is *frozen*: ``momentum`` 0 and ``num_batches_tracked``
      hidden for the re-run, so it updates ``r <- 1·r + 0·batch = r`` in place and counts
      nothing. Its output uses the batch's statistics either way, so it is unchanged,
      and it saves the real buffers, so the re-run allocates nothing. (With a non-finite
      batch statistic the step is lost anyway; ``0·inf`` would turn an infinite running
      value into NaN.)
    * any other layer that tracks running statistics (``SyncBatchNorm``, which insists on
      ``num_batches_tracked``; ``InstanceNorm`` with ``track_running_stats``, whose update
      averages over the batch; a subclass with its own ``forward``) gets throwaway copies
      of ``running_mean``, ``running_var`` and ``num_batches_tracked`` for the re-run, and
      the real buffers are put back, never written, on exit. The copies live until the
      re-run's backward (BatchNorm saves them); :func:`copied_on_rerun` lists these layers
      for the cost model, which charges them.

    With ``in_place=True`` (compiled stages, ``backend="inductor"``) every layer instead
    re-runs on its real buffers, which are copied first and written back on exit: a
    compiled stage's guards see the same modules and buffers as in its first run, so the
    re-run needs no compiled variant of its own. The copies (a few floats per channel)
    live while the re-run runs.

    Use it as the recompute context of a checkpoint region.
    """

    _NAMES = ("running_mean", "running_var", "num_batches_tracked")

    def __init__(self, norm_layers: Sequence[nn.Module], *, in_place: bool = False) -> None:
        self.norm_layers = norm_layers
        self.in_place = in_place
        self._real: list[tuple[nn.Module, str, torch.Tensor]] = []
        self._frozen: list[tuple[nn.Module, Any]] = []
        self._copies: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __enter__(self) -> "RestoreRunningStats":
        for layer in self.norm_layers:
            if not layer.training:
                continue
            if self.in_place:
                self._copies += [(buf, buf.detach().clone()) for name in self._NAMES
                                 if (buf := layer._buffers.get(name)) is not None]
                continue
            if not updates_by_copy(layer):
                self._frozen.append((layer, layer.momentum))
                layer.momentum = 0.0
                buf = layer._buffers.get("num_batches_tracked")
                if buf is not None:
                    self._real.append((layer, "num_batches_tracked", buf))
                    layer._buffers["num_batches_tracked"] = None
                continue
            for name in self._NAMES:
                buf = layer._buffers.get(name)
                if buf is not None:
                    self._real.append((layer, name, buf))
                    layer._buffers[name] = buf.detach().clone()
        return self

    def __exit__(self, *exc: Any) -> None:
        with torch.no_grad():
            for buf, copy in self._copies:
                buf.copy_(copy)
        self._copies = []
        for layer, name, buf in self._real:
            layer._buffers[name] = buf
        for layer, momentum in self._frozen:
            layer.momentum = momentum
        self._real = []
        self._frozen = []


def norm_layers_with_stats(root: nn.Module) -> list[nn.Module]:
    """The norm layers whose forward updates running statistics."""
    return [m for m in root.modules()
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats]


def updates_by_copy(layer: nn.Module) -> bool:
    """Whether :class:`RestoreRunningStats` re-runs ``layer`` on copies of its statistics (else frozen in place)."""
    return type(layer).forward is not nn.modules.batchnorm._BatchNorm.forward


def copied_on_rerun(root: nn.Module) -> list[nn.Module]:
    """The norm layers a re-run in training mode gives copies of their running statistics."""
    return [m for m in norm_layers_with_stats(root) if m.training and updates_by_copy(m)]
