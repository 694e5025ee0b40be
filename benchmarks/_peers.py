"""What users would pick instead of anode-plan, built on the *same* modules and parameters.

Every variant here is made from an existing model whose ODE blocks are
:class:`anode_plan.ODEBlock`, and shares that model's parameters and buffers, so a
step of any variant computes (up to the method's own error) the gradient of the same
network on the same weights:

* :class:`CheckpointedBlock`: ``torch.utils.checkpoint`` (non-reentrant) around every
  ODE block: ANODE by hand.
* :class:`StepCheckpointedBlock`: ``torch.utils.checkpoint`` around every time step.
* :class:`SequentialCheckpointed`: ``checkpoint_sequential`` over the network unrolled into
  its layers and time steps.
* :class:`TorchdiffeqBlock`: the same ODE solved by torchdiffeq's ``odeint`` (backprop
  through the solver) or ``odeint_adjoint`` (the Neural-ODE adjoint of Chen et al.), with
  the same fixed-step method and time grid as the ODE block.

Private to ``benchmarks/``; may change without notice.
"""

from __future__ import annotations

import copy
import math
from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint, checkpoint_sequential

from anode_plan import ODEBlock

# ODEBlock method -> torchdiffeq fixed-grid method with the same Butcher tableau. torchdiffeq's
# 'rk4' is the 3/8 rule (rk4_alt_step_func), not the classical RK4 of ODEBlock, so it has none.
TORCHDIFFEQ_METHODS = {"euler": "euler", "rk2": "midpoint"}

TORCHDIFFEQ_MISSING = ("torchdiffeq is not installed, so the torchdiffeq peers (odeint, odeint_adjoint) are "
                       "skipped; install the benchmark extra with  pip install -e \".[bench]\"  "
                       "(or pip install torchdiffeq==0.2.5) to run them")


def torchdiffeq_missing() -> str | None:
    """``None`` when torchdiffeq imports, else a message saying how to install it."""
    try:
        import torchdiffeq  # noqa: F401
    except ImportError:
        return TORCHDIFFEQ_MISSING
    return None


def swap_ode_blocks(model: nn.Module, wrap: Callable[[ODEBlock], nn.Module]) -> nn.Module:
    """A copy of ``model`` whose every :class:`ODEBlock` ``b`` is replaced by ``wrap(b)``.

    Only the modules on the path to an ODE block are copied (shallowly); every other
    submodule, and every parameter and buffer, is the original object, so the copy
    trains the original and ``model.parameters()`` are the copy's parameters.
    """
    if isinstance(model, ODEBlock):
        return wrap(model)
    children = {name: swap_ode_blocks(child, wrap) if child is not None else None
                for name, child in model._modules.items()}
    if all(children[name] is model._modules[name] for name in children):
        return model
    clone = copy.copy(model)
    clone._modules = children
    return clone


class CheckpointedBlock(nn.Module):
    """One ODE block under non-reentrant ``torch.utils.checkpoint``: keep its input, recompute it in backward."""

    def __init__(self, block: ODEBlock) -> None:
        super().__init__()
        self.block = block

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return checkpoint(self.block, z, use_reentrant=False)


class StepCheckpointedBlock(nn.Module):
    """Every time step of an ODE block under non-reentrant ``torch.utils.checkpoint``."""

    def __init__(self, block: ODEBlock) -> None:
        super().__init__()
        self.block = block

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        for step_idx in range(self.block.nt):
            z = checkpoint(self.block.step, step_idx, z, use_reentrant=False)
        return z


class BlockStep(nn.Module):
    """Time step ``step_idx`` of ``block`` as a module of its own, for ``checkpoint_sequential``."""

    def __init__(self, block: ODEBlock, step_idx: int) -> None:
        super().__init__()
        self.block = block
        self.step_idx = step_idx

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.block.step(self.step_idx, z)


def unrolled_layers(model: nn.Module) -> nn.Sequential:
    """An ODE classifier (``stem``, ``body``, ``pool``, ``fc``, as in :mod:`models.odenet`) as a flat
    ``nn.Sequential`` of its layers, with every ODE block unrolled into its time steps."""
    missing = [name for name in ("stem", "body", "pool", "fc") if not hasattr(model, name)]
    if missing:
        raise TypeError(f"unrolled_layers needs an ODE classifier with stem, body, pool and fc (models.ode_resnet); "
                        f"{type(model).__name__} has no {missing}")
    layers: list[nn.Module] = list(model.stem) if isinstance(model.stem, nn.Sequential) else [model.stem]
    for layer in model.body:
        if isinstance(layer, ODEBlock):
            layers.extend(BlockStep(layer, k) for k in range(layer.nt))
        else:
            layers.append(layer)
    layers += [model.pool, nn.Flatten(1), model.fc]
    return nn.Sequential(*layers)


class SequentialCheckpointed(nn.Module):
    """``checkpoint_sequential`` (non-reentrant) over :func:`unrolled_layers` in ``segments`` segments.

    ``segments=None`` takes round(√n) for n layers, the classic choice: about √n segment
    inputs kept plus one segment's tapes. PyTorch runs the last segment without a checkpoint.
    """

    def __init__(self, model: nn.Module, segments: int | None = None) -> None:
        super().__init__()
        self.layers = unrolled_layers(model)
        self.segments = segments if segments is not None else max(1, round(math.sqrt(len(self.layers))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint_sequential(self.layers, self.segments, x, use_reentrant=False)

    def extra_repr(self) -> str:
        return f"layers={len(self.layers)}, segments={self.segments}"


class TorchdiffeqBlock(nn.Module):
    """The ODE of ``block`` solved by torchdiffeq, on ``block``'s own ``func`` and parameters.

    The fixed-step method is the same Butcher tableau (:data:`TORCHDIFFEQ_METHODS`) and
    the time grid the same ``nt`` equal steps over ``block.t_span`` (a ``grid_constructor``,
    which torchdiffeq reuses, flipped, for the adjoint's reverse solve). Only the final
    state is requested, so ``odeint_adjoint`` saves only the two end states: the real
    O(L)-memory adjoint, whose reverse solve reconstructs the states it needs.
    """

    def __init__(self, block: ODEBlock, *, adjoint: bool) -> None:
        super().__init__()
        if block.method not in TORCHDIFFEQ_METHODS:
            raise ValueError(f"ODEBlock(method={block.method!r}) has no torchdiffeq equivalent here: torchdiffeq's "
                             f"fixed-grid 'rk4' is the 3/8 rule, not classical RK4; use one of "
                             f"{sorted(TORCHDIFFEQ_METHODS)}")
        self.block = block
        self.adjoint = adjoint

    def _grid(self, func, y0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        nt = self.block.nt
        grid = t[0] + (t[-1] - t[0]) * (torch.arange(nt + 1, dtype=t.dtype, device=t.device) / nt)
        grid[0], grid[-1] = t[0], t[-1]
        return grid

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        from torchdiffeq import odeint, odeint_adjoint

        t = torch.tensor(self.block.t_span, dtype=z.dtype, device=z.device)
        solve = odeint_adjoint if self.adjoint else odeint
        options = {"grid_constructor": self._grid}
        return solve(self.block.func, z, t, method=TORCHDIFFEQ_METHODS[self.block.method], options=options)[-1]

    def extra_repr(self) -> str:
        return f"{'odeint_adjoint' if self.adjoint else 'odeint'}, method={TORCHDIFFEQ_METHODS[self.block.method]!r}"


def torchdiffeq_model(model: nn.Module, *, adjoint: bool) -> nn.Module:
    """``model`` with every ODE block solved by torchdiffeq (:class:`TorchdiffeqBlock`), same parameters."""
    return swap_ode_blocks(model, lambda block: TorchdiffeqBlock(block, adjoint=adjoint))


def checkpoint_blocks_model(model: nn.Module) -> nn.Module:
    return swap_ode_blocks(model, CheckpointedBlock)


def checkpoint_steps_model(model: nn.Module) -> nn.Module:
    return swap_ode_blocks(model, StepCheckpointedBlock)
