"""U-Net-ODE: a small image-to-image ODE network whose skip connections jump over ODE blocks.

Each U-Net level's convolution block is an :class:`anode_plan.ODEBlock` (f as in
:func:`models.ode_resnet`, per ANODE, arXiv 1902.10298). The encoder blocks' outputs are
concatenated into the decoder after the lower-resolution blocks have run, so the traced
graph is a DAG with nested long-lived edges, not a chain: a planner must keep (or
recompute) each skip tensor across everything below its level.
"""

from __future__ import annotations

import torch
from torch import nn

from anode_plan import ODEBlock
from models._common import (NORMS, build_seeded, check_choice, check_positive_int, check_seed, check_solver,
                            conv_norm_relu, make_norm)
from models.odenet import ConvODEFunc


def _up(in_channels: int, out_channels: int, norm: str) -> nn.Sequential:
    """Nearest-neighbour x2 upsampling, then conv3x3-norm-ReLU to ``out_channels``."""
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), conv_norm_relu(in_channels, out_channels, norm))


def _fuse(channels: int, norm: str) -> nn.Sequential:
    """conv1x1-norm-ReLU from the concatenated ``2 * channels`` back to ``channels``."""
    return nn.Sequential(nn.Conv2d(2 * channels, channels, 1, bias=False), make_norm(norm, channels), nn.ReLU())


class UNetODE(nn.Module):
    """Two-level U-Net with an ODE block per level and side; see :func:`unet_ode`."""

    def __init__(self, *, width: int, nt: int, method: str, norm: str, in_channels: int, out_channels: int) -> None:
        super().__init__()
        w1, w2, w3 = width, 2 * width, 4 * width

        def ode(channels: int) -> ODEBlock:
            return ODEBlock(ConvODEFunc(channels, norm), nt=nt, method=method)

        self.stem = conv_norm_relu(in_channels, w1, norm)
        self.enc1 = ode(w1)
        self.down1 = conv_norm_relu(w1, w2, norm, stride=2)
        self.enc2 = ode(w2)
        self.down2 = conv_norm_relu(w2, w3, norm, stride=2)
        self.mid = ode(w3)
        self.up2 = _up(w3, w2, norm)
        self.fuse2 = _fuse(w2, norm)
        self.dec2 = ode(w2)
        self.up1 = _up(w2, w1, norm)
        self.fuse1 = _fuse(w1, norm)
        self.dec1 = ode(w1)
        self.head = nn.Conv2d(w1, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip1 = self.enc1(self.stem(x))
        skip2 = self.enc2(self.down1(skip1))
        y = self.mid(self.down2(skip2))
        y = self.dec2(self.fuse2(torch.cat([self.up2(y), skip2], dim=1)))
        y = self.dec1(self.fuse1(torch.cat([self.up1(y), skip1], dim=1)))
        return self.head(y)


def unet_ode(*, width: int = 8, nt: int = 3, method: str = "euler", norm: str = "group", in_channels: int = 3,
             out_channels: int = 3, seed: int = 0) -> UNetODE:
    """Build a two-level U-Net-ODE mapping (B, in_channels, H, W) to (B, out_channels, H, W).

    Layout (channels at resolution H, H/2, H/4 are width, 2*width, 4*width)::

        stem -> enc1 ─────────────────────────────────────────┐
                 └ down -> enc2 ───────────────────┐          │
                            └ down -> mid -> up -> cat -> fuse -> dec2 -> up -> cat -> fuse -> dec1 -> head

    ``enc1``, ``enc2``, ``mid``, ``dec2`` and ``dec1`` are ODE blocks (f = conv3x3-norm-ReLU-
    conv3x3-norm, ``nt`` steps of ``method``); ``down`` is a strided conv3x3-norm-ReLU, ``up``
    is nearest x2 upsampling then conv3x3-norm-ReLU, ``fuse`` a conv1x1-norm-ReLU, ``head`` a
    conv1x1. H and W must be divisible by 4 (the forward pass does not check, to stay
    traceable; torch.cat reports the mismatch). ``norm`` and ``seed`` behave as in
    :func:`models.ode_resnet`; GroupNorm is the default because U-Nets train on small batches.

    Raises :class:`models.ModelConfigError` (a ``ValueError``) on bad arguments.
    """
    check_positive_int("unet_ode", "width", width, 8)
    check_solver("unet_ode", nt, method)
    check_choice("unet_ode", "norm", norm, NORMS)
    check_positive_int("unet_ode", "in_channels", in_channels, 3)
    check_positive_int("unet_ode", "out_channels", out_channels, 3)
    check_seed("unet_ode", seed)
    return build_seeded(lambda: UNetODE(width=width, nt=nt, method=method, norm=norm, in_channels=in_channels,
                                        out_channels=out_channels), seed)
