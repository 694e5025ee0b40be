"""SqueezeNext-ODE: ODE blocks whose function is the SqueezeNext bottleneck.

SqueezeNext (Gholami et al., arXiv 1803.10615) cuts parameters with a two-stage 1x1
bottleneck and a 3x3 convolution split into 3x1 and 1x3. ANODE (arXiv 1902.10298)
trains it as an ODE network: each residual block becomes an :class:`anode_plan.ODEBlock`.
Its f has five convolutions and a small channel count, so its tape per step is long
and thin, unlike :func:`models.ode_resnet`'s.
"""

from __future__ import annotations

import torch
from torch import nn

from anode_plan import ODEBlock
from models._common import ModelConfigError, build_seeded, conv_norm_relu, make_norm
from models.odenet import ODEClassifier, check_classifier_args, staged_body


class SqueezeNextODEFunc(nn.Module):
    """The SqueezeNext bottleneck as f(t, z); ``t`` is ignored.

    For ``C`` channels: 1x1 C->C/2, 1x1 C/2->C/4, 3x1 C/4->C/2, 1x3 C/2->C/2, 1x1 C/2->C,
    each followed by a norm, with ReLUs between (none after the last norm), as in
    Figure 3 of arXiv 1803.10615 minus the shortcut, which the ODE step supplies.
    """

    def __init__(self, channels: int, norm: str) -> None:
        super().__init__()
        half, quarter = channels // 2, channels // 4
        specs = [(channels, half, (1, 1)), (half, quarter, (1, 1)), (quarter, half, (3, 1)),
                 (half, half, (1, 3)), (half, channels, (1, 1))]
        layers: list[nn.Module] = []
        for i, (c_in, c_out, kernel) in enumerate(specs):
            padding = (kernel[0] // 2, kernel[1] // 2)
            layers += [nn.Conv2d(c_in, c_out, kernel, padding=padding, bias=False), make_norm(norm, c_out)]
            if i < len(specs) - 1:
                layers.append(nn.ReLU())
        self.layers = nn.Sequential(*layers)

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.layers(z)


class SqueezeNextODE(ODEClassifier):
    """The network :func:`squeezenext_ode` builds; see its docstring."""


def squeezenext_ode(*, width: int = 16, stages: int = 2, nt: int = 4, method: str = "euler", norm: str = "batch",
                    num_classes: int = 10, in_channels: int = 3, seed: int = 0) -> SqueezeNextODE:
    """Build a SqueezeNext-style ODE classifier (arXiv 1803.10615, as an ODE net per arXiv 1902.10298).

    Same layout as :func:`models.ode_resnet` with one ODE block per stage: stem
    conv3x3-norm-ReLU to ``width`` channels, ``stages`` stages at ``width * 2**k`` channels
    joined by strided conv3x3-norm-ReLU, global average pooling and a linear head. Each ODE
    block's f is :class:`SqueezeNextODEFunc`, so ``width`` must be divisible by 4 (the
    bottleneck narrows to C/4). ``norm`` and ``seed`` behave as in :func:`models.ode_resnet`.

    Raises :class:`models.ModelConfigError` (a ``ValueError``) on bad arguments.
    """
    check_classifier_args("squeezenext_ode", width=width, stages=stages, nt=nt, method=method, norm=norm,
                          num_classes=num_classes, in_channels=in_channels, seed=seed)
    if width % 4:
        raise ModelConfigError(f"squeezenext_ode(width={width}): the SqueezeNext bottleneck narrows to width/4 "
                               f"channels, so width must be divisible by 4; pass e.g. width={4 * (width // 4 + 1)}")

    def build() -> SqueezeNextODE:
        body = staged_body(width, stages, 1, norm,
                           lambda channels: ODEBlock(SqueezeNextODEFunc(channels, norm), nt=nt, method=method))
        return SqueezeNextODE(conv_norm_relu(in_channels, width, norm), body, width * 2**(stages - 1), num_classes)

    return build_seeded(build, seed)
