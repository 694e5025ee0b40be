"""The tensors a function trains, found wherever it reaches them: closures, bound methods, module attributes.

``odeint(func, ...)`` must differentiate with respect to every tensor ``func`` uses that
needs a gradient, as backprop through torchdiffeq's solver does, whether ``func`` is an
``nn.Module``, a lambda closing over one, a bound method of an object holding modules, a
``functools.partial`` or a callable object. Its backward re-runs ``func``, so it must name
those tensors to :func:`torch.autograd.grad`; :func:`reachable_parameters` finds them by
walking what ``func`` can reach (its closure cells, the globals its code names, its
``__self__``, a partial's arguments, an object's attributes), a few levels deep. A tensor
that is found but not used gets no gradient (``allow_unused``); ``odeint(params=...)`` stays
an explicit override.
"""

from __future__ import annotations

import functools
import types
from typing import Any, Callable

import torch
from torch import nn

MAX_DEPTH = 4
"""How many references deep the search follows from ``func`` (a module's parameters count as one)."""


def reachable_parameters(func: Callable) -> list[torch.Tensor]:
    """The tensors needing gradients that ``func`` can reach, each once, in the order found."""
    found: dict[int, torch.Tensor] = {}
    seen: set[int] = set()
    _walk(func, 0, found, seen)
    return list(found.values())


def _walk(obj: Any, depth: int, found: dict[int, torch.Tensor], seen: set[int]) -> None:
    if id(obj) in seen or depth > MAX_DEPTH:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        if obj.requires_grad:
            found.setdefault(id(obj), obj)
        return
    if isinstance(obj, nn.Module):
        for parameter in obj.parameters():
            if parameter.requires_grad:
                found.setdefault(id(parameter), parameter)
        for value in vars(obj).values():  # tensors held as plain attributes, and what a module's methods close over
            if not isinstance(value, (dict, nn.Module)):
                _walk(value, depth + 1, found, seen)
        _walk(getattr(type(obj), "forward", None), depth + 1, found, seen)  # the globals its forward names
        return
    if isinstance(obj, (types.ModuleType, type, str, bytes, int, float, bool, complex)) or obj is None:
        return
    if isinstance(obj, (list, tuple, set, frozenset)):
        for item in list(obj)[:256]:
            _walk(item, depth + 1, found, seen)
        return
    if isinstance(obj, dict):
        for item in list(obj.values())[:256]:
            _walk(item, depth + 1, found, seen)
        return
    if isinstance(obj, types.MethodType):
        _walk(obj.__self__, depth + 1, found, seen)
        _walk(obj.__func__, depth + 1, found, seen)
        return
    if isinstance(obj, functools.partial):
        for item in (obj.func, *obj.args, *obj.keywords.values()):
            _walk(item, depth + 1, found, seen)
        return
    if isinstance(obj, types.FunctionType):
        for cell in obj.__closure__ or ():
            try:
                contents = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            _walk(contents, depth + 1, found, seen)
        scope = obj.__globals__
        for name in obj.__code__.co_names:
            if name in scope:
                _walk(scope[name], depth + 1, found, seen)
        return
    if callable(obj) and hasattr(obj, "__dict__"):  # a callable object: what it holds
        _walk(type(obj).__call__, depth + 1, found, seen)
        for value in vars(obj).values():
            _walk(value, depth + 1, found, seen)
