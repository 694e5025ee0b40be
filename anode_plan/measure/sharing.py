"""Which ODE blocks can share one measurement: a key of everything that could change a step's bytes or cost.

A deep ODE network repeats itself: the 50 blocks of ``mlp_ode(blocks=50)`` run the same
code on the same shapes, and so do the steps inside each block. The cost model measures
one step per block already (the steps of a block share their numbers); with this key it
also measures one block per kind, and every block built alike reuses its numbers, on
fake tensors and in calibration alike. A block's numbers are then the representative's,
with its own names and parameters put in (:class:`BlockMatch`).

Two blocks share only if their keys are equal. The key holds:

* every module inside the block: its class (so its code), its train/eval mode, the shape,
  stride, dtype and ``requires_grad`` of each parameter and buffer, its plain attributes
  (numbers, strings, flags: the hyper-parameters), the identity of any other attribute
  (a function, an object), and the identity of its hooks;
* the state entering the block's first step: for each value, its role (the ODE state,
  a constant context input, or a value carried past the block, and whether it lives on
  after it) and the shape, stride, dtype, device and ``requires_grad`` of its tensors.

Anything the key cannot read makes blocks differ (an attribute of an unknown type is
compared by identity), so sharing errs towards measuring again, never towards a wrong
number. Autocast and the device are the same for every block of one lowering.
``tests/test_sharing.py`` checks that a chain built with sharing equals the chain built
without it, stage for stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Hashable, Sequence

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from anode_plan.tracing.trace import StageSpec

_PLAIN = (int, float, bool, str, bytes, type(None), torch.dtype, torch.device)


def _attribute_key(value: Any) -> Hashable:
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, (tuple, list)) and all(isinstance(item, _PLAIN) for item in value):
        return (type(value).__name__, tuple(value))
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.stride(), value.dtype, value.requires_grad)
    if isinstance(value, dict):  # hook dicts, and any other mapping a module keeps
        return ("dict", tuple((key, type(item).__qualname__, id(item)) for key, item in value.items()))
    if isinstance(value, (set, frozenset)):
        return ("set", tuple(sorted(map(repr, value))))
    return (type(value).__qualname__, id(value))


def _tensor_key(tensor: torch.Tensor | None) -> Hashable:
    if tensor is None:
        return None
    return (tuple(tensor.shape), tensor.stride(), tensor.dtype, tensor.device.type, tensor.requires_grad)


def module_key(module: nn.Module) -> Hashable:
    """The code, mode, tensor layout and hyper-parameters of ``module`` and everything inside it."""
    parts = []
    for name, sub in module.named_modules():
        attributes = tuple(sorted((key, _attribute_key(value)) for key, value in vars(sub).items()
                                  if key not in ("_parameters", "_buffers", "_modules")))
        parts.append((name, type(sub), sub.training,
                      tuple((key, _tensor_key(p)) for key, p in sub._parameters.items()),
                      tuple((key, _tensor_key(b)) for key, b in sub._buffers.items()),
                      attributes))
    return tuple(parts)


def _role(name: str, first: StageSpec, after: Sequence[str]) -> Hashable:
    z_in = (first.z_in,) if isinstance(first.z_in, str) else tuple(first.z_in or ())
    if name in z_in:
        return ("z", z_in.index(name))
    if name in first.context:
        return ("context", first.context.index(name))
    return ("carried", name in after)


def block_key(block: nn.Module, first: StageSpec, after: Sequence[str], values: dict[str, Any]) -> Hashable:
    """The key of an ODE block whose first step is ``first`` and whose last step leaves ``after``;
    ``values`` holds a tensor (fake or real) for every name of ``first``'s input state."""
    state = tuple((_role(name, first, after), tuple(_tensor_key(t) for t in tree_flatten(values[name])[0]
                                                  if isinstance(t, torch.Tensor)))
                  for name in first.in_names)
    return (module_key(block), state, len(after))


@dataclass(frozen=True)
class BlockMatch:
    """How a block's stages take the numbers measured on a representative block built alike.

    Attributes:
        names: the representative's value names -> this block's (for the values a tape
            saves that are not the ODE state, which roles map).
        params: the representative's parameter indices -> this block's (indices into the
            cost model's list of trainable parameters).
    """

    names: dict[str, str]
    params: dict[int, int]

    @classmethod
    def identity(cls) -> "BlockMatch":
        return cls({}, {})

    def name(self, name: str) -> str:
        return self.names.get(name, name)

    def param_ids(self, ids: Sequence[int]) -> tuple[int, ...] | None:
        """This block's parameter indices for the representative's ``ids``; ``None`` if one has no counterpart."""
        if not self.params:
            return tuple(ids)
        if any(i not in self.params for i in ids):
            return None
        return tuple(sorted(self.params[i] for i in ids))


def match_blocks(representative: nn.Module, rep_first: StageSpec, block: nn.Module, first: StageSpec,
                 index: dict[int, int]) -> BlockMatch:
    """The :class:`BlockMatch` from a representative block to a block with an equal :func:`block_key`;
    ``index`` maps ``id`` of each trainable parameter to its index."""
    if block is representative and rep_first.in_names == first.in_names:
        return BlockMatch.identity()
    mapping = {index[id(a)]: index[id(b)] for a, b in zip(representative.parameters(), block.parameters())
               if id(a) in index and id(b) in index}
    return BlockMatch(dict(zip(rep_first.in_names, first.in_names)), mapping)
