"""Shared command-line plumbing for the tools: load a model by name or ``module:factory``."""

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
