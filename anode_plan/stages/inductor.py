"""The opt-in compiled mode: every stage runs as Inductor code, and the schedule stays the planner's.

Use ``anode_plan.compile(model, budget, (x,), backend="inductor")`` to train with
Inductor's fused kernels under a byte budget. Each stage (a layer group, or one time
step of an ODE block) is compiled on its own, with ``torch.compile(fullgraph=True,
dynamic=False)``; the checkpoint regions, their nesting and their re-runs stay eager
(:mod:`anode_plan.runtime`), so what is kept, what is recomputed and when is exactly
the plan. Why this route, from the measurements in issue #16 (torch 2.14.1; ``docs/algorithms.md`` §11):
whole-graph compilation of nested non-reentrant checkpoints flattens the nest into its
outer region (a 3-level schedule's peak went from 2.84 to 6.78 MiB); single-level
regions survive it, but with weights shared across steps Inductor's backward keeps each
step's ``convolution_backward`` result until the shared weight's gradient is summed
(+38 to +69%); compiled stages inside the eager schedule keep the schedule's peak.

A compiled stage's tape is what Inductor's partitioner decides to save, and its buffers
are allocated by generated code that fake tensors and dispatch-mode trackers do not see.
So its numbers are not the fake-tensor cost model's: :mod:`anode_plan.measure.compiled_chain`
measures every compiled stage on the device, with the allocator, in the runs the cost
model makes, and times it.

*Fallback*: a stage ``torch.compile`` cannot compile as one graph (a graph break,
``torch.compiler.disable``-d code, a missing C++ compiler) runs eager instead, measured
the same way, and a :class:`~anode_plan.errors.CompileFallbackWarning` names it and
says why; ``plan.eager_stages`` lists them. The budget holds either way.

*Caching*: the compiled stages of a model are shared by every compiled model made from
it (:func:`compiled_stages_for`), and so is each input key's measured chain: compiling
the same model for another budget plans again and compiles nothing.
"""

from __future__ import annotations

import time
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import fx, nn
from torch._functorch import config as functorch_config

from anode_plan.errors import BackendSpecError, CompileFallbackWarning
from anode_plan.model_state import norm_layers_with_stats
from anode_plan.plan_key import describe_call
from anode_plan.tracing.segments import Segments, check_segments, coarsen
from anode_plan.tracing.trace import StageFn, StageSpec, TracedModel, run_step, stage_function

BACKENDS = ("eager", "inductor")


def check_backend(backend: Any, *, approximate: Any = None, calibrate: bool = True) -> str:
    """``backend`` if ``compile`` can run it with these options, else :class:`BackendSpecError`."""
    if backend not in BACKENDS:
        raise BackendSpecError(f"backend={backend!r}: anode-plan runs stages with 'eager' (the default: PyTorch's "
                               "own kernels) or 'inductor' (each stage compiled by torch.compile)")
    if backend == "inductor" and approximate is not None:
        raise BackendSpecError("backend='inductor' with approximate=XConv(...): a sketched stage replaces its "
                               "convolutions' forward for each run, which a compiled stage would not see. Use "
                               "backend='eager' with XConv, or drop approximate to compile the stages")
    if backend == "inductor" and not calibrate:
        raise BackendSpecError("backend='inductor' with calibrate=False: a compiled stage's memory (what Inductor "
                               "saves and the buffers its code allocates) can only be measured on the device, so "
                               "every compiled stage is measured there; leave calibrate at True")
    return backend


def group_module(root: nn.Module, traced: TracedModel, spec: StageSpec) -> fx.GraphModule:
    """A layer-group stage as a ``GraphModule`` of its own: inputs, the stage's nodes, outputs.

    Its submodules and constants are ``root``'s own objects, so it trains them.
    """
    graph = fx.Graph()
    env: dict[str, fx.Node] = {name: graph.placeholder(name) for name in spec.in_names}
    for name in spec.nodes:
        node = traced.nodes[name]
        for used in node.all_input_nodes:
            if used.name not in env:  # a parameter or constant: fetched by each stage, never in a state
                env[used.name] = graph.node_copy(used, lambda n: env[n.name])
        env[name] = graph.node_copy(node, lambda n: env[n.name])
    graph.output(tuple(env[name] for name in spec.out_names))
    return fx.GraphModule(root, graph, class_name=f"Stage_{_slug(spec.name)}")


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


class CompiledStages:
    """The stages of one traced model as ``torch.compile``-d functions, each compiled at its first run.

    Attributes:
        model: the model whose modules the stages run.
        traced: its traced structure.
        digest: the structure's digest (:func:`anode_plan.plans.serialise.structure_digest`).
        eager: stage position -> why that stage runs eager (it could not be compiled, or
            it is an adaptive solve, whose step count depends on values).
        compile_seconds: the time spent in first runs (tracing, compiling, autotuning).
        identity: the ids of the model's modules, parameters and buffers when the stages were
            made (a layer-group stage holds those objects; :func:`compiled_stages_for`).

    Each input key (shapes, dtypes, modes: :mod:`anode_plan.compiler.plan_cache`) gets compiled
    functions of its own, so a code object sees only the variants of one measured call
    and TorchDynamo's recompile limit is never reached; :meth:`view` gives a plan's.
    """

    def __init__(self, model: nn.Module, traced: TracedModel, digest: str = "") -> None:
        self.model = model
        self.traced = traced
        self.digest = digest
        self.norms = norm_layers_with_stats(model)
        self.identity = model_identity(model)
        self.eager: dict[int, str] = {}
        self.compile_seconds = 0.0
        self._chains: dict[Any, Any] = {}
        self._key_of_chain: dict[int, Any] = {}
        self._superseded: list[Any] = []
        self._refined: set[int] = set()
        self._compiled: dict[tuple[Any, int], Callable[..., tuple]] = {}
        self._warm: set[tuple[Any, int]] = set()
        self._unreported: list[int] = []
        self.units: dict[float, Any] = {}  # whole-model units, by partitioner fraction (anode_plan.stages.unit)
        self.segmented: dict[tuple[Segments, float], UnitStages] = {}  # coarser cuts (segmented_stages)
        for at, spec in enumerate(traced.stages):
            if spec.block is not None and model.get_submodule(spec.block_target).adaptive:
                self.eager[at] = "an adaptive solve: its step count depends on values, so it runs eager"

    def chain_for(self, key: Any) -> Any:
        """The chain measured for input key ``key``, or ``None``."""
        return self._chains.get(key)

    def add_chain(self, key: Any, chain: Any) -> Any:
        self._chains[key] = chain
        self._key_of_chain[id(chain)] = key
        return chain

    def refine_chain(self, measured: Any, refined: Any) -> Any:
        """Keep ``refined`` (``measured`` with its times fitted to whole steps) as the chain of ``measured``'s input
        key, from now on; ``measured`` is kept alive, so its id is never reused by another chain."""
        key = self._key_of_chain[id(measured)]
        self._superseded.append(measured)
        self._refined.add(id(refined))
        return self.add_chain(key, refined)

    def refined(self, chain: Any) -> bool:
        """Whether ``chain`` came from :meth:`refine_chain`."""
        return id(chain) in self._refined

    def view(self, chain: Any) -> "StageView":
        """The compiled functions of the input key ``chain`` was measured for (:meth:`add_chain`)."""
        return StageView(self, self._key_of_chain.get(id(chain)))

    def compiled(self, position: int) -> bool:
        return position not in self.eager

    def function(self, position: int, key: Any = None) -> StageFn:
        """What runs the stage at ``position`` for input key ``key``: its compiled function, or the eager one."""
        if position in self.eager:
            return stage_function(self.model, self.traced, self.traced.stages[position])
        fn = self._compiled.get((key, position))
        if fn is None:
            fn = self._compiled[(key, position)] = self._build(position)
        return lambda values: fn(*values)

    def _build(self, position: int) -> Callable[..., tuple]:
        spec = self.traced.stages[position]
        parts = [self._runner(part) for part in (spec.parts or (spec,))]  # a unit: its stages in one graph

        def stage(*values: Any) -> tuple:
            for part in parts:
                values = part(values)
            return tuple(values)
        # TorchDynamo caches compiled code on the code object: one of its own per stage (and per
        # compiled model) keeps each stage's guards and graphs apart.
        stage.__code__ = stage.__code__.replace(co_name=f"anode_plan_stage_{position}_{_slug(spec.name)}")
        return torch.compile(stage, fullgraph=True, dynamic=False)

    def _runner(self, spec: StageSpec) -> Callable[[tuple], tuple]:
        """What runs one stage inside a compiled function: a layer group as a ``GraphModule`` of its own, a step
        through its block."""
        if spec.block is None:
            module = group_module(self.model, self.traced, spec)
            return lambda values: module(*values)
        model = self.model
        return lambda values: run_step(model, spec, values)

    def warm(self, position: int, runs: Callable[[StageFn], None], key: Any = None) -> None:
        """Compile the stage by running ``runs(function)`` (its forward and backward variants), once.

        A stage that fails to compile is marked eager (and run eager instead), for
        :meth:`warn_fallbacks` to report.
        """
        if (key, position) in self._warm or position in self.eager:
            return
        self._warm.add((key, position))
        began = time.perf_counter()
        try:
            runs(self.function(position, key))
        except torch._dynamo.exc.TorchDynamoException as error:  # Unsupported, BackendCompilerFailed, InductorError
            self.eager[position] = f"{type(error).__name__}: {first_line(error)}"
            self._compiled.pop((key, position), None)
            self._unreported.append(position)
            runs(self.function(position, key))  # the user's own error, if it is one, comes out of the eager run
        finally:
            self.compile_seconds += time.perf_counter() - began

    def warn_fallbacks(self, stacklevel: int = 2) -> None:
        """One :class:`CompileFallbackWarning` for the stages that fell back to eager since the last one."""
        if not self._unreported:
            return
        names = ", ".join(f"{at} ({self.traced.stages[at].name})" for at in self._unreported)
        reasons = sorted({self.eager[at] for at in self._unreported})
        self._unreported = []
        warnings.warn(CompileFallbackWarning(
            f"{self.traced.model_name}: stage(s) {names} could not be compiled by torch.compile(fullgraph=True) and "
            f"run eager, measured on the device like the compiled stages, so the budget still holds "
            f"({'; '.join(reasons)}). To compile them, remove what stops TorchDynamo there (data-dependent Python "
            "control flow, .item(), print, torch.compiler.disable); TORCH_LOGS=graph_breaks shows where."),
            stacklevel=stacklevel + 1)

    def segmented_stages(self, segments: Segments, fraction: float = 1.0) -> "UnitStages":
        """These stages cut into ``segments``, each unit at partitioner budget ``fraction`` (:class:`UnitStages`),
        made once and kept."""
        segments = check_segments(self.traced, segments)
        if (segments, fraction) not in self.segmented:
            self.segmented[(segments, fraction)] = UnitStages(self, segments, fraction)
        return self.segmented[(segments, fraction)]

    def describe_eager(self) -> tuple[tuple[str, str], ...]:
        """(stage name, why) for every stage that runs eager."""
        return tuple((self.traced.stages[at].name, why) for at, why in sorted(self.eager.items()))


class UnitStages(CompiledStages):
    """The compiled stages of ``parent``'s model cut into ``segments`` (:func:`~anode_plan.tracing.segments.coarsen`):
    each run of two stages or more is one compiled graph (a unit); a run of one is ``parent``'s own compiled
    stage, shared, so it compiles once for both cuts.

    ``fraction``: the AOTAutograd partitioner's ``activation_memory_budget`` every unit is compiled and run at
    (as for a whole-model unit, :mod:`anode_plan.stages.unit`): below 1 a unit saves that share of what it
    would save for backward and recomputes the cheapest rest inside its backward graph.

    A unit that cannot be compiled as one graph runs eager and is listed in :attr:`eager` without a
    warning: the cut is only a candidate, and :mod:`anode_plan.compiler.segmented` drops it.
    """

    def __init__(self, parent: CompiledStages, segments: Segments, fraction: float = 1.0) -> None:
        super().__init__(parent.model, coarsen(parent.traced, segments), parent.digest)
        self.parent = parent
        self.segments = segments
        self.fraction = fraction

    def _fine(self, position: int) -> int | None:
        """The parent's position of a one-stage run, or ``None`` for a unit."""
        start, stop = self.segments[position]
        return start if stop - start == 1 else None

    def compiled(self, position: int) -> bool:
        fine = self._fine(position)
        return self.parent.compiled(fine) if fine is not None else super().compiled(position)

    def function(self, position: int, key: Any = None) -> StageFn:
        fine = self._fine(position)
        if fine is not None:
            return self.parent.function(fine, key)
        fn = super().function(position, key)
        return fn if self.fraction == 1.0 or position in self.eager else at_fraction(fn, self.fraction)

    def warm(self, position: int, runs: Callable[[StageFn], None], key: Any = None) -> None:
        """As :meth:`CompiledStages.warm`; a unit's compile time counts in ``parent``'s too (what a plan reports)."""
        fine = self._fine(position)
        if fine is not None:
            self.parent.warm(fine, runs, key)
            return
        before = self.compile_seconds
        super().warm(position, runs, key)
        self.parent.compile_seconds += self.compile_seconds - before

    def warn_fallbacks(self, stacklevel: int = 2) -> None:
        self._unreported = []


@dataclass(frozen=True)
class StageView:
    """The compiled functions of one input key: what a plan's runner (:mod:`anode_plan.runtime`) calls."""

    stages: CompiledStages
    key: Any

    def compiled(self, position: int) -> bool:
        return self.stages.compiled(position)

    def function(self, position: int) -> StageFn:
        return self.stages.function(position, self.key)


def at_fraction(fn: Callable[[tuple], Any], fraction: float) -> Callable[[tuple], Any]:
    """``fn`` (taking one tuple) run under AOTAutograd's partitioner budget ``activation_memory_budget=fraction``,
    so it compiles, and recompiles for another shape, partitioned that way."""
    def run(values: tuple) -> Any:
        with functorch_config.patch(activation_memory_budget=fraction):
            return fn(values)
    return run


def input_key(model: nn.Module, inputs: Sequence[torch.Tensor]) -> Any:
    """What compiled code and its measurements are kept by: the call's plan key (shapes, dtypes, modes, frozen
    parameters: :func:`anode_plan.plan_key.describe_call`) and which inputs need a gradient."""
    return describe_call(inputs, list(model.modules())), tuple(x.requires_grad for x in inputs)


def model_identity(model: nn.Module) -> tuple[int, ...]:
    """The ids of ``model``'s modules, parameters and buffers: compiled stages hold these very objects."""
    return tuple(id(obj) for obj in (*model.modules(), *model.parameters(), *model.buffers()))


def first_line(error: Exception) -> str:
    """The first line of ``error``'s message, at most 300 characters (for a warning or a plan's note)."""
    text = str(error).strip().splitlines()
    return (text[0] if text else "")[:300]


# Live compiled stages, by model: values are weak, so they go with the last compiled model using them.
_LIVE: "weakref.WeakValueDictionary[int, CompiledStages]" = weakref.WeakValueDictionary()


def compiled_stages_for(model: nn.Module, traced: TracedModel, digest: str) -> CompiledStages:
    """The compiled stages of ``model`` with the traced structure ``digest``: those of an earlier
    ``compile`` of the same model if one is still alive and the model still has the same
    modules, parameters and buffers (not a replaced layer), else new ones."""
    key = id(model)
    found = _LIVE.get(key)
    if found is not None and found.model is model and found.digest == digest and \
            found.identity == model_identity(model):
        return found
    stages = CompiledStages(model, traced, digest)
    _LIVE[key] = stages
    return stages
