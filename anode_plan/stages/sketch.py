"""XConv: a convolution that keeps a random sketch of its input for the weight gradient (inexact, opt-in).

Siahkoohi, Louboutin, Herrmann et al., "XConv: Low-memory stochastic backpropagation for
convolutional layers" (arXiv 2106.06998). The weight gradient of
a convolution is a sum of traces: with the input ``X`` zero-padded to ``Xp`` and the output
gradient ``Δ`` spread onto the padded grid at the strided positions (``Δ̃``),

    dW[p, c, o] = Σ_b  Δ̃[b, p]ᵀ · S_o Xp[b, c]                      (S_o: shift by kernel offset o)

and with ``E``, ``r`` i.i.d. standard normal probes over the padded grid (``E[E Eᵀ] = r·I``),

    dW[p, c, o] ≈ (1/r) Σ_b Σ_j (Δ̃[b, p]ᵀ S_o E_j) · (E_jᵀ Xp[b, c]).

Forward keeps only ``P = Eᵀ Xp`` (``b·ci·r`` numbers) and the probes' seed instead of
``X`` (``b·ci·H·W``); backward regenerates ``E`` from the seed. The estimate is unbiased
and its relative error falls like ``1/√r``. The input and bias gradients need no ``X``
and stay exact. Unlike the public package, shifts are zero-filled (no wrap-around at the
borders), inputs may be rectangular, and strides and padding are supported; groups,
dilation and non-zero padding modes are not (:func:`supports` says which convolutions can be
sketched; the others run exactly). The probes come from a generator owned by the op and
seeded by (seed, step): a re-run of the forward and the backward see the same probes,
and the user's random stream is not touched.

Use it only when an approximate weight gradient is acceptable: it is never used unless
asked for (:class:`XConv2d`).

Background, papers and test values: ``docs/algorithms.md`` §9.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from anode_plan.errors import ApproximationSpecError
from anode_plan.tracing.trace import stage_function


def supports(conv: nn.Module) -> bool:
    """Whether ``conv`` can be sketched: a 2-d convolution without groups or dilation, zero padding of ints,
    running ``nn.Conv2d``'s own ``forward`` (a subclass with its own, e.g. weight standardisation, stays exact)."""
    return (isinstance(conv, nn.Conv2d) and type(conv).forward is nn.Conv2d.forward and conv.groups == 1 and tuple(conv.dilation) == (1, 1)
            and conv.padding_mode == "zeros" and not isinstance(conv.padding, str))


def probes_for(seed: int, step: int, count: int, height: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """The ``count`` probes of one step: i.i.d. standard normal over the padded grid, from (seed, step) alone."""
    generator = torch.Generator(device=like.device)
    generator.manual_seed((seed * 1_000_003 + step) % (2**63 - 1))
    return torch.randn(count, height, width, generator=generator, device=like.device, dtype=like.dtype)


class _SketchedConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: tuple[int, int],
                padding: tuple[int, int], probes: int, seed: int, step: int, owner: Any) -> torch.Tensor:
        out = F.conv2d(x, weight, bias, stride, padding)
        padded = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
        grid = probes_for(seed, step, probes, padded.shape[-2], padded.shape[-1], x)
        sketch = torch.einsum("bchw,jhw->bcj", padded, grid)  # P = Eᵀ Xp: b × ci × r
        del padded, grid
        ctx.save_for_backward(sketch, weight)
        ctx.setup = (tuple(x.shape), stride, padding, probes, seed, step, bias is not None)
        ctx.owner = owner
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple:
        sketch, weight = ctx.saved_tensors
        shape, stride, padding, probes, seed, step, has_bias = ctx.setup
        if ctx.owner is not None:
            ctx.owner.advance_after_backward()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.nn.grad.conv2d_input(shape, weight, grad_out, stride, padding)
        if ctx.needs_input_grad[1]:
            batch, out_channels, out_h, out_w = grad_out.shape
            kernel_h, kernel_w = weight.shape[-2:]
            height, width = shape[-2] + 2 * padding[0], shape[-1] + 2 * padding[1]
            grid = probes_for(seed, step, probes, height, width, grad_out)
            # cols[j, o, y] = E_j[o + stride·y] for every kernel offset o = (u, v) and output position y,
            # and A[b, p, j, o] = Σ_y Δ[b, p, y] cols[j, o, y] = Δ̃ᵀ S_o E_j: one matrix product.
            cols = F.unfold(grid.unsqueeze(1), (kernel_h, kernel_w), stride=stride)  # r × (kh·kw) × (oh·ow)
            del grid
            cols = cols.permute(2, 0, 1).reshape(out_h * out_w, probes * kernel_h * kernel_w)
            products = grad_out.reshape(batch * out_channels, out_h * out_w).mm(cols)  # (b·p) × (r·kh·kw)
            del cols
            products = products.view(batch, out_channels, probes, kernel_h * kernel_w)
            grad_w = torch.einsum("bpjk,bcj->pck", products, sketch).div_(probes)
            grad_w = grad_w.reshape(out_channels, shape[1], kernel_h, kernel_w)
        if has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


def sketched_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: Any = 1,
                    padding: Any = 0, *, probes: int, seed: int, step: int, owner: Any = None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride, padding)`` whose weight gradient is XConv's estimate with ``probes`` probes.

    The probes are those of (``seed``, ``step``). ``owner`` (an :class:`XConv2d`) is told
    when a backward used them, to advance its step once that backward ends.
    """
    pair = (lambda v: (v, v) if isinstance(v, int) else tuple(v))
    return _SketchedConv2d.apply(x, weight, bias, pair(stride), pair(padding), probes, seed, step, owner)


class XConv2d(nn.Module):
    """An ``nn.Conv2d`` whose weight gradient is estimated from a sketch of its input (opt-in, inexact).

    Wraps (and shares the parameters of) a convolution :func:`supports`; others raise.
    With gradients off it is the exact convolution. ``step`` advances when a backward that
    used it ends, so each training step draws new probes, while every call within a step
    (the steps of an ODE block, a checkpoint's re-run in backward) sees the same ones.

    Args:
        conv: the convolution to sketch.
        probes: ``r``, the number of random probes; the weight gradient's relative error
            falls like ``1/√r`` (see :func:`expected_relative_error`).
        seed: the base seed of the probes.
    """

    def __init__(self, conv: nn.Conv2d, probes: int = 16, seed: int = 0) -> None:
        super().__init__()
        if not supports(conv):
            raise ValueError(f"XConv2d cannot sketch {conv}: it supports 2-d convolutions with groups=1, "
                             "dilation=1 and zero padding given as ints; leave this layer exact")
        if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
            raise ValueError(f"XConv2d(probes={probes!r}): the number of probes must be a positive int, e.g. 16")
        self.conv = conv
        self.probes = probes
        self.seed = int(seed)
        self.step = 0
        self._advancing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        if not (torch.is_grad_enabled() and conv.weight.requires_grad):
            return conv._conv_forward(x, conv.weight, conv.bias)  # not conv(x): the planner's sketch patches conv.forward
        return sketched_conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, probes=self.probes,
                               seed=self.seed, step=self.step, owner=self)

    def advance_after_backward(self) -> None:
        """Called by a backward that used this step's probes: the step advances once that backward ends."""
        if not self._advancing:
            self._advancing = True
            torch.autograd.Variable._execution_engine.queue_callback(self._advance)

    def _advance(self) -> None:
        self.step += 1
        self._advancing = False

    def extra_repr(self) -> str:
        return f"probes={self.probes}, seed={self.seed}"


def expected_relative_error(probes: int) -> float:
    """The order of the weight gradient's relative error with ``probes`` probes: ``1/√probes``."""
    return 1.0 / math.sqrt(probes)


@dataclass(frozen=True)
class XConv:
    """Opt in to XConv sketches: ``compile(model, budget, (x,), approximate=anode_plan.XConv(probes=16))``.

    The planner may then run a convolution (:func:`supports`) with a sketch of its input
    instead of the input, where that lets the budget be met or saves recompute (see
    :mod:`planners.sketch`); ``compiled.plan.approximated`` lists every sketched layer with its
    measured relative weight-gradient error. The input and bias gradients stay exact.

    Args:
        probes: the number of random probes ``r``: memory per sketched input
            ``b·ci·r`` numbers, and an error falling like ``1/√r`` (``tests/test_sketch.py``).
            Its size depends on the layer and the batch: at 16 probes, 1.8 to 4.1 times the
            weight gradient's norm in ``benchmarks/RESULTS.md`` ("XConv").
        seed: the base seed; each layer's probes come from (seed, layer, training step).
    """

    probes: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.probes, bool) or not isinstance(self.probes, int) or self.probes < 1:
            raise ApproximationSpecError(f"XConv(probes={self.probes!r}): the number of probes must be a positive int, "
                                         "e.g. XConv(probes=16); more probes cost more memory and give a smaller error")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ApproximationSpecError(f"XConv(seed={self.seed!r}): the seed must be an int")


def check_approximation(approximate: Any) -> None:
    """Refuse anything but ``None`` or an :class:`XConv` for ``compile(..., approximate=...)``."""
    if approximate is not None and not isinstance(approximate, XConv):
        raise ApproximationSpecError(
            f"approximate={approximate!r} is not an approximation anode-plan knows; pass "
            "approximate=anode_plan.XConv(probes=16) to let the planner sketch convolutions, or leave it unset for "
            "exact gradients")


def sketchable_layers(module: nn.Module) -> tuple[str, ...]:
    """The qualified names of the convolutions in ``module`` that can be sketched (trainable, :func:`supports`)."""
    return tuple(name for name, sub in module.named_modules()
                 if supports(sub) and sub.weight.requires_grad)


class SketchedLayers:
    """Which convolutions run sketched in which stage, and their probes' state across training steps.

    ``layers`` maps a stage's name to the qualified names of its convolutions to sketch.
    While a stage runs under :meth:`applied`, each of those convolutions' ``forward`` is
    an :class:`XConv2d` of it (the module itself is not replaced, so ``state_dict`` keys
    and hooks are the user's). The :class:`XConv2d` of a layer is made once per model
    root and kept, so its step (which selects the probes) advances with training.
    """

    def __init__(self, config: XConv, layers: dict[str, tuple[str, ...]],
                 ops: dict[tuple[int, str], "XConv2d"] | None = None) -> None:
        """``ops``: a store of the layers' ops to share with other instances (a compiled model's plans)."""
        self.config = config
        self.layers = layers
        self._ops = {} if ops is None else ops

    def op(self, root: nn.Module, name: str) -> XConv2d:
        """The sketched op of layer ``name`` of ``root``."""
        key, conv = (id(root), name), root.get_submodule(name)
        if key not in self._ops or self._ops[key].conv is not conv:
            self._ops[key] = XConv2d(conv, self.config.probes, seed=_layer_seed(self.config.seed, name))
        return self._ops[key]

    @contextlib.contextmanager
    def applied(self, root: nn.Module, stage: str) -> Iterator[None]:
        """Run the convolutions of ``stage`` sketched, within this context."""
        names = self.layers.get(stage, ())
        patched = []
        try:
            for name in names:
                conv = root.get_submodule(name)
                conv.forward = self.op(root, name).forward
                patched.append(conv)
            yield
        finally:
            for conv in patched:
                conv.__dict__.pop("forward", None)

    def stage_function(self, root: nn.Module, traced: Any, spec: Any) -> Callable:
        """:func:`anode_plan.tracing.trace.stage_function` of ``spec``, run with the stage's convolutions sketched."""
        fn = stage_function(root, traced, spec)
        if spec.name not in self.layers:
            return fn

        def sketched(values: Sequence[Any]) -> tuple:
            with self.applied(root, spec.name):
                return fn(values)
        return sketched


def _layer_seed(seed: int, name: str) -> int:
    """A layer's probe seed, from the base seed and the layer's name alone (stable across runs and plans)."""
    return seed * 1_000_033 + zlib.crc32(name.encode())
