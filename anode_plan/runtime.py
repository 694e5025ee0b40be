"""Execute a schedule: each ``Region`` becomes a nested non-reentrant checkpoint region.

A :class:`planners.Region` keeps only its input in forward and is re-run when backward
reaches it, which is precisely what ``torch.utils.checkpoint(use_reentrant=False)``
does; nested regions re-run their inner regions when those are needed in turn, and
early stop ends a re-run as soon as the tensors backward needs exist again. So a
schedule runs as written, with PyTorch's own machinery doing the bookkeeping, and:

* gradients are plain autograd's (``backward``, ``autograd.grad``, ``inputs=``, DDP);
* random operations replay identically on every re-run: in a region whose stages draw
  random numbers (the cost model counts the random operators; calibration checks the
  generators), :class:`ReplayRandomState` restores the CPU and CUDA RNG states the
  region's first run saw, as checkpoint's own ``preserve_rng_state`` does, but holds
  them as generator clones, which take no tensor memory (checkpoint's stash is a
  5,056-byte CPU tensor per live region); regions without them touch no generator;
* a re-run runs under the autocast state of the original forward;
* BatchNorm running statistics are updated once per step: a re-run does not update
  them, by :class:`RestoreRunningStats` (the ``context_fn`` recompute context);
* a :class:`planners.Reconstruct` runs as :func:`anode_plan.stages.reconstruct.run_reconstruct`;
* a stage the schedule sketches (``Schedule.sketched``) runs its convolutions as XConv
  (:class:`anode_plan.stages.sketch.SketchedLayers`), in its first run and in every re-run;
* a region that writes into its own input in place (which would make its re-run start
  from the wrong values) raises :class:`~anode_plan.InPlaceModificationError` in forward.
  An input overwritten after the region ran is caught by autograd's version check when
  the region is re-run, since checkpoint saves its tensor inputs for backward.

Region inputs are flattened to a list of tensors before they enter ``checkpoint``, so a
tuple-valued state (an ODE block with a tuple state) is saved, version-checked and used
to pick the RNG device like any tensor.

Background, papers and test values: ``docs/algorithms.md`` §6.
"""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.checkpoint import checkpoint

from anode_plan.errors import InPlaceModificationError
from anode_plan.model_state import RestoreRunningStats, norm_layers_with_stats
from anode_plan.stages.reconstruct import run_reconstruct
from anode_plan.stages.sketch import SketchedLayers
from anode_plan.tracing.trace import TracedModel, run_stage
from planners import Op, Reconstruct, Run


class _Both(contextlib.AbstractContextManager):
    """Two contexts entered in order and left in reverse (a reusable ``ExitStack``)."""

    def __init__(self, first: contextlib.AbstractContextManager, second: contextlib.AbstractContextManager) -> None:
        self.first, self.second = first, second

    def __enter__(self) -> "_Both":
        self.first.__enter__()
        try:
            self.second.__enter__()
        except BaseException:
            self.first.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self.second.__exit__(*exc)
        finally:
            self.first.__exit__(*exc)


class ReplayRandomState(contextlib.AbstractContextManager):
    """Re-run a region from the RNG states its first run saw, then put the current ones back.

    Made when a region's first run starts (it clones the generators then); use it as the
    recompute context of that region's checkpoint, with ``preserve_rng_state=False``.
    Each re-run (revolve replays a region up to r+1 times) restores from the same clones.
    The clones are C++ generator objects: unlike ``torch.get_rng_state()`` tensors they
    hold nothing in the tensor allocator, so a schedule's memory is what the cost model
    counts. Restoring makes a state tensor for a moment.
    """

    def __init__(self, generators: Sequence[torch.Generator]) -> None:
        self.saved = [(generator, generator.clone_state()) for generator in generators]
        self._current: list[tuple[torch.Generator, torch.Generator]] = []

    def __enter__(self) -> "ReplayRandomState":
        self._current = [(generator, generator.clone_state()) for generator, _ in self.saved]
        for generator, state in self.saved:
            generator.set_state(state.get_state())
        return self

    def __exit__(self, *exc: Any) -> None:
        for generator, state in self._current:
            generator.set_state(state.get_state())
        self._current = []


def random_generators(values: Sequence[Any]) -> list[torch.Generator] | None:
    """The default generators a region over ``values`` draws from: the CPU's and each CUDA input device's.

    ``None`` when an input lives on another kind of device, whose generator this does not
    know; the region then lets checkpoint stash the RNG state itself.
    """
    generators = [torch.default_generator]
    for value in values:
        if not isinstance(value, torch.Tensor) or value.device.type == "cpu":
            continue
        if value.device.type != "cuda":
            return None
        generator = torch.cuda.default_generators[value.device.index if value.device.index is not None
                                                  else torch.cuda.current_device()]
        if all(generator is not known for known in generators):
            generators.append(generator)
    return generators


class ScheduleRunner:
    """Runs a traced model's stages, by a schedule under autograd, or straight through without it."""

    def __init__(self, traced: TracedModel, ops: tuple[Op, ...], root: nn.Module,
                 random_stages: frozenset[int] = frozenset(), sketch: SketchedLayers | None = None,
                 adaptive: dict[str, int] | None = None, compiled: Any = None, unit: Any = None) -> None:
        """``random_stages``: the stages that draw random numbers; regions holding one replay the RNG.
        ``sketch``: the stages that run with their convolutions sketched (XConv), and how.
        ``adaptive``: per adaptive ODE block, the checkpoints its solves keep.
        ``compiled``: the stages as compiled functions (:class:`anode_plan.stages.inductor.CompiledStages`), or ``None``.
        ``unit``: the whole model as one compiled function (:mod:`anode_plan.stages.unit`), which the compiled
        model calls instead of the schedule (it returns the model's output), or ``None``."""
        self.unit = unit
        self.adaptive = adaptive or {}
        self.compiled = compiled
        self.traced = traced
        self.ops = ops
        self.norm_layers = norm_layers_with_stats(root)
        self.random_stages = random_stages
        self.sketch = sketch

    def run_stage(self, root: nn.Module, index: int, values: tuple) -> tuple:
        spec = self.traced.stages[index]
        if spec.block_target in self.adaptive:  # an adaptive block: its solve keeps the plan's checkpoints
            block = root.get_submodule(spec.block_target)
            before, block.checkpoints = block.checkpoints, self.adaptive[spec.block_target]
            try:
                return run_stage(root, self.traced, spec, values)
            finally:
                block.checkpoints = before
        if self.sketch is not None and spec.name in self.sketch.layers:
            with self.sketch.applied(root, spec.name):  # a re-run in backward comes here too: the same probes
                return run_stage(root, self.traced, spec, values)
        if self.compiled is not None and self.compiled.compiled(index):
            return self.compiled.function(index)(values)
        return run_stage(root, self.traced, spec, values)

    def run_plain(self, root: nn.Module, values: tuple) -> tuple:
        """All stages, no checkpoints: for ``no_grad`` and inference."""
        for index in range(len(self.traced.stages)):
            values = self.run_stage(root, index, values)
        return values

    def run_schedule(self, root: nn.Module, values: tuple, ops: tuple[Op, ...] | None = None) -> tuple:
        """The stages of ``ops`` (the whole schedule by default), regions as checkpoints."""
        for op in self.ops if ops is None else ops:
            if isinstance(op, Run):
                values = self.run_stage(root, op.stage, values)
            elif isinstance(op, Reconstruct):
                values = run_reconstruct(root, self.traced, op.start, op.stop, values,
                                         stats=lambda: RestoreRunningStats(self.norm_layers))
            else:
                flat, structure = tree_flatten(values)
                random = not self.random_stages.isdisjoint(range(op.start, op.stop))
                generators = random_generators(flat) if random else []
                values = checkpoint(self._region, root, op, structure, *flat, use_reentrant=False,
                                    preserve_rng_state=generators is None,
                                    context_fn=lambda: self._contexts(generators))
        return values

    def _region(self, root: nn.Module, op: Op, structure: Any, *flat: Any) -> tuple:
        versions = [value._version if isinstance(value, torch.Tensor) else None for value in flat]
        inputs = tree_unflatten(list(flat), structure)
        outputs = self.run_schedule(root, inputs, op.body)
        for position, (value, version) in enumerate(zip(flat, versions)):
            if version is not None and value._version != version:
                self._raise_overwritten(op, inputs, position, version, value._version)
        return outputs

    def _raise_overwritten(self, op: Op, inputs: tuple, position: int, before: int, after: int) -> None:
        spec = self.traced.stages[op.start]
        names = [name if isinstance(value, torch.Tensor) else f"{name}[{i}]"
                 for name, value in zip(spec.in_names, inputs) for i, _ in enumerate(tree_flatten(value)[0])]
        name = names[position] if position < len(names) else f"input {position}"
        last = self.traced.stages[op.stop - 1].name
        raise InPlaceModificationError(
            f"the checkpoint region over stages {op.start}..{op.stop - 1} ({spec.name} .. {last}) wrote into its "
            f"input {name!r} in place (tensor version {before} -> {after}). The region keeps that input and re-runs "
            "from it in backward, so the gradients would be silently wrong. Make the operation out of place: in the "
            "ODE function or layer that reads it, replace z.relu_(), ReLU(inplace=True), z += y or z[...] = y with "
            "z = z.relu(), ReLU(), z = z + y. (Plain autograd may accept it when nothing is recomputed, which is "
            "why only some budgets fail.)")

    def _contexts(self, generators: list[torch.Generator] | None
                  ) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        """A checkpoint's (forward, recompute) contexts; called as the region's first run starts."""
        stats = RestoreRunningStats(self.norm_layers, in_place=self.compiled is not None)
        if not generators:  # nothing random to replay, or checkpoint stashes the states itself
            return contextlib.nullcontext(), stats
        return contextlib.nullcontext(), _Both(ReplayRandomState(generators), stats)
