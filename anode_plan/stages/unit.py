"""A compiled unit larger than a stage: the whole model as one Inductor graph, at a partitioner memory budget.

Use it through ``anode_plan.compile(model, budget, (x,), backend="inductor")``: where one
graph of the whole model fits the budget, the compiled mode runs it instead of stages
compiled one by one (:mod:`anode_plan.compiler.units` chooses; ``plan.unit`` says which).
One graph fuses across every stage boundary (the pointwise tail of one step into the
next step's convolution, the normalisation recompute into the backward kernels), which
per-stage graphs cannot, and that is where ``torch.compile`` of the whole model gains its
speed (``benchmarks/RESULTS.md``, notes: ``torch.compile`` of each ODE function took 0.998x
eager's step, of the whole model 0.722x).

What the graph keeps for backward is the choice of AOTAutograd's min-cut partitioner,
steered by ``torch._functorch.config.activation_memory_budget`` (Inductor's "Memory-budget
partitioner": the share of the save-everything partition's activation memory it may
keep, recomputing the cheapest rest, normalisations and pointwise ops first). A unit is
compiled at one such *fraction*, and every call runs under that setting, so a recompile
(another shape) partitions the same way. Its memory and time are measured on the device
(:mod:`anode_plan.measure.unit_step`), never predicted.

A unit is single-level keep-or-recompute inside one graph: nested (revolve, rotor)
recompute cannot be expressed in one compiled graph (it flattens), so budgets below what
a unit reaches run the per-stage compiled schedule (:mod:`anode_plan.stages.inductor`).
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch import nn

from anode_plan.stages.inductor import CompiledStages, at_fraction, first_line

FRACTIONS = (1.0, 0.8, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)
"""The partitioner budgets a unit is offered at, most kept (fastest) first."""


class UnitCompileError(Exception):
    """The whole model could not be compiled as one graph (the per-stage mode runs it instead)."""


class WholeModelUnit:
    """The model's own ``forward`` as one ``torch.compile(fullgraph=True, dynamic=False)`` graph at partitioner
    ``fraction``: the graph ``torch.compile`` of the model makes, so what it fuses is what the user's code allows.

    One compiled function, compiled at its first call (:meth:`warm`); another input shape
    recompiles it (TorchDynamo's guards), under the same partitioner budget. ``steps``: per
    input key, its measured training step, or why it could not be compiled.
    """

    def __init__(self, model: nn.Module, fraction: float) -> None:
        self.model = model
        self.fraction = fraction
        self.compile_seconds = 0.0
        self.steps: dict[Any, Any] = {}  # input key -> its measured step (anode_plan.measure.unit_step), or why not
        self._compiled: Callable[..., Any] | None = None

    def _build(self) -> Callable[..., Any]:
        model = self.model

        def unit(*inputs: Any) -> Any:
            return model(*inputs)
        # TorchDynamo caches compiled code on the code object: one of its own per unit keeps its graphs apart
        unit.__code__ = unit.__code__.replace(co_name=f"anode_plan_unit_{int(round(self.fraction * 100))}")
        return torch.compile(unit, fullgraph=True, dynamic=False)

    def function(self) -> Callable[[tuple], Any]:
        """What runs the unit: the model's output for a tuple of inputs, compiled, under its partitioner budget."""
        if self._compiled is None:
            self._compiled = self._build()
        fn = self._compiled
        return at_fraction(lambda inputs: fn(*inputs), self.fraction)

    def warm(self, runs: Callable[[Callable[[tuple], Any]], None]) -> None:
        """Compile by running ``runs(function)`` (a forward and a backward); raises :class:`UnitCompileError`."""
        began = time.perf_counter()
        try:
            runs(self.function())
        except torch._dynamo.exc.TorchDynamoException as error:  # Unsupported, BackendCompilerFailed, InductorError
            self._compiled = None
            raise UnitCompileError(f"{type(error).__name__}: {first_line(error)}") from error
        finally:
            self.compile_seconds += time.perf_counter() - began


def unit_for(stages: CompiledStages, fraction: float) -> WholeModelUnit:
    """The whole-model unit of ``stages``' model at ``fraction``, kept with its compiled stages (so every
    compiled model made from the model, at any budget, shares it)."""
    if fraction not in stages.units:
        stages.units[fraction] = WholeModelUnit(stages.model, fraction)
    return stages.units[fraction]
