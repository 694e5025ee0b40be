"""Whole measured steps: what the stages timed one at a time do not see.

Calibration times each distinct stage by itself (:func:`anode_plan.measure.calibrate.time_stage`),
repeatedly, on warm caches and with the allocator reusing the blocks the previous repeat
freed. In a training step the same stages run with the whole step's tensors live: fresh
memory for every activation, colder caches, the autograd engine walking a longer graph.
How large that gap is depends on the model, the schedule and the machine's load: the fitted
scale of the compare model's run in ``benchmarks/RESULTS.md`` ("Measured costs") was 1.011.

:func:`fit_whole_step` runs a few whole training steps on the example batch and fits that
gap: a step is predicted as ``scale · (stages and regions) + step_overhead``, where the
stage and region costs are calibration's (a region's from a one-stage region measured
there), ``step_overhead`` is the stand-in loss's forward (the user's loss is not known
when planning: the mean of the squared outputs stands in for it, as for its memory; its
backward is in the step's), and ``scale`` makes the prediction of the measured schedule equal its measured
median. The schedule measured checkpoints every stage (adaptive blocks run taped, keeping
:data:`ADAPTIVE_CHECKPOINTS` checkpoints): its peak is the states between stages plus one stage's re-run, far below
store-all's, so measuring it does not need the memory a large budget would; on CUDA it is
skipped (the scale stays 1) when its predicted peak is more than the device has free. A model
with a stage that writes into its input in place (which cannot run as a region) or with
nothing to differentiate keeps the isolated times too, and a fitted scale is kept within
:data:`SCALE_LIMITS`.
The chain's costs are multiplied by ``scale``, so every planner plans, and every plan
predicts, in the milliseconds of a real step.

Cost: :data:`STEPS` steps, each about 1.4 plain steps (every stage runs its forward twice), all on a copy of the model's modules sharing its tensors:
gradients come from ``autograd.grad``, BatchNorm statistics and the RNG are put back.
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Sequence

import torch
from torch import nn

from anode_plan.errors import InPlaceModificationError
from anode_plan.measure.calibrate import model_unchanged
from anode_plan.measure.phases import stand_in_loss
from anode_plan.measure.timing import Stopwatch, gc_paused
from anode_plan.plans.adaptive_share import adaptive_saving, adaptive_stages
from anode_plan.runtime import ScheduleRunner
from anode_plan.stages.inductor import CompiledStages
from anode_plan.tracing.trace import TracedModel
from planners import Chain, Op, Region, Run, Stage, simulate_plan

ADAPTIVE_CHECKPOINTS = 8
"""Checkpoints an adaptive block keeps in the measured steps (priced as such): at one, its backward would re-run
``O(steps²)`` steps, each time."""

SCALE_LIMITS = (0.5, 3.0)
"""The fitted scale is kept within these: outside them a measured step was disturbed (or the stage times were),
not the model's behaviour."""

STEPS = 3
"""Timed whole steps; the median is fitted. None is made untimed first: calibration has just run every
distinct stage, forward and backward, on this batch."""


def every_stage_checkpointed(chain: Chain) -> tuple[Op, ...]:
    """The schedule that makes every stage a checkpoint region of its own (adaptive blocks run taped)."""
    adaptive = set(adaptive_stages(chain))
    return tuple(Run(i) if i in adaptive else Region(i, i + 1, (Run(i),)) for i in range(len(chain.stages)))


def fit_whole_step(model: nn.Module, traced: TracedModel, inputs: Sequence[torch.Tensor], chain: Chain, *,
                   compiled: CompiledStages | None = None) -> Chain:
    """``chain`` (measured) with its costs scaled to whole measured steps and its step overhead fitted; a
    nominal chain is returned as it is. See the module docstring."""
    if chain.cost_source != "measured":
        return chain
    device = inputs[0].device
    ops = every_stage_checkpointed(chain)
    simulation = simulate_plan(chain, ops)
    if device.type == "cuda" and simulation.peak_bytes > torch.cuda.mem_get_info(device)[0]:
        return chain
    adaptive = {chain.blocks[chain.stages[i].block].name: ADAPTIVE_CHECKPOINTS for i in adaptive_stages(chain)}
    try:
        samples = _whole_steps(model, traced, inputs, ops, adaptive, compiled)
    except InPlaceModificationError:  # a stage writes into its input: it cannot be a region, nor measured as one
        return chain
    except RuntimeError as error:  # autograd's version check: a saved tensor written in place, as above
        if "modified by an inplace operation" not in str(error):
            raise
        return chain
    if samples is None:  # nothing needs a gradient: there is no backward to measure
        return chain
    measured = statistics.median(samples["step"])
    overhead = statistics.median(samples["loss"])
    planned = (simulation.compute_cost + simulation.region_calls * chain.region_cost
               - adaptive_saving(chain, tuple(adaptive.items())))
    scale = max(measured - overhead, 0.0) / planned if planned > 0 else 1.0
    return scaled_costs(chain, min(max(scale, SCALE_LIMITS[0]), SCALE_LIMITS[1]), overhead)


def _whole_steps(model: nn.Module, traced: TracedModel, inputs: Sequence[torch.Tensor], ops: tuple[Op, ...],
                 adaptive: dict[str, int], compiled: CompiledStages | None) -> dict[str, list[float]] | None:
    """:data:`STEPS` timed training steps of ``ops`` on a copy of ``model``: per step, its total and its loss's
    milliseconds; ``None`` when nothing needs a gradient."""
    device = inputs[0].device
    with model_unchanged(model, device) as twin:
        runner = ScheduleRunner(traced, ops, twin, adaptive=adaptive, compiled=compiled)
        wrt = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
        wrt += [p for p in twin.parameters() if p.requires_grad]
        samples: dict[str, list[float]] = {"step": [], "loss": []}
        watch = Stopwatch(device)
        for _ in range(STEPS):
            with gc_paused():
                watch.start()
                outputs = runner.run_schedule(twin, tuple(inputs))
                watch.lap("forward")
                loss = stand_in_loss(outputs)
                watch.lap("loss")
                if not wrt or not loss.requires_grad:
                    return None
                grads = torch.autograd.grad(loss, wrt, allow_unused=True)
                watch.lap("backward")
                del grads, loss, outputs
                times = watch.read()
            samples["step"].append(times["forward"] + times["loss"] + times["backward"])
            samples["loss"].append(times["loss"])
    return samples


def scaled_costs(chain: Chain, scale: float, step_overhead: float) -> Chain:
    """``chain`` with every timed cost (stages, inverses, sketched stages, regions) multiplied by ``scale``."""
    def stage(s: Stage) -> Stage:
        reconstruct = s.reconstruct and dataclasses.replace(s.reconstruct,
                                                            inverse_cost=s.reconstruct.inverse_cost * scale)
        sketch = s.sketch and dataclasses.replace(s.sketch, stage=stage(s.sketch.stage))
        return dataclasses.replace(s, fwd_cost=s.fwd_cost * scale, bwd_cost=s.bwd_cost * scale,
                                   reconstruct=reconstruct, sketch=sketch)

    return dataclasses.replace(chain, stages=tuple(stage(s) for s in chain.stages),
                               region_cost=chain.region_cost * scale, step_overhead=step_overhead, time_scale=scale)

