"""Trace a model with torch.fx and cut it into the stages of a chain.

``trace_model`` traces ``model.forward`` with every :class:`~anode_plan.ODEBlock` kept
as a leaf node, then cuts the graph into stages: each time step of each ODE block is
one *step* stage, and the other operations form *layer-group* stages, one per layer
unit (the first two parts of a module path: ``conv1``, ``layer1.0``, ``stem.2``).
Between two stages, the *state* is the tuple of values computed so far and still used
later, so skip connections that cross a block travel with it.

Parameters and constants (``get_attr`` nodes) are never part of a state: each stage
fetches them from the module when it runs.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import fx, nn

from anode_plan.errors import ExampleInputsError, UntraceableModelError
from anode_plan.ode import ODEBlock


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
        z_in / z_out: for a step, the names of the ODE state before and after it.
    """

    name: str
    in_names: tuple[str, ...]
    out_names: tuple[str, ...]
    nodes: tuple[str, ...] = ()
    block_target: str | None = None
    block: int | None = None
    step: int | None = None
    z_in: str | None = None
    z_out: str | None = None


@dataclass(frozen=True)
class BlockSpec:
    """An ODE block of a traced model: stages ``[start, stop)`` are its steps."""

    target: str
    start: int
    stop: int
    nt: int
    method: str


class _Tracer(fx.Tracer):
    def __init__(self, leaf_types: tuple[type, ...]) -> None:
        super().__init__()
        self.leaf_types = leaf_types

    def is_leaf_module(self, module: nn.Module, qualname: str) -> bool:
        if isinstance(module, (ODEBlock, *self.leaf_types)):
            return True
        return super().is_leaf_module(module, qualname)


class TracedModel:
    """A traced model cut into stages. Built by :func:`trace_model`; read by the cost model and runtime."""

    def __init__(self, graph: fx.Graph, stages: list[StageSpec], blocks: list[BlockSpec],
                 input_names: tuple[str, ...], model_name: str) -> None:
        self.graph = graph
        self.stages = stages
        self.blocks = blocks
        self.input_names = input_names
        self.model_name = model_name
        self.nodes = {node.name: node for node in graph.nodes}
        self.output_node = next(node for node in graph.nodes if node.op == "output")

    def build_output(self, root: nn.Module, state: dict[str, Any]) -> Any:
        """The model's return value, from the final state."""
        return fx.node.map_arg(self.output_node.args[0], lambda node: _value(root, node, state))

    def structure_fingerprint(self) -> str:
        """A string that changes when the traced structure changes (for saved plans)."""
        parts = [f"{node.op}:{node.target}" for node in self.graph.nodes]
        parts += [f"{b.target}:{b.nt}:{b.method}" for b in self.blocks]
        return "|".join(str(p) for p in parts)


def _value(root: nn.Module, node: Any, state: dict[str, Any]) -> Any:
    if not isinstance(node, fx.Node):
        return node
    if node.op == "get_attr":
        return fetch_attr(root, node.target)
    return state[node.name]


def fetch_attr(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


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
    env[spec.z_out] = block.step(spec.step, env[spec.z_in])
    return tuple(env[name] for name in spec.out_names)


def trace_model(model: nn.Module, example_inputs: Sequence[Any], *,
                leaf_modules: Sequence[type] = ()) -> TracedModel:
    """Trace ``model`` and cut it into stages; ODE blocks become one stage per time step.

    Raises :class:`UntraceableModelError` naming the module when fx cannot trace it,
    and :class:`ExampleInputsError` when ``example_inputs`` does not fit ``forward``.
    """
    name = type(model).__name__
    _check_inputs(model, example_inputs)
    tracer = _Tracer(tuple(leaf_modules))
    try:
        graph = tracer.trace(model)
    except Exception as error:
        where = _where(error)
        raise UntraceableModelError(
            f"torch.fx could not trace {name}.forward{where} ({type(error).__name__}: {error}). Mark the "
            "submodule with data-dependent control flow as a leaf with leaf_modules=[ThatModule], or make loop "
            "bounds Python ints.") from error
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    if len(placeholders) < len(example_inputs):
        raise ExampleInputsError(f"{name}.forward takes {len(placeholders)} inputs but example_inputs has "
                                 f"{len(example_inputs)}")
    placeholders = placeholders[:len(example_inputs)]
    stages, blocks = _cut(model, graph, placeholders)
    return TracedModel(graph, stages, blocks, tuple(p.name for p in placeholders), name)


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


def _unit_of(node: fx.Node) -> str | None:
    """The layer unit a node belongs to: the first two parts of its module's path.

    Layer groups are cut where the unit changes, so ``conv1``, ``layer1.0`` (a whole
    residual block) and ``fc`` become stages of their own and the planners can place
    checkpoints between them. Functions and methods join the unit of the module before.
    """
    if node.op != "call_module":
        return None
    return ".".join(str(node.target).split(".")[:2])


def _cut(model: nn.Module, graph: fx.Graph, placeholders: list[fx.Node]) -> tuple[list[StageSpec], list[BlockSpec]]:
    nodes = list(graph.nodes)
    position = {node: i for i, node in enumerate(nodes)}
    last_use = {node: max((position[user] for user in node.users), default=position[node]) for node in nodes}
    stateful = [n for n in nodes if n.op not in ("get_attr", "output")]

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
            key = _unit_of(node)
            if group and key is not None and key != group_key:
                close_group(position[node] - 1)
            group_key = key if key is not None else group_key
            group.append(node)
            continue
        group_key = None
        close_group(position[node] - 1)
        if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
            raise UntraceableModelError(
                f"ODEBlock {node.target!r} is called with {len(node.args)} positional and {len(node.kwargs)} keyword "
                "arguments; anode-plan plans blocks called as block(z) with one tensor")
        z_in = node.args[0].name
        if z_in not in state:
            raise UntraceableModelError(
                f"ODEBlock {node.target!r} integrates {z_in!r}, which is a parameter or constant rather than a value "
                "computed from the model inputs; pass it through a layer first")
        after = live_after(position[node])
        carried = tuple(n for n in state if n != z_in or z_in in after)
        start = len(stages)
        names = state
        for step in range(module.nt):
            z_out = node.name if step == module.nt - 1 else f"{node.name}@{step + 1}"
            out = after if step == module.nt - 1 else carried + (z_out,)
            z_cur = z_in if step == 0 else f"{node.name}@{step}"
            stages.append(StageSpec(f"{node.target}@{step}", names, out, block_target=node.target,
                                    block=len(blocks), step=step, z_in=z_cur, z_out=z_out))
            names = out
        blocks.append(BlockSpec(node.target, start, len(stages), module.nt, module.method))
        state = after
    close_group(len(nodes) - 2)  # the output node is last; keep what it returns
    if not stages:
        raise UntraceableModelError(f"{type(model).__name__}.forward has no operations to plan")
    return stages, blocks
