"""Building blocks shared by the model factories: argument checks, norms, seeded initialisation.

Private to :mod:`models`; may change without notice.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TypeVar

import torch
from torch import nn

from anode_plan import AnodePlanError
from anode_plan.ode.block import METHODS

NORMS = ("batch", "group")
MAX_GROUPS = 8
_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm)

M = TypeVar("M", bound=nn.Module)


class ModelConfigError(AnodePlanError, ValueError):
    """A model factory in :mod:`models` was called with a bad argument, or an unknown model name."""


def check_positive_int(factory: str, name: str, value: object, example: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelConfigError(f"{factory}({name}={value!r}): {name} must be a positive int; "
                               f"pass e.g. {name}={example}")


def check_choice(factory: str, name: str, value: object, choices: Iterable[str]) -> None:
    choices = sorted(choices)
    if value not in choices:
        raise ModelConfigError(f"{factory}({name}={value!r}) is not supported; use one of {choices}")


def check_seed(factory: str, seed: object) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ModelConfigError(f"{factory}(seed={seed!r}): seed must be an int in [0, 2**63); pass e.g. seed=0")


def check_solver(factory: str, nt: object, method: object) -> None:
    """Check the ODEBlock settings up front, so the error names the factory rather than ODEBlock."""
    check_positive_int(factory, "nt", nt, 4)
    check_choice(factory, "method", method, METHODS)


def group_count(channels: int) -> int:
    """GroupNorm groups for ``channels``: the largest divisor of ``channels`` that is at most 8."""
    return max(g for g in range(1, min(MAX_GROUPS, channels) + 1) if channels % g == 0)


def make_norm(norm: str, channels: int) -> nn.Module:
    """``BatchNorm2d(channels)`` for ``"batch"``, ``GroupNorm(group_count(channels), channels)`` for ``"group"``."""
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    return nn.GroupNorm(group_count(channels), channels)


def conv_norm_relu(in_channels: int, out_channels: int, norm: str, stride: int = 1) -> nn.Sequential:
    """conv3x3 (padding 1, no bias) -> norm -> ReLU; with ``stride=2`` it halves the resolution."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
                         make_norm(norm, out_channels), nn.ReLU())


def build_seeded(build: Callable[[], M], seed: int) -> M:
    """Call ``build()`` and initialise every parameter and buffer from ``torch.Generator().manual_seed(seed)``.

    The modules are constructed on the meta device, so the global RNG is neither read nor
    advanced, then materialised on the CPU and filled by :func:`init_from_generator`.
    """
    with torch.device("meta"):
        model = build()
    model.to_empty(device="cpu")
    init_from_generator(model, torch.Generator().manual_seed(seed))
    return model


def init_from_generator(model: nn.Module, generator: torch.Generator) -> None:
    """Initialise ``model`` in place, in ``named_modules`` order, drawing only from ``generator``.

    Convolutions and linear layers get PyTorch's default rule (Kaiming-uniform with
    ``a=sqrt(5)``, bias uniform in +-1/sqrt(fan_in)); norms get weight 1, bias 0 and reset
    running statistics. A parameter that no rule covers is a bug in this module, reported
    as ``TypeError`` rather than left as uninitialised memory.
    """
    covered: set[int] = set()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, _WEIGHTED):
                nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
                if module.bias is not None:
                    bound = 1 / math.sqrt(module.weight[0].numel())  # fan_in, as torch computes it
                    nn.init.uniform_(module.bias, -bound, bound, generator=generator)
            elif isinstance(module, _NORMS):
                if module.weight is not None:
                    nn.init.ones_(module.weight)
                    nn.init.zeros_(module.bias)
                if not isinstance(module, nn.GroupNorm):
                    module.reset_running_stats()
            else:
                continue
            covered.update(id(t) for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)))
    missed = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if id(t) not in covered]
    if missed:
        raise TypeError(f"models._common.init_from_generator has no rule for {missed}; add one for their "
                        "module type so the model stays deterministic in its seed")
