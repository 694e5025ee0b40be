"""MLP-ODE: a tiny fully connected ODE network for exact-gradient tests.

Small enough to run in float64 on a CPU in milliseconds, so planned gradients can be
compared with plain autograd and finite differences. The optional time dependence and
dropout exercise what a planner must replay exactly on recomputation: the step's time
``t`` and the random dropout mask.
"""

from __future__ import annotations

import torch
from torch import nn

from anode_plan import ODEBlock
from models._common import ModelConfigError, build_seeded, check_positive_int, check_seed, check_solver


class MLPODEFunc(nn.Module):
    """f(t, z) = Linear(Dropout(tanh(Linear(z)) * s(t))), with s(t) = 1 + t if time-dependent, else 1."""

    def __init__(self, hidden: int, dropout: float, time_dependent: bool) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden, hidden)
        self.act = nn.Tanh()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc2 = nn.Linear(hidden, hidden)
        self.time_dependent = time_dependent

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc1(z))
        if self.time_dependent:
            h = h * (1 + t)
        return self.fc2(self.dropout(h))

    def extra_repr(self) -> str:
        return f"time_dependent={self.time_dependent}"


class MLPODE(nn.Module):
    """Linear embedding -> ODE blocks -> linear head; see :func:`mlp_ode`."""

    def __init__(self, embed: nn.Linear, blocks: nn.Sequential, head: nn.Linear) -> None:
        super().__init__()
        self.embed = embed
        self.blocks = blocks
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.embed(x)))


def mlp_ode(*, features: int = 8, hidden: int = 16, blocks: int = 2, nt: int = 4, method: str = "euler",
            num_classes: int = 3, seed: int = 0, dropout: float = 0.0, time_dependent: bool = False) -> MLPODE:
    """Build a fully connected ODE network for inputs of shape (B, features), giving (B, num_classes).

    Layout: Linear(features, hidden), then ``blocks`` ODE blocks on the ``hidden``-wide
    state, each integrating f = Linear-Tanh-[Dropout]-Linear over [0, 1] with ``nt`` steps
    of ``method`` (ANODE, arXiv 1902.10298), then Linear(hidden, num_classes).

    ``dropout > 0`` inserts Dropout after the Tanh: in train mode the output is random, so a
    planner must replay the RNG when it recomputes a step. ``time_dependent=True`` scales
    the hidden activation by ``1 + t``, so f depends on the step's time. Use the default
    (neither) for deterministic gradient checks. Every parameter is drawn from
    ``torch.Generator().manual_seed(seed)``; the global RNG is untouched.

    Raises :class:`models.ModelConfigError` (a ``ValueError``) on bad arguments.
    """
    check_positive_int("mlp_ode", "features", features, 8)
    check_positive_int("mlp_ode", "hidden", hidden, 16)
    check_positive_int("mlp_ode", "blocks", blocks, 2)
    check_solver("mlp_ode", nt, method)
    check_positive_int("mlp_ode", "num_classes", num_classes, 3)
    check_seed("mlp_ode", seed)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ModelConfigError(f"mlp_ode(dropout={dropout!r}): dropout is a probability in [0, 1); "
                               "pass e.g. dropout=0.1, or 0.0 for none")
    if not isinstance(time_dependent, bool):
        raise ModelConfigError(f"mlp_ode(time_dependent={time_dependent!r}) must be True or False")

    def build() -> MLPODE:
        odes = [ODEBlock(MLPODEFunc(hidden, float(dropout), time_dependent), nt=nt, method=method)
                for _ in range(blocks)]
        return MLPODE(nn.Linear(features, hidden), nn.Sequential(*odes), nn.Linear(hidden, num_classes))

    return build_seeded(build, seed)
