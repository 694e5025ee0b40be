"""Trace a model with torch.fx and cut it into the stages of a chain.

``trace_model`` traces ``model.forward`` with every :class:`~anode_plan.ODEBlock` kept
as a leaf node (with :class:`anode_plan.tracing.capture.ShapeTracer`, which knows the example's
shapes; ``docs/capture.md`` says why not ``torch.export``), then cuts the graph into stages: each time step of each ODE block is
one *step* stage, and the other operations form *layer-group* stages, one per layer
unit (the first two parts of a module path: ``conv1``, ``layer1.0``, ``stem.2``).
Between two stages, the *state* is the tuple of values computed so far and still used
later, so skip connections that cross a block travel with it.

Parameters and constants (``get_attr`` nodes) are never part of a state: each stage
fetches them from the module when it runs.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import fx, nn

from anode_plan.errors import CompiledModuleError, ExampleInputsError, InPlaceModificationError, UntraceableModelError
from anode_plan.ode.block import CARRIED, ODEBlock
from anode_plan.tracing.capture import ShapeTracer, fetch_attr, graph_signature, user_line
from anode_plan.tracing.example_check import check_example_fits

StageFn = Callable[[tuple], tuple]


@dataclass(frozen=True)
class StageSpec:
    """One stage of a traced model.

    Attributes:
        name: a label: the first and last node of a layer group, or ``block@step``.
        in_names / out_names: the fx node names of the state entering and leaving it.
        nodes: for a layer group, the names of the nodes it runs, in order.
        block_target: for a step, the qualified name of the ``ODEBlock`` module.
        block: for a step, the index of its block in :attr:`TracedModel.blocks`.
        step: for a step, the time step.
        z_in / z_out: for a step, the names of the ODE state before and after it. A tuple
            state enters the first step as several values, so there ``z_in`` is a tuple of
            names; every later state is one value (a tuple of tensors). A reversible
            method's carried parts (``ode.CARRIED``) are one value each, so its steps' ``z_in``
            and ``z_out`` are tuples of names, the last step's first being the block's output.
        context: for a step, the names of the block's constant extra inputs
            (``block(z, *context)``), carried through all its steps.
        parts: for a *unit* (a run of consecutive stages compiled as one graph:
            :mod:`anode_plan.tracing.segments`), the stages it runs, in order; empty otherwise.
    """

    name: str
    in_names: tuple[str, ...]
    out_names: tuple[str, ...]
    nodes: tuple[str, ...] = ()
    block_target: str | None = None
    block: int | None = None
    step: int | None = None
    z_in: str | tuple[str, ...] | None = None
    z_out: str | None = None
    context: tuple[str, ...] = ()
    parts: tuple["StageSpec", ...] = ()


@dataclass(frozen=True)
class BlockSpec:
    """An ODE block of a traced model: stages ``[start, stop)`` are its steps."""

    target: str
    start: int
    stop: int
    nt: int
    method: str


class TracedModel:
    """A traced model cut into stages. Built by :func:`trace_model`; read by the cost model and runtime."""

    def __init__(self, graph: fx.Graph, stages: list[StageSpec], blocks: list[BlockSpec],
                 input_names: tuple[str, ...], model_name: str, *, batch_specialised: str | None = None,
                 batch: int | None = None) -> None:
        self.graph = graph
        #: Why the graph holds for the traced batch size alone (``None``: it holds for any).
        self.batch_specialised = batch_specialised
        self.batch = batch
        self.stages = stages
        self.blocks = blocks
        self.input_names = input_names
        self.model_name = model_name
        self.nodes = {node.name: node for node in graph.nodes}
        self.output_node = next(node for node in graph.nodes if node.op == "output")

    def build_output(self, root: nn.Module, state: dict[str, Any]) -> Any:
        """The model's return value, from the final state."""
        return fx.node.map_arg(self.output_node.args[0], lambda node: _value(root, node, state))


def _value(root: nn.Module, node: Any, state: dict[str, Any]) -> Any:
    if not isinstance(node, fx.Node):
        return node
    if node.op == "get_attr":
        return fetch_attr(root, node.target)
    return state[node.name]


def run_layer_group(root: nn.Module, traced: TracedModel, spec: StageSpec, values: Sequence[Any]) -> tuple:
    """Run a layer-group stage: its nodes in order, from the state ``values``."""
    env = dict(zip(spec.in_names, values))
    for name in spec.nodes:
        node = traced.nodes[name]
        args = fx.node.map_arg(node.args, lambda n: _value(root, n, env))
        kwargs = fx.node.map_arg(node.kwargs, lambda n: _value(root, n, env))
        try:
            if node.op == "call_module":
                env[name] = root.get_submodule(node.target)(*args, **kwargs)
            elif node.op == "call_function":
                env[name] = node.target(*args, **kwargs)
            elif node.op == "call_method":
                env[name] = getattr(args[0], node.target)(*args[1:], **kwargs)
            else:  # pragma: no cover - placeholders, get_attr and output never appear in a group
                raise UntraceableModelError(f"unexpected fx node {node.op} {name}")
        except Exception as error:
            trace = "".join(node.stack_trace or "") if node.stack_trace else ""
            error.add_note(f"while running fx node {name!r} ({node.op} {node.target}) of stage {spec.name}"
                           + (f", traced at:\n{trace}" if trace else ""))
            raise
    return tuple(env[name] for name in spec.out_names)


def run_step(root: nn.Module, spec: StageSpec, values: Sequence[Any]) -> tuple:
    """Run one ODE time-step stage, carrying the rest of the state through unchanged."""
    env = dict(zip(spec.in_names, values))
    block = root.get_submodule(spec.block_target)
    z = env[spec.z_in] if isinstance(spec.z_in, str) else tuple(env[name] for name in spec.z_in)
    out = block.step(spec.step, z, *(env[name] for name in spec.context))
    if isinstance(spec.z_out, str):
        env[spec.z_out] = out
    else:  # a reversible method's carried parts, one value each
        env.update(zip(spec.z_out, out))
    return tuple(env[name] for name in spec.out_names)


def run_stage(root: nn.Module, traced: TracedModel, spec: StageSpec, values: Sequence[Any]) -> tuple:
    """Run any stage of ``traced`` from its input state ``values`` (a unit's parts one after another)."""
    if spec.parts:
        for part in spec.parts:
            values = run_stage(root, traced, part, values)
        return tuple(values)
    if spec.block is None:
        return run_layer_group(root, traced, spec, values)
    return run_step(root, spec, values)


def stage_function(root: nn.Module, traced: TracedModel, spec: StageSpec) -> Callable[[Sequence[Any]], tuple]:
    """The stage ``spec`` of ``traced`` as a function of its input state, run on the modules of ``root``."""
    return lambda values: run_stage(root, traced, spec, values)


def trace_model(model: nn.Module, example_inputs: Sequence[Any], *,
                leaf_modules: Sequence[type] = ()) -> TracedModel:
    """Trace ``model`` and cut it into stages; ODE blocks become one stage per time step.

    Raises :class:`UntraceableModelError` naming the module when fx cannot trace it,
    and :class:`ExampleInputsError` when ``example_inputs`` does not fit ``forward``.
    """
    name = type(model).__name__
    _check_not_compiled(model)
    _check_inputs(model, example_inputs)
    tracer = ShapeTracer(example_inputs, tuple(leaf_modules))
    try:
        graph = tracer.trace(model)
    except Exception as error:
        where = _where(error)
        culprit = _failing_module(model, error)
        if culprit is None:
            fix = ("Mark the submodule with data-dependent control flow as a leaf with leaf_modules=[ThatModule], "
                   "or make loop bounds Python ints.")
        else:
            qualname, module = culprit
            fix = (f"The failing code is in submodule {qualname!r} ({type(module).__name__}): mark it as a leaf "
                   f"with compile(..., leaf_modules=[{type(module).__name__}]) (it then runs as one opaque layer; "
                   "its forward must still run on tensors without values, so branch with torch.where rather than "
                   "on a tensor's value), or make its control flow independent of tensor values.")
        raise UntraceableModelError(
            f"torch.fx could not trace {name}.forward{where} ({type(error).__name__}: {error}). {fix}") from error
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    if len(placeholders) < len(example_inputs):
        raise ExampleInputsError(f"{name}.forward takes {len(placeholders)} inputs but example_inputs has "
                                 f"{len(example_inputs)}")
    placeholders = placeholders[:len(example_inputs)]
    stages, blocks = _cut(model, graph, placeholders)
    check_example_fits(model, graph, tracer.values, example_inputs)
    batch = _batch_size(example_inputs)
    specialised = _batch_dependence(model, graph, example_inputs, leaf_modules) if tracer.read_shape else None
    return TracedModel(graph, stages, blocks, tuple(p.name for p in placeholders), name,
                       batch_specialised=specialised, batch=batch)


def _batch_size(inputs: Sequence[torch.Tensor]) -> int | None:
    return inputs[0].shape[0] if inputs and inputs[0].dim() else None


def _batch_dependence(model: nn.Module, graph: fx.Graph, example_inputs: Sequence[torch.Tensor],
                      leaf_modules: Sequence[type]) -> str | None:
    """Why ``graph``, traced reading shapes, holds for its batch size only; ``None`` if it holds for another.

    Python that reads a size specialises the graph to it (:mod:`anode_plan.tracing.capture`).
    The model is traced once more at another batch size (dimension 0 of every input,
    on fake tensors); where the two graphs differ, the first node that differs is
    named, with the line of ``forward`` that made it.
    """
    batch = _batch_size(example_inputs)
    if batch is None:
        return None
    other = 2 * batch + 1
    before = set(vars(model))
    try:
        second = ShapeTracer(example_inputs, tuple(leaf_modules), batch=other).trace(model)
        signatures = graph_signature(graph, model), graph_signature(second, model)
    except Exception as error:
        return (f"{type(model).__name__}.forward cannot be traced at batch {other} ({type(error).__name__}: {error}), "
                f"so its graph holds for batch {batch} only")
    finally:
        for added in set(vars(model)) - before:  # the second trace's tensor constants
            delattr(model, added)
    for mine, theirs in zip(*signatures, strict=False):
        if mine != theirs:
            node = next(n for n, entry in zip(graph.nodes, signatures[0]) if entry is mine)
            line = user_line(node)
            where = f", made at {line}" if line else ""
            return (f"fx node {node.format_node()} holds a number computed from the batch size by Python{where}")
    if len(graph.nodes) != len(second.nodes):
        return f"the graph has {len(graph.nodes)} nodes at batch {batch} and {len(second.nodes)} at batch {other}"
    return None


def _check_not_compiled(model: nn.Module) -> None:
    """Refuse modules compiled with ``torch.compile``: the cost model would measure the wrong program.

    Each stage's memory is measured by running it eagerly on fake tensors, but a compiled
    graph saves the tensors AOTAutograd's partitioner picks, and its forward returns them
    all at once. With each ODE function of ``ode_resnet`` compiled, the measured peak went
    6-7% over the budget. Silently breaking the budget is worse than refusing.
    """
    if "torch._dynamo" not in sys.modules:
        return  # torch.compile imports it: nothing can be compiled yet (and importing it costs a second)
    from torch._dynamo.eval_frame import OptimizedModule  # optional: loaded by torch.compile, if it ran

    for name, module in model.named_modules():
        where = f"module {name!r} ({type(module).__name__})" if name else f"the model ({type(module).__name__})"
        if isinstance(module, OptimizedModule):
            how = "it is the result of torch.compile(module)"
        elif getattr(module, "_compiled_call_impl", None) is not None:
            how = "module.compile() was called on it"
        elif hasattr(module.__dict__.get("forward"), "_torchdynamo_orig_callable"):
            how = "its forward was replaced by torch.compile(forward)"
        else:
            continue
        raise CompiledModuleError(
            f"{where} is compiled with torch.compile: {how}. anode-plan measures every stage's memory on the "
            "eager module, and a compiled graph saves other tensors for backward (on ode_resnet a compiled ODE "
            "function ran 6-7% over its budget), so the budget could not be kept. Pass the module before "
            "torch.compile (for OptimizedModule, its ._orig_mod) to anode_plan.compile.")


def _check_inputs(model: nn.Module, example_inputs: Any) -> None:
    name = type(model).__name__
    if not isinstance(example_inputs, (tuple, list)) or not example_inputs:
        raise ExampleInputsError(
            f"example_inputs must be a non-empty tuple of the arguments of {name}.forward, e.g. "
            f"example_inputs=(x,), got {type(example_inputs).__name__}")
    try:
        inspect.signature(model.forward).bind(*example_inputs)
    except TypeError as error:
        raise ExampleInputsError(f"example_inputs do not match {name}.forward{inspect.signature(model.forward)}: "
                                 f"{error}") from error
    for position, value in enumerate(example_inputs):
        if not isinstance(value, torch.Tensor):
            raise ExampleInputsError(f"example_inputs[{position}] is a {type(value).__name__}; anode-plan "
                                     "plans tensor inputs only (bind other arguments with functools.partial)")


def _where(error: Exception) -> str:
    tb = error.__traceback__
    last = None
    while tb is not None:
        if "torch/fx" not in tb.tb_frame.f_code.co_filename:
            last = tb
        tb = tb.tb_next
    if last is None:
        return ""
    return f" at {last.tb_frame.f_code.co_filename}:{last.tb_lineno}"


def _failing_module(model: nn.Module, error: Exception) -> tuple[str, nn.Module] | None:
    """The innermost submodule of ``model`` whose ``forward`` was running when tracing failed."""
    names = {id(module): qualname for qualname, module in model.named_modules() if qualname}
    found = None
    tb = error.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if tb.tb_frame.f_code.co_name == "forward" and id(owner) in names:
            found = (names[id(owner)], owner)
        tb = tb.tb_next
    return found


def _unit_of(node: fx.Node) -> str | None:
    """The layer unit a node belongs to: the first two parts of its module's path.

    Layer groups are cut where the unit changes, so ``conv1``, ``layer1.0`` (a whole
    residual block) and ``fc`` become stages of their own and the planners can place
    checkpoints between them. Functions and methods join the unit of the module before.
    """
    if node.op != "call_module":
        return None
    return ".".join(str(node.target).split(".")[:2])


def _mutates_input(model: nn.Module, node: fx.Node) -> bool:
    """Whether a node writes into one of its inputs (``ReLU(inplace=True)``, ``x.add_(y)``).

    A stage boundary never goes right before such a node: the value it overwrites may be
    a checkpoint region's saved input.
    """
    if node.op == "call_module":
        return bool(getattr(model.get_submodule(node.target), "inplace", False))
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return bool(node.kwargs.get("inplace")) or (name.startswith("i") and name[1:] in _OPERATORS) or \
            (name.endswith("_") and not name.endswith("__"))
    return False


_OPERATORS = {"add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "and", "or", "xor", "lshift", "rshift",
              "matmul"}


def _block_arguments(node: fx.Node) -> tuple[tuple[fx.Node, ...], tuple[fx.Node, ...]]:
    """The state nodes (one, or the components of a tuple) and the context nodes of a block call."""
    state = node.args[0] if node.args else None
    z_nodes = (state,) if isinstance(state, fx.Node) else tuple(state) if isinstance(state, (tuple, list)) else ()
    context = node.args[1:]
    if node.kwargs or not z_nodes or not all(isinstance(n, fx.Node) for n in (*z_nodes, *context)):
        raise UntraceableModelError(
            f"ODEBlock {node.target!r} is called as {node.format_node()}; anode-plan plans blocks called as "
            "block(z) or block((z1, z2, ...)) with tensors computed by the model, optionally followed by constant "
            "tensor arguments block(z, c1, ...), and no keyword arguments")
    return z_nodes, tuple(context)


def _check_not_overwritten(model: nn.Module, block_node: fx.Node, inputs: tuple[fx.Node, ...],
                           position: dict[fx.Node, int]) -> None:
    """Raise if the graph writes into an input of ``block_node`` in place after the block has run."""
    for value in inputs:
        for user in value.users:
            if position[user] > position[block_node] and user.args and user.args[0] is value \
                    and _mutates_input(model, user):
                what = f"{user.op} {getattr(user.target, '__name__', user.target)}"
                raise InPlaceModificationError(
                    f"{type(model).__name__}.forward overwrites {value.name!r}, an input of ODE block "
                    f"{block_node.target!r}, in place after the block ran (fx node {user.name!r}: {what}). "
                    "anode-plan may keep the block's input and recompute the block from it in backward, so the "
                    "gradients would be silently wrong. Use the out-of-place form (z = z.relu(), "
                    "ReLU(inplace=False), z = z + y) or apply it to a copy.")


def _cut(model: nn.Module, graph: fx.Graph, placeholders: list[fx.Node]) -> tuple[list[StageSpec], list[BlockSpec]]:
    nodes = list(graph.nodes)
    position = {node: i for i, node in enumerate(nodes)}
    last_use = {node: max((position[user] for user in node.users), default=position[node]) for node in nodes}
    stateful = [n for n in nodes if n.op not in ("get_attr", "output")]
    graph_names = {n.name for n in stateful}

    def live_after(index: int) -> tuple[str, ...]:
        """Values computed at or before position ``index`` and used after it."""
        return tuple(n.name for n in stateful if position[n] <= index < last_use[n])

    stages: list[StageSpec] = []
    blocks: list[BlockSpec] = []
    group: list[fx.Node] = []
    group_key: str | None = None
    state = tuple(p.name for p in placeholders)

    def close_group(end_index: int) -> None:
        nonlocal state, group
        if group:
            out = live_after(end_index)
            label = group[0].name if len(group) == 1 else f"{group[0].name}..{group[-1].name}"
            stages.append(StageSpec(label, state, out, nodes=tuple(n.name for n in group)))
            state, group = out, []

    for node in nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        module = model.get_submodule(node.target) if node.op == "call_module" else None
        if not isinstance(module, ODEBlock):
            key = None if _mutates_input(model, node) else _unit_of(node)
            if group and key is not None and key != group_key:
                close_group(position[node] - 1)
            group_key = key if key is not None else group_key
            group.append(node)
            continue
        group_key = None
        close_group(position[node] - 1)
        z_nodes, context_nodes = _block_arguments(node)
        z_in = z_nodes[0].name if isinstance(node.args[0], fx.Node) else tuple(n.name for n in z_nodes)
        z_names = tuple(n.name for n in z_nodes)
        for name in z_names + tuple(n.name for n in context_nodes):
            if name not in state:
                raise UntraceableModelError(
                    f"ODEBlock {node.target!r} takes {name!r}, which is a parameter or constant rather than a value "
                    "computed from the model inputs; pass it through a layer first, or keep it inside the ODE "
                    "function as a parameter or buffer")
        _check_not_overwritten(model, node, z_nodes + context_nodes, position)
        after = live_after(position[node])
        # Values of the graph carried past the block (a reversible block before this one leaves
        # parts in the state that nothing reads: the first step consumes them).
        carried = tuple(n for n in state if (n not in z_names or n in after) and n in graph_names)
        context = tuple(n.name for n in context_nodes)
        names = state
        start = len(stages)
        parts = CARRIED.get(module.method, ())
        for step in range(module.nt):
            last = step == module.nt - 1
            if parts:  # a reversible method carries several tensors: one value each, the first the solution
                z_out = tuple(node.name if last and c == 0 else f"{node.name}@{step + 1}.{part}"
                              for c, part in enumerate(parts))
                # The last step's other parts stay in the state until the next stage (a
                # Reconstruct ending here keeps them); nothing reads them.
                out = (after + z_out[1:]) if last else carried + z_out
            else:
                z_out = node.name if last else f"{node.name}@{step + 1}"
                out = after if last else carried + (z_out,)
            z_cur = z_in if step == 0 else (tuple(f"{node.name}@{step}.{part}" for part in parts) if parts
                                            else f"{node.name}@{step}")
            stages.append(StageSpec(f"{node.target}@{step}", names, out, block_target=node.target,
                                    block=len(blocks), step=step, z_in=z_cur, z_out=z_out, context=context))
            names = out
        blocks.append(BlockSpec(node.target, start, len(stages), module.nt, module.method))
        state = names
    close_group(len(nodes) - 2)  # the output node is last; keep what it returns
    if not stages:
        raise UntraceableModelError(f"{type(model).__name__}.forward has no operations to plan")
    return stages, blocks
