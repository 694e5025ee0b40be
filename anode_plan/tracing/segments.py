"""Runs of consecutive stages treated as one: the *units* the compiled mode compiles as one graph each.

A traced model's stages are its finest cut: one per ODE time step, one per layer group.
``backend="inductor"`` compiles each of them by itself, so nothing fuses across a stage
boundary (the pointwise tail of one step into the next step's convolution) and every
step is a call of its own. A coarser cut fixes both where the budget allows it: a
*segmentation* is a partition of the stages into runs, and :func:`coarsen` makes the
traced model whose stages are those runs. Each run of two or more stages becomes one
stage with :attr:`~anode_plan.tracing.trace.StageSpec.parts`, which
:func:`~anode_plan.tracing.trace.run_stage` runs one after another and
:mod:`anode_plan.stages.inductor` compiles as one graph.

The coarse model is planned like any other: its chain is measured on the device
(:mod:`anode_plan.measure.compiled_chain`) and the planners keep or recompute its units
whole, nesting recompute across them eager. What a unit cannot do is recompute part
of itself on the schedule's terms, so the per-stage cut still reaches lower budgets; the
compiled mode measures both and takes the faster plan that fits
(:mod:`anode_plan.compiler.segmented`).
"""

from __future__ import annotations

from typing import Sequence

from anode_plan.tracing.trace import StageSpec, TracedModel

Segments = tuple[tuple[int, int], ...]
"""A segmentation: ``(start, stop)`` runs of stage positions, in order, covering every stage once."""


def block_segments(traced: TracedModel, steps: int | None = None) -> Segments:
    """One run per ODE block (all its time steps; with ``steps``, runs of at most that many consecutive steps)
    and one per run of layer groups between blocks."""
    runs: list[tuple[int, int]] = []
    at = 0
    for block in traced.blocks:
        if at < block.start:
            runs.append((at, block.start))
        size = block.stop - block.start if steps is None else steps
        runs.extend((start, min(start + size, block.stop)) for start in range(block.start, block.stop, size))
        at = block.stop
    if at < len(traced.stages):
        runs.append((at, len(traced.stages)))
    return tuple(runs)


def check_segments(traced: TracedModel, segments: Sequence[tuple[int, int]]) -> Segments:
    """``segments`` as a :data:`Segments` if it partitions ``traced``'s stages in order, else ``ValueError``."""
    found = tuple((int(start), int(stop)) for start, stop in segments)
    at = 0
    for start, stop in found:
        if start != at or stop <= start:
            raise ValueError(f"segments {list(found)} do not cover stages 0..{len(traced.stages) - 1} in order, "
                             f"each once: the run ({start}, {stop}) should start at {at} and end after it")
        at = stop
    if at != len(traced.stages):
        raise ValueError(f"segments {list(found)} end at stage {at}, and the model has {len(traced.stages)} stages")
    return found


def unit_spec(stages: Sequence[StageSpec]) -> StageSpec:
    """The stage running ``stages`` (consecutive) one after another: a single stage is itself."""
    if len(stages) == 1:
        return stages[0]
    first, last = stages[0], stages[-1]
    return StageSpec(name=f"{first.name} .. {last.name}", in_names=first.in_names, out_names=last.out_names,
                     parts=tuple(stages))


def coarsen(traced: TracedModel, segments: Sequence[tuple[int, int]]) -> TracedModel:
    """``traced`` cut into ``segments``: one stage per run (:func:`unit_spec`), and no ODE blocks, since a block's
    steps are no longer stages a planner can treat one by one."""
    runs = check_segments(traced, segments)
    stages = [unit_spec(traced.stages[start:stop]) for start, stop in runs]
    return TracedModel(traced.graph, stages, [], traced.input_names, traced.model_name,
                       batch_specialised=traced.batch_specialised, batch=traced.batch)
