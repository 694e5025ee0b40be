"""Shared command-line plumbing for the tools: load a model by name or ``module:factory``, parse budgets."""

from __future__ import annotations

import ast
import importlib
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import models  # noqa: E402  (needs ROOT on the path when run from a checkout)
from anode_plan import parse_memory_budget  # noqa: E402
from anode_plan import BudgetFormatError  # noqa: E402


def parse_kwargs(pairs: list[str]) -> dict:
    """``["nt=8", "method=rk2"]`` -> ``{"nt": 8, "method": "rk2"}`` (values as Python literals or strings)."""
    kwargs = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"--kwargs expects key=value pairs, got {pair!r}")
        key, text = pair.split("=", 1)
        try:
            kwargs[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            kwargs[key] = text
    return kwargs


def load_model(spec: str, kwargs: dict) -> tuple[torch.nn.Module, str]:
    """A model from ``models`` by name, or from ``package.module:factory``; returns it and its label."""
    if ":" in spec:
        module_name, factory_name = spec.split(":", 1)
        if os.getcwd() not in sys.path:  # as with python -m: modules of the current directory import
            sys.path.insert(1, os.getcwd())
        try:
            factory = getattr(importlib.import_module(module_name), factory_name)
        except (ImportError, AttributeError) as error:
            raise SystemExit(f"cannot load model factory {spec!r}: {error}") from None
        return factory(**kwargs), spec
    return models.build_model(spec, **kwargs), spec


def input_shape(spec: str, batch: int, shape: str | None, kwargs: dict) -> tuple[int, ...]:
    """The example input shape: ``--input-shape 3,32,32`` or the model's default."""
    if shape:
        return (batch, *(int(d) for d in shape.split(",")))
    if ":" in spec:
        raise SystemExit("--input-shape is required for a module:factory model, e.g. --input-shape 3,32,32")
    return models.example_input_shape(spec, batch, **kwargs)


def parse_budgets(specs: list[str]) -> list[int]:
    """Budgets in bytes from ``["30MB", "40MB,50MB", "20MB:80MB:7"]``, in the order given.

    A ``start:stop:count`` range gives ``count`` budgets from ``start`` to ``stop``, both
    included. Raises ``ValueError`` saying which one is wrong.
    """
    budgets: list[int] = []
    for spec in specs:
        for piece in filter(None, (p.strip() for p in spec.split(","))):
            try:
                if ":" not in piece:
                    budgets.append(_one_budget(piece))
                    continue
                parts = piece.split(":")
                if len(parts) != 3 or not parts[2].isdigit() or int(parts[2]) < 1:
                    raise ValueError(f"--budget {piece!r}: a range is start:stop:count, e.g. 20MB:80MB:7")
                start, stop, count = _one_budget(parts[0]), _one_budget(parts[1]), int(parts[2])
                if count == 1:
                    budgets.append(start)
                else:
                    budgets.extend(start + (stop - start) * k // (count - 1) for k in range(count))
            except BudgetFormatError as error:
                raise ValueError(f"--budget {piece!r}: {error}") from None
    return budgets


def _one_budget(text: str) -> int:
    return parse_memory_budget(int(text) if text.isdigit() else text)
