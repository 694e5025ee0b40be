"""ODE-ResNet: the image classifier of ANODE (Gholami, Keutzer and Biros, arXiv 1902.10298).

A ResNet whose residual blocks are :class:`anode_plan.ODEBlock` s: each block integrates
dz/dt = f(z) with f = conv3x3-norm-ReLU-conv3x3-norm, so ``nt=1, method="euler"`` gives
back the ResNet block ``z + f(z)``. Downsampling between stages is a plain strided
convolution, not an ODE, as in the paper's ODE-ResNet.
"""

from __future__ import annotations

import torch
from torch import nn

from anode_plan import ODEBlock
from models._common import (NORMS, build_seeded, check_choice, check_positive_int, check_seed, check_solver,
                            conv_norm_relu, make_norm)


class ConvODEFunc(nn.Module):
    """f(t, z) = norm(conv3x3(ReLU(norm(conv3x3(z))))); ``t`` is ignored (an autonomous ODE)."""

    def __init__(self, channels: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm1 = make_norm(norm, channels)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm2 = make_norm(norm, channels)

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.norm2(self.conv2(self.relu(self.norm1(self.conv1(z)))))


class ODEClassifier(nn.Module):
    """stem -> body -> global average pool -> linear; a straight line of calls, so torch.fx traces it.

    Shared by :func:`ode_resnet` and :func:`models.squeezenext_ode`, which differ only in ``body``.
    """

    def __init__(self, stem: nn.Module, body: nn.Sequential, features: int, num_classes: int) -> None:
        super().__init__()
        self.stem = stem
        self.body = body
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


class ODEResNet(ODEClassifier):
    """The network :func:`ode_resnet` builds; see its docstring."""


def staged_body(width: int, stages: int, blocks_per_stage: int, norm: str, make_block) -> nn.Sequential:
    """Stage k: ``blocks_per_stage`` blocks ``make_block(width * 2**k)``; between stages a strided
    conv3x3-norm-ReLU that doubles the channels and halves the resolution."""
    layers: list[nn.Module] = []
    for k in range(stages):
        channels = width * 2**k
        if k > 0:
            layers.append(conv_norm_relu(channels // 2, channels, norm, stride=2))
        layers.extend(make_block(channels) for _ in range(blocks_per_stage))
    return nn.Sequential(*layers)


def check_classifier_args(factory: str, *, width: int, stages: int, nt: int, method: str, norm: str,
                          num_classes: int, in_channels: int, seed: int) -> None:
    check_positive_int(factory, "width", width, 16)
    check_positive_int(factory, "stages", stages, 3)
    check_solver(factory, nt, method)
    check_choice(factory, "norm", norm, NORMS)
    check_positive_int(factory, "num_classes", num_classes, 10)
    check_positive_int(factory, "in_channels", in_channels, 3)
    check_seed(factory, seed)


def ode_resnet(*, width: int = 16, stages: int = 3, blocks_per_stage: int = 1, nt: int = 4, method: str = "euler",
               norm: str = "batch", num_classes: int = 10, in_channels: int = 3, seed: int = 0) -> ODEResNet:
    """Build the ANODE ODE-ResNet (arXiv 1902.10298) for images of shape (B, in_channels, H, W).

    Layout: stem conv3x3-norm-ReLU to ``width`` channels; then ``stages`` stages, stage k
    holding ``blocks_per_stage`` ODE blocks at ``width * 2**k`` channels (f = conv3x3-norm-
    ReLU-conv3x3-norm, integrated over [0, 1] with ``nt`` steps of ``method``), with a
    strided conv3x3-norm-ReLU between stages; then global average pooling and a linear
    layer to ``num_classes`` logits. H and W shrink by ``2**(stages - 1)``; 32x32 is typical.

    ``norm="batch"`` uses BatchNorm2d; ``norm="group"`` uses GroupNorm with the largest
    divisor of the channel count that is at most 8 as its group count. Prefer ``"group"``
    when comparing a planned run against plain autograd in train mode: BatchNorm updates
    its running statistics once per call of f, so recomputation changes them (not the
    gradients).

    Every parameter is drawn from ``torch.Generator().manual_seed(seed)``; the global RNG
    is untouched. Raises :class:`models.ModelConfigError` (a ``ValueError``) on bad arguments.
    """
    check_classifier_args("ode_resnet", width=width, stages=stages, nt=nt, method=method, norm=norm,
                          num_classes=num_classes, in_channels=in_channels, seed=seed)
    check_positive_int("ode_resnet", "blocks_per_stage", blocks_per_stage, 1)

    def build() -> ODEResNet:
        body = staged_body(width, stages, blocks_per_stage, norm,
                           lambda channels: ODEBlock(ConvODEFunc(channels, norm), nt=nt, method=method))
        return ODEResNet(conv_norm_relu(in_channels, width, norm), body, width * 2**(stages - 1), num_classes)

    return build_seeded(build, seed)
