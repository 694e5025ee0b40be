"""Offer XConv sketches to the planner: measure every stage with its convolutions sketched, and their error.

``compile(..., approximate=anode_plan.XConv(probes=16))`` opts in. Then
:func:`offer_sketches` finds the convolutions each stage runs that can be sketched
(:func:`anode_plan.stages.sketch.supports`: the steps of an ODE block share its layers; a layer
group has those it calls), lowers the model a second time with them sketched
(:func:`anode_plan.measure.chain.measure_chain`: fake tensors, then calibration, as for every
stage; the sketch's forward projections and its backward's regenerated probes and products
are measured, not assumed), and measures on the example batch how far each sketched
weight gradient is from the exact one (:func:`measure_errors`). Each such stage of the
exact chain then offers a :class:`planners.chain.Sketch`, and :mod:`planners.sketch`
decides where to take it.

Without ``approximate`` nothing here runs, and the planner never sketches: the gradients
are bit-identical to a compile without it.

Background, papers and test values: ``docs/algorithms.md`` §9.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from anode_plan.measure.calibrate import model_unchanged
from anode_plan.measure.chain import measure_chain
from anode_plan.stages.sketch import SketchedLayers, check_approximation, sketchable_layers, supports
from anode_plan.tracing.trace import StageSpec, TracedModel, stage_function
from planners import Chain
from planners.chain import Sketch

ERROR_DRAWS = 3
"""Draws of the probes the measured relative error is the root mean square over."""


def stage_layers(root: nn.Module, traced: TracedModel) -> dict[str, tuple[str, ...]]:
    """Per stage name, the convolutions it runs that can be sketched (stages without any are left out)."""
    found: dict[str, tuple[str, ...]] = {}
    for spec in traced.stages:
        if spec.block is not None and root.get_submodule(spec.block_target).adaptive:
            continue  # an adaptive solve runs whole, unsketched (its profile is measured for real, exact)
        names = tuple(dict.fromkeys(f"{target}.{name}".rstrip(".") for target in _stage_modules(traced, spec)
                                    for name in sketchable_layers(root.get_submodule(target))))
        if names:
            found[spec.name] = names
    return found


def unsketchable_layers(root: nn.Module, traced: TracedModel) -> tuple[str, ...]:
    """The trainable convolutions the stages run that XConv cannot sketch (they stay exact)."""
    found = {f"{target}.{name}".rstrip("."): None for spec in traced.stages for target in _stage_modules(traced, spec)
             for name, sub in root.get_submodule(target).named_modules()
             if isinstance(sub, nn.modules.conv._ConvNd) and sub.weight.requires_grad and not supports(sub)}
    return tuple(found)


def _stage_modules(traced: TracedModel, spec: StageSpec) -> list[str]:
    """The qualified names of the modules a stage calls (an ODE block's steps: the block)."""
    if spec.block is not None:
        return [spec.block_target]
    return [traced.nodes[name].target for name in spec.nodes if traced.nodes[name].op == "call_module"]


def offer_sketches(chain: Chain, model: nn.Module, traced: TracedModel, example_inputs: Sequence[torch.Tensor],
                   approximate: Any, *, calibrate: bool = True, share: bool = True) -> Chain:
    """``chain`` (measured exact) with a :class:`Sketch` offered by every stage with convolutions to sketch.

    ``calibrate``: measure the sketched stages on the device too. The weight gradients'
    errors are measured on the example batch either way (a plan never flags a layer with a
    guess).
    """
    check_approximation(approximate)
    layers = stage_layers(model, traced)
    chain = dataclasses.replace(chain, unsketchable_layers=unsketchable_layers(model, traced))
    if not layers:
        return chain
    sketch = SketchedLayers(approximate, layers)
    sketched = measure_chain(model, traced, example_inputs, calibrate=calibrate, share=share, sketch=sketch)
    errors = measure_errors(model, traced, example_inputs, SketchedLayers(approximate, layers))
    stages = []
    for exact, other, spec in zip(chain.stages, sketched.stages, traced.stages):
        if spec.name not in layers:
            # Its backward may run after a sketched stage's: charge the larger of the two measured.
            stages.append(dataclasses.replace(exact, bwd_bytes=max(exact.bwd_bytes, other.bwd_bytes)))
            continue
        names = layers[spec.name]
        stages.append(dataclasses.replace(exact, sketch=Sketch(other, names, tuple(errors[n] for n in names),
                                                               approximate.probes, approximate.seed)))
    return dataclasses.replace(chain, stages=tuple(stages))


def measure_errors(model: nn.Module, traced: TracedModel, example_inputs: Sequence[torch.Tensor],
                   sketch: SketchedLayers, draws: int = ERROR_DRAWS) -> dict[str, float]:
    """Per sketched layer, the relative error of its weight gradient on the example batch.

    Each ODE block (all its steps, which share the layers) and each layer group is run
    with a tape from the state the example batch gives it, exact and then sketched with
    ``draws`` draws of the probes, and differentiated with one fixed random output
    gradient. The error is ``sqrt(mean ‖ĝ - g‖²) / ‖g‖``. The model is left as it was
    (a copy sharing its tensors runs; buffers and the RNG are restored).
    """
    device = example_inputs[0].device
    errors: dict[str, float] = {}
    with model_unchanged(model, device) as twin, torch.enable_grad():
        values: dict[str, Any] = dict(zip(traced.input_names, example_inputs))
        at = 0
        while at < len(traced.stages):
            spec = traced.stages[at]
            group = ([*traced.stages[at:traced.blocks[spec.block].stop]] if spec.block is not None else [spec])
            if spec.name in sketch.layers:
                start = tuple(values[name] for name in spec.in_names)
                errors.update(_group_errors(twin, traced, group, start, sketch, draws))
            with torch.no_grad():
                for member in group:
                    state = tuple(values[name] for name in member.in_names)
                    values.update(zip(member.out_names, stage_function(twin, traced, member)(state)))
            at += len(group)
    return errors


def _group_errors(root: nn.Module, traced: TracedModel, group: list[StageSpec], start: tuple,
                  sketch: SketchedLayers, draws: int) -> dict[str, float]:
    names = sketch.layers[group[0].name]
    weights = [root.get_submodule(name).weight for name in names]

    def gradients(sketched: bool) -> list[torch.Tensor]:
        state = tuple(v.detach() if isinstance(v, torch.Tensor) else v for v in start)
        for spec in group:
            make = sketch.stage_function if sketched else stage_function
            state = make(root, traced, spec)(state)
        outputs = [t for t in tree_flatten(state)[0] if isinstance(t, torch.Tensor) and t.requires_grad]
        generator = torch.Generator(device=outputs[0].device).manual_seed(0)
        seeds = [torch.randn(o.shape, generator=generator, device=o.device, dtype=o.dtype) for o in outputs]
        grads = torch.autograd.grad(outputs, weights, seeds, allow_unused=True)
        return [torch.zeros_like(w) if g is None else g for g, w in zip(grads, weights)]

    exact = gradients(False)
    squared = [0.0] * len(names)
    for draw in range(draws):
        for name in names:
            sketch.op(root, name).step = draw
        for i, (estimate, true) in enumerate(zip(gradients(True), exact)):
            squared[i] += float((estimate - true).double().norm() ** 2)
    norms = [float(true.double().norm()) for true in exact]
    return {name: math.sqrt(total / draws) / norm if norm else 0.0 for name, total, norm in zip(names, squared, norms)}
