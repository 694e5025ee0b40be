"""A network built outside ``models/``, for tests that load a model as ``package.module:factory``.

``python tools/plan_report.py --model tests.factories:tiny_odenet --input-shape 3,8,8`` (run from
the checkout) builds it. Not a test module: pytest does not collect it.
"""

from __future__ import annotations

import torch
from torch import nn

from anode_plan import ODEBlock


class ConvField(nn.Module):
    """dz/dt = tanh(conv3x3(z))."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(z))


class TinyODENet(nn.Module):
    """conv stem -> ODE block -> ReLU -> ODE block -> pool -> linear, for inputs (B, 3, H, W)."""

    def __init__(self, channels: int, nt: int, method: str) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.ode1 = ODEBlock(ConvField(channels), nt=nt, method=method)
        self.ode2 = ODEBlock(ConvField(channels), nt=nt, method=method)
        self.head = nn.Linear(channels, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.ode2(torch.relu(self.ode1(self.stem(x))))
        return self.head(z.mean(dim=(2, 3)))


def tiny_odenet(channels: int = 4, nt: int = 3, method: str = "rk2", seed: int = 0) -> TinyODENet:
    """A :class:`TinyODENet` whose weights depend only on ``seed`` (the global RNG is left alone)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TinyODENet(channels, nt, method)
