"""Reference ODE-block networks for anode-plan: pure PyTorch, deterministic in a seed, traceable by torch.fx.

Every model is built from :class:`anode_plan.ODEBlock` s and traces with torch.fx when
``ODEBlock`` is a leaf module. Build one by factory or by name::

    model = build_model("ode_resnet", width=16, nt=4, seed=0)
    x = torch.randn(example_input_shape("ode_resnet", 8))

``ode_resnet`` and ``squeezenext_ode`` are the image classifiers of ANODE (arXiv 1902.10298)
and SqueezeNext (arXiv 1803.10615); ``mlp_ode`` is a tiny network for float64 gradient
tests; ``unet_ode`` has skip connections across ODE blocks, so its graph is not a chain.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

from models._common import ModelConfigError, check_positive_int
from models.mlp import mlp_ode
from models.odenet import ode_resnet
from models.squeezenext import squeezenext_ode
from models.unet import unet_ode

MODELS: dict[str, Callable[..., nn.Module]] = {
    "ode_resnet": ode_resnet,
    "squeezenext_ode": squeezenext_ode,
    "mlp_ode": mlp_ode,
    "unet_ode": unet_ode,
}

# name -> (input shape without the batch dimension, given the factory's keyword arguments)
_INPUT_SHAPES: dict[str, Callable[[dict], tuple[int, ...]]] = {
    "ode_resnet": lambda kw: (kw.get("in_channels", 3), 32, 32),
    "squeezenext_ode": lambda kw: (kw.get("in_channels", 3), 32, 32),
    "mlp_ode": lambda kw: (kw.get("features", 8),),
    "unet_ode": lambda kw: (kw.get("in_channels", 3), 16, 16),
}


def _factory(name: object, caller: str) -> Callable[..., nn.Module]:
    if not isinstance(name, str) or name not in MODELS:
        raise ModelConfigError(f"{caller}({name!r}): no model of that name; known models are {sorted(MODELS)}")
    return MODELS[name]


def _check_kwargs(name: str, caller: str, kwargs: dict) -> None:
    accepted = inspect.signature(MODELS[name]).parameters
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ModelConfigError(f"{caller}({name!r}, ...): {name} takes no argument(s) {unknown}; "
                               f"it accepts {sorted(accepted)}")


def build_model(name: str, **kwargs) -> nn.Module:
    """Build the model registered as ``name`` in :data:`MODELS` with the factory's keyword arguments.

    Raises :class:`ModelConfigError` (a ``ValueError``) for an unknown name, an argument the
    factory does not take, or a bad argument value.
    """
    factory = _factory(name, "build_model")
    _check_kwargs(name, "build_model", kwargs)
    return factory(**kwargs)


def example_input_shape(name: str, batch_size: int, **model_kwargs) -> tuple[int, ...]:
    """A typical input shape for model ``name``, batch first: e.g. ``(batch_size, 3, 32, 32)``.

    Pass the same ``model_kwargs`` as to :func:`build_model` when they change the input
    (``in_channels``, ``features``); the spatial size is 32x32 for the classifiers and
    16x16 for ``unet_ode``, the sizes the tests and benchmarks use.
    """
    _factory(name, "example_input_shape")
    _check_kwargs(name, "example_input_shape", model_kwargs)
    check_positive_int("example_input_shape", "batch_size", batch_size, 8)
    return (batch_size, *_INPUT_SHAPES[name](model_kwargs))


__all__ = ["MODELS", "ModelConfigError", "build_model", "example_input_shape", "mlp_ode", "ode_resnet",
           "squeezenext_ode", "unet_ode"]
