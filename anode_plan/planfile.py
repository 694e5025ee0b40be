"""Plans as files: save a schedule to YAML, read it back, and check it against a model.

A plan file records what a schedule needs to be reused without planning again: the
schedule itself (nested ``Run``/``Region`` operations), the planner that made it, the
budget, the input shapes and dtypes, a digest of the traced model's structure, and the
chain of measured stages it was planned on. ``save_plan`` writes one;
:func:`anode_plan.load_plan` reads one back as an equal :class:`anode_plan.Plan`; and
``anode_plan.compile(model, plan="plan.yaml")`` reuses it.

Nothing in a file is trusted. Reading checks every field's type
(:class:`PlanFileError`), validates the schedule and simulates it on the recorded chain
(:class:`PlanInvariantError`, :class:`PlanOverBudgetError`). Compiling with a plan traces
and measures the model again, compares its structure and inputs with the file's
(:class:`PlanMismatchError`), and simulates the schedule on the fresh measurements, so a
hand-edited chain cannot make a schedule look smaller than it is.

The format, version 1 (``Run(i)`` is written ``i``; a ``Region`` as a mapping; a
``Reconstruct`` as ``{reconstruct: [start, stop]}``)::

    format: anode-plan plan
    version: 1
    fingerprint: 3e5d0c7a91b2f4d8      # structure_digest(traced)
    inputs: [{shape: [32, 3, 32, 32], dtype: torch.float32}]
    budget_bytes: 30000000
    planner: chain-dp
    description: 'flat DP over 19 stages: 3 regions, nesting depth 1, ...'
    proven_optimal: false
    schedule: [0, 1, {region: [3, 6], body: [...]}, ...]
    chain: {name: ..., stages: [...], blocks: [...], ...}

Only ``yaml.safe_load`` and ``yaml.safe_dump`` are used.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from dataclasses import dataclass, fields
from typing import Any, Sequence

import torch
import yaml
from torch.fx.node import _get_qualified_name

from anode_plan.budget import budget_for_peak, usable_bytes
from anode_plan.errors import PlanFileError, PlanInvariantError, PlanMismatchError, PlanOverBudgetError
from anode_plan.trace import TracedModel
from planners import (Block, Chain, Reconstruct, Reconstruction, Region, Run, Schedule, Simulation, Stage,
                      format_bytes, simulate_plan)
from planners.chain import WORKSPACE_FIELDS, Sketch
from planners.feasibility import peak_workspace
from planners.schedule import Op

FORMAT = "anode-plan plan"
VERSION = 1
_STAGE_FIELDS = tuple(f.name for f in fields(Stage))
_RECURSION_LIMIT = 20_000  # PyYAML recurses per level; a block with one snapshot nests nt regions deep
_REPLAN = ("plan again with anode_plan.compile(model, memory_budget=..., example_inputs=...) and save the new "
           "plan")


@dataclass(frozen=True)
class SavedPlan:
    """What a plan file holds, read and type-checked but not yet checked against a model.

    :func:`anode_plan.load_plan` turns it into a :class:`anode_plan.Plan`; the fields
    mean the same as there. ``source`` names the file in error messages.
    """

    schedule: Schedule
    chain: Chain
    budget_bytes: int
    input_shapes: tuple[tuple[int, ...], ...]
    input_dtypes: tuple[str, ...]
    fingerprint: str
    source: str
    workspace_margin: float = 0.0
    backend: str = "eager"


def structure_digest(traced: TracedModel) -> str:
    """A short, stable digest of a traced model's structure: its graph, stages and ODE blocks.

    Two models with the same digest cut into the same stages, so a schedule for one is a
    schedule for the other. Sizes are not part of it: the memory a schedule needs is
    measured again whenever a plan is reused.
    """
    parts = []
    for node in traced.graph.nodes:
        target = _get_qualified_name(node.target) if callable(node.target) else str(node.target)
        parts.append(f"{node.op}:{target}")
    parts += [f"stage:{stage.name}" for stage in traced.stages]
    parts += [f"block:{block.target}:{block.nt}:{block.method}" for block in traced.blocks]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------- writing


def dump_plan(plan: Any) -> str:
    """The YAML text of ``plan`` (an :class:`anode_plan.Plan`), as :func:`save_plan` writes it."""
    sim, chain = plan.simulation, plan.chain
    header = [
        f"anode-plan plan for {chain.name}: budget {format_bytes(plan.budget_bytes)}",
        f"schedule {plan.schedule.planner}: {plan.schedule.description}",
        f"predicted peak {format_bytes(sim.peak_bytes)}, recompute overhead {sim.recompute_overhead:+.1%} "
        "(recomputed whenever the plan is loaded)",
        'reuse it with anode_plan.compile(model, plan="this file"); it is checked against the model again',
    ]
    data = {
        "format": FORMAT,
        "version": VERSION,
        "fingerprint": plan.fingerprint,
        "inputs": [{"shape": list(shape), "dtype": dtype} for shape, dtype in zip(plan.input_shapes,
                                                                                  plan.input_dtypes)],
        "budget_bytes": plan.budget_bytes,
        "workspace_margin": plan.workspace_margin,
        "backend": plan.backend,
        "planner": plan.schedule.planner,
        "description": plan.schedule.description,
        "proven_optimal": plan.schedule.proven_optimal,
        "schedule": [_op_to_data(op) for op in plan.schedule.ops],
        "sketched": list(plan.schedule.sketched),
        "chain": _chain_to_data(chain),
    }
    with _deep_recursion():
        body = yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=120)
    return "".join(f"# {line}\n" for line in header) + body


def save_plan(plan: Any, path: str | os.PathLike) -> None:
    """Write ``plan`` (e.g. ``compiled.plan``) to ``path`` as YAML; reuse it with ``compile(model, plan=path)``."""
    with open(path, "w", encoding="utf-8") as stream:
        stream.write(dump_plan(plan))


def _op_to_data(op: Op) -> Any:
    if isinstance(op, Run):
        return op.stage
    if isinstance(op, Reconstruct):
        return {"reconstruct": [op.start, op.stop]}
    return {"region": [op.start, op.stop], "body": [_op_to_data(inner) for inner in op.body]}


def _stage_to_data(stage: Stage) -> dict:
    entry = {}
    for name in _STAGE_FIELDS:
        value = getattr(stage, name)
        if isinstance(value, Reconstruction):
            value = {"step_bytes": value.step_bytes, "inverse_cost": value.inverse_cost,
                     "error_per_step": value.error_per_step, "solution_bytes": value.solution_bytes}
        elif isinstance(value, Sketch):
            value = {"layers": list(value.layers), "relative_errors": list(value.relative_errors),
                     "probes": value.probes, "seed": value.seed, "stage": _stage_to_data(value.stage)}
        entry[name] = list(value) if isinstance(value, tuple) else value
    return entry


def _chain_to_data(chain: Chain) -> dict:
    stages = [_stage_to_data(stage) for stage in chain.stages]
    return {
        "name": chain.name,
        "cost_unit": chain.cost_unit,
        "input_grad": chain.input_grad,
        "head_bytes": chain.head_bytes,
        "param_grad_bytes": list(chain.param_grad_bytes),
        "value_bytes": list(chain.value_bytes),
        "gradless_values": list(chain.gradless_values),
        "unsketchable_layers": list(chain.unsketchable_layers),
        "state_values": [list(values) for values in chain.state_values],
        "blocks": [{"name": b.name, "start": b.start, "stop": b.stop, "method": b.method} for b in chain.blocks],
        "stages": stages,
    }


# ---------------------------------------------------------------------------------------- reading


def read_plan_file(path: str | os.PathLike) -> SavedPlan:
    """Read and type-check a plan file; raises :class:`PlanFileError` saying which field is wrong.

    The schedule is not validated here; :func:`check_plan_fits` does that.
    """
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as stream, _deep_recursion():
            data = yaml.safe_load(stream)
    except OSError as error:
        raise PlanFileError(f"cannot read plan file {source!r}: {error.strerror or error}") from error
    except yaml.constructor.ConstructorError as error:
        raise PlanFileError(f"{source}: uses a YAML tag that safe loading refuses ({error.problem}); a plan file "
                            "is plain YAML. Save the plan again with anode_plan.save_plan(compiled.plan, path).") \
            from error
    except yaml.YAMLError as error:
        raise PlanFileError(f"{source}: not valid YAML ({error}). Save the plan again with "
                            "anode_plan.save_plan(compiled.plan, path).") from error
    reader = _Reader(source)
    top = reader.mapping(data, "the file")
    if top.get("format") != FORMAT:
        raise PlanFileError(f"{source}: not an anode-plan plan file (format is {top.get('format')!r}, expected "
                            f"{FORMAT!r}); write one with anode_plan.save_plan(compiled.plan, path)")
    version = reader.integer(top, "version")
    if version != VERSION:
        raise PlanFileError(f"{source}: plan file version {version}, but this anode-plan reads version {VERSION}; "
                            f"{_REPLAN}")
    inputs = reader.sequence(reader.field(top, "inputs"), "inputs")
    shapes, dtypes = [], []
    for position, entry in enumerate(inputs):
        where = f"inputs[{position}]"
        entry = reader.mapping(entry, where)
        shapes.append(tuple(reader.integer_list(entry, "shape", where, minimum=0)))
        dtype = reader.string(entry, "dtype", where)
        if not isinstance(getattr(torch, dtype.removeprefix("torch."), None), torch.dtype):
            raise PlanFileError(f"{source}: {where}.dtype {dtype!r} is not a torch dtype such as 'torch.float32'")
        dtypes.append(dtype)
    budget_bytes = reader.integer(top, "budget_bytes", minimum=1)
    margin = reader.number(top, "workspace_margin", "the file") if "workspace_margin" in top else 0.0
    if not 0.0 <= margin < 1.0:
        raise PlanFileError(f"{source}: workspace_margin is {margin!r}, not a fraction in [0, 1); {_REPLAN}")
    backend = reader.string(top, "backend") if "backend" in top else "eager"
    if backend not in ("eager", "inductor"):
        raise PlanFileError(f"{source}: backend is {backend!r}, not 'eager' or 'inductor'; {_REPLAN}")
    schedule = Schedule(ops=tuple(reader.op(op, f"schedule[{i}]")
                                  for i, op in enumerate(reader.sequence(reader.field(top, "schedule"), "schedule"))),
                        planner=reader.string(top, "planner"),
                        proven_optimal=reader.boolean(top, "proven_optimal"),
                        description=reader.string(top, "description"),
                        sketched=tuple(reader.integer_list(top, "sketched", "the file", minimum=0)
                                       if "sketched" in top else ()))
    return SavedPlan(schedule=schedule, chain=reader.chain(reader.field(top, "chain")), budget_bytes=budget_bytes,
                     input_shapes=tuple(shapes), input_dtypes=tuple(dtypes),
                     fingerprint=reader.string(top, "fingerprint"), source=source, workspace_margin=margin,
                     backend=backend)


@contextlib.contextmanager
def _deep_recursion():
    """Let PyYAML walk schedules nested hundreds of regions deep (revolve with one snapshot nests ``nt``)."""
    previous = sys.getrecursionlimit()
    sys.setrecursionlimit(max(previous, _RECURSION_LIMIT))
    try:
        yield
    finally:
        sys.setrecursionlimit(previous)


class _Reader:
    """Typed access to the parsed YAML; every failure is a :class:`PlanFileError` naming the field."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, expected: str, value: Any) -> PlanFileError:
        return PlanFileError(f"{self.source}: {where} must be {expected}, got {value!r} "
                             f"({type(value).__name__}). The file was edited or corrupted; {_REPLAN}.")

    def mapping(self, value: Any, where: str) -> dict:
        if not isinstance(value, dict):
            raise self.fail(where, "a mapping", value)
        return value

    def sequence(self, value: Any, where: str) -> list:
        if not isinstance(value, list):
            raise self.fail(where, "a list", value)
        return value

    def field(self, data: dict, key: str, where: str = "") -> Any:
        if key not in data:
            raise PlanFileError(f"{self.source}: {where + '.' if where else ''}{key} is missing. The file was edited "
                                f"or corrupted; {_REPLAN}.")
        return data[key]

    def integer(self, data: dict, key: str, where: str = "", *, minimum: int | None = None) -> int:
        value = self.field(data, key, where)
        if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
            expected = "an int" if minimum is None else f"an int >= {minimum}"
            raise self.fail(f"{where + '.' if where else ''}{key}", expected, value)
        return value

    def boolean(self, data: dict, key: str, where: str = "") -> bool:
        value = self.field(data, key, where)
        if not isinstance(value, bool):
            raise self.fail(f"{where + '.' if where else ''}{key}", "true or false", value)
        return value

    def number(self, data: dict, key: str, where: str) -> float:
        value = self.field(data, key, where)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise self.fail(f"{where}.{key}", "a number >= 0", value)
        return float(value)

    def string(self, data: dict, key: str, where: str = "") -> str:
        value = self.field(data, key, where)
        if not isinstance(value, str):
            raise self.fail(f"{where + '.' if where else ''}{key}", "a string", value)
        return value

    def _strings(self, value: Any, where: str) -> list[str]:
        items = self.sequence(value, where)
        if not all(isinstance(item, str) for item in items):
            raise self.fail(where, "a list of strings", items)
        return items

    def integer_list(self, data: dict, key: str, where: str, *, minimum: int | None = None) -> list[int]:
        return self.integers(self.field(data, key, where), f"{where}.{key}", minimum=minimum)

    def integers(self, value: Any, where: str, *, minimum: int | None = None) -> list[int]:
        found = []
        for position, item in enumerate(self.sequence(value, where)):
            if isinstance(item, bool) or not isinstance(item, int) or (minimum is not None and item < minimum):
                raise self.fail(f"{where}[{position}]", "an int" if minimum is None else f"an int >= {minimum}", item)
            found.append(item)
        return found

    def op(self, value: Any, where: str) -> Op:
        if isinstance(value, int) and not isinstance(value, bool):
            return Run(value)
        if isinstance(value, dict) and set(value) == {"region", "body"}:
            bounds = self.integer_list(value, "region", where)
            if len(bounds) != 2:
                raise self.fail(f"{where}.region", "[start, stop]", value["region"])
            body = self.sequence(value["body"], f"{where}.body")
            return Region(bounds[0], bounds[1], tuple(self.op(inner, f"{where}.body[{i}]")
                                                      for i, inner in enumerate(body)))
        if isinstance(value, dict) and set(value) == {"reconstruct"}:
            bounds = self.integer_list(value, "reconstruct", where)
            if len(bounds) != 2:
                raise self.fail(f"{where}.reconstruct", "[start, stop]", value["reconstruct"])
            return Reconstruct(bounds[0], bounds[1])
        raise self.fail(where, "a stage number (Run), a mapping {region: [start, stop], body: [...]} or "
                        "{reconstruct: [start, stop]}", value)

    def chain(self, value: Any) -> Chain:
        data = self.mapping(value, "chain")
        stages = []
        for position, entry in enumerate(self.sequence(self.field(data, "stages", "chain"), "chain.stages")):
            stages.append(self.stage(self.mapping(entry, f"chain.stages[{position}]"), f"chain.stages[{position}]"))
        blocks = []
        for position, entry in enumerate(self.sequence(self.field(data, "blocks", "chain"), "chain.blocks")):
            where = f"chain.blocks[{position}]"
            entry = self.mapping(entry, where)
            blocks.append(Block(self.string(entry, "name", where), self.integer(entry, "start", where, minimum=0),
                                self.integer(entry, "stop", where, minimum=0), self.string(entry, "method", where)))
        states = self.sequence(self.field(data, "state_values", "chain"), "chain.state_values")
        try:
            chain = Chain(stages=tuple(stages), blocks=tuple(blocks),
                         param_grad_bytes=tuple(self.integer_list(data, "param_grad_bytes", "chain", minimum=0)),
                         input_grad=self.boolean(data, "input_grad", "chain"),
                         head_bytes=self.integer(data, "head_bytes", "chain", minimum=0),
                         name=self.string(data, "name", "chain"), cost_unit=self.string(data, "cost_unit", "chain"),
                         state_values=tuple(tuple(self.integers(values, f"chain.state_values[{i}]", minimum=0))
                                            for i, values in enumerate(states)),
                         value_bytes=tuple(self.integer_list(data, "value_bytes", "chain", minimum=0)),
                         gradless_values=tuple(self.integer_list(data, "gradless_values", "chain", minimum=0))
                         if "gradless_values" in data else (),
                         unsketchable_layers=tuple(self._strings(data.get("unsketchable_layers", []),
                                                                 "chain.unsketchable_layers")))
        except (ValueError, IndexError) as error:
            raise self.inconsistent(str(error)) from error
        for position, stage in enumerate(chain.stages):
            if any(p >= len(chain.param_grad_bytes) for p in stage.param_ids):
                raise self.inconsistent(f"chain.stages[{position}].param_ids {list(stage.param_ids)} name parameters "
                                        f"beyond the {len(chain.param_grad_bytes)} of param_grad_bytes")
            if any(v >= len(chain.value_bytes) for v in stage.saved_values or ()):
                raise self.inconsistent(f"chain.stages[{position}].saved_values {list(stage.saved_values)} name "
                                        f"values beyond the {len(chain.value_bytes)} of value_bytes")
        return chain

    def inconsistent(self, reason: str) -> PlanFileError:
        return PlanFileError(f"{self.source}: the recorded chain is inconsistent: {reason}. The file was edited or "
                             f"corrupted; {_REPLAN}.")

    def stage(self, data: dict, where: str) -> Stage:
        unknown = sorted(set(data) - set(_STAGE_FIELDS))
        if unknown:
            raise PlanFileError(f"{self.source}: {where} has unknown fields {unknown}; a stage has "
                                f"{list(_STAGE_FIELDS)}. The file was edited or corrupted; {_REPLAN}.")
        values: dict[str, Any] = {"name": self.string(data, "name", where)}
        for key in ("input_bytes", "output_bytes", "tape_bytes", "fwd_taped_bytes", "fwd_untaped_bytes", "bwd_bytes"):
            values[key] = self.integer(data, key, where, minimum=0)
        if "rerun_taped_bytes" in data:  # files written before it existed re-run at fwd_taped_bytes
            values["rerun_taped_bytes"] = self.integer(data, "rerun_taped_bytes", where, minimum=0)
        for key in WORKSPACE_FIELDS:  # files written before calibration have none
            if key in data:
                values[key] = self.integer(data, key, where, minimum=0)
        if "workspace_kernels" in data:
            kernels = self.sequence(data["workspace_kernels"], f"{where}.workspace_kernels")
            if not all(isinstance(kernel, str) for kernel in kernels):
                raise self.fail(f"{where}.workspace_kernels", "a list of strings", kernels)
            values["workspace_kernels"] = tuple(kernels)
        if "uses_rng" in data:
            values["uses_rng"] = self.boolean(data, "uses_rng", where)
        if data.get("reconstruct") is not None:
            offer = self.mapping(data["reconstruct"], f"{where}.reconstruct")
            values["reconstruct"] = Reconstruction(
                self.integer(offer, "step_bytes", f"{where}.reconstruct", minimum=0),
                self.number(offer, "inverse_cost", f"{where}.reconstruct"),
                self.number(offer, "error_per_step", f"{where}.reconstruct"),
                self.integer(offer, "solution_bytes", f"{where}.reconstruct", minimum=0))
        if data.get("sketch") is not None:
            offer = self.mapping(data["sketch"], f"{where}.sketch")
            layers = self._strings(self.field(offer, "layers", f"{where}.sketch"), f"{where}.sketch.layers")
            errors = self.sequence(self.field(offer, "relative_errors", f"{where}.sketch"),
                                   f"{where}.sketch.relative_errors")
            if not all(isinstance(e, (int, float)) and not isinstance(e, bool) and e >= 0 for e in errors):
                raise self.fail(f"{where}.sketch.relative_errors", "a list of numbers >= 0", errors)
            try:
                values["sketch"] = Sketch(self.stage(self.mapping(self.field(offer, "stage", f"{where}.sketch"),
                                                                  f"{where}.sketch.stage"), f"{where}.sketch.stage"),
                                          tuple(layers), tuple(errors),
                                          self.integer(offer, "probes", f"{where}.sketch", minimum=1),
                                          self.integer(offer, "seed", f"{where}.sketch"))
            except ValueError as error:
                raise self.inconsistent(f"{where}.sketch: {error}") from None
        for key in ("saves_input", "saves_output"):
            values[key] = self.boolean(data, key, where)
        for key in ("fwd_cost", "bwd_cost"):
            values[key] = self.number(data, key, where)
        values["param_ids"] = tuple(self.integer_list(data, "param_ids", where, minimum=0))
        for key in ("block", "step"):
            values[key] = None if data.get(key) is None else self.integer(data, key, where, minimum=0)
        values["saved_values"] = (None if data.get("saved_values") is None
                                  else tuple(self.integer_list(data, "saved_values", where, minimum=0)))
        try:
            return Stage(**values)
        except ValueError as error:
            raise self.inconsistent(f"{where}: {error}") from None


# ---------------------------------------------------------------------------------------- checking


def check_plan_fits(schedule: Schedule, chain: Chain, budget_bytes: int, source: str,
                    workspace_margin: float = 0.0) -> Simulation:
    """Validate ``schedule`` on ``chain`` and simulate it; its peak must be within the part of
    ``budget_bytes`` a plan may use (:func:`anode_plan.budget.usable_bytes`).

    Returns the simulation (with its timeline). Raises :class:`PlanInvariantError` when the
    schedule would not compute the gradients (a stage skipped, repeated or out of order)
    and :class:`PlanOverBudgetError` when it needs more than the budget.
    """
    try:
        simulation = simulate_plan(chain, schedule, timeline=True)
    except PlanInvariantError as error:
        raise PlanInvariantError(f"{source}: the schedule does not compute the gradients of {chain.name} "
                                 f"({len(chain.stages)} stages): {error}. The plan was edited or corrupted; "
                                 f"{_REPLAN}.") from None
    except (IndexError, KeyError) as error:  # a schedule over stages the chain lacks, caught by the validator first
        raise PlanInvariantError(f"{source}: the schedule does not fit {chain.name}: {error!r}; {_REPLAN}.") from None
    usable = usable_bytes(budget_bytes, workspace_margin)
    if simulation.peak_bytes > usable:
        kept = f" (a plan may use {usable} bytes of it; the rest is kept free)"
        raise PlanOverBudgetError(
            f"{source}: the schedule ({schedule.planner}: {schedule.description}) needs "
            f"{format_bytes(simulation.peak_bytes)} ({simulation.peak_bytes} bytes) on {chain.name}"
            f"{peak_workspace(chain, simulation)}, above the budget {format_bytes(budget_bytes)} ({budget_bytes} "
            f"bytes){kept}. The plan was edited, or the model's memory has changed since it was planned (plans made before "
            "anode-plan measured kernel workspaces did not count them); give memory_budget="
            f"{budget_for_peak(simulation.peak_bytes, workspace_margin)} or more, or {_REPLAN}.",
            peak_bytes=simulation.peak_bytes, budget_bytes=budget_bytes)
    return simulation


def input_differences(plan: Any, example_inputs: Sequence[torch.Tensor]) -> list[str]:
    """How ``example_inputs`` differ from the inputs ``plan`` was made for (empty if they do not)."""
    if len(example_inputs) != len(plan.input_shapes):
        return [f"the plan takes {len(plan.input_shapes)} inputs, example_inputs has {len(example_inputs)}"]
    found = []
    for position, (value, shape, dtype) in enumerate(zip(example_inputs, plan.input_shapes, plan.input_dtypes)):
        if not isinstance(value, torch.Tensor):
            found.append(f"input {position} is a {type(value).__name__}, not a tensor")
            continue
        if tuple(value.shape) != shape:
            found.append(f"input {position} has shape {tuple(value.shape)}, the plan {shape}")
        if str(value.dtype) != dtype:
            found.append(f"input {position} has dtype {value.dtype}, the plan {dtype}")
    return found


def structure_differences(plan: Any, traced: TracedModel) -> list[str]:
    """How ``traced`` differs from the model ``plan`` was made for (empty if the digests agree)."""
    digest = structure_digest(traced)
    if digest == plan.fingerprint:
        return []
    chain = plan.chain
    found = []
    theirs = [(b.name, b.nt, b.method) for b in chain.blocks]
    ours = [(b.target, b.nt, b.method) for b in traced.blocks]
    if len(theirs) != len(ours):
        found.append(f"the plan has {len(theirs)} ODE blocks, the model {len(ours)}")
    for (name, nt, method), (our_name, our_nt, our_method) in zip(theirs, ours):
        if (name, nt, method) != (our_name, our_nt, our_method):
            found.append(f"ODE block {name} (nt={nt}, {method}) in the plan is {our_name} (nt={our_nt}, "
                         f"{our_method}) in the model")
    if len(chain.stages) != len(traced.stages):
        found.append(f"the plan has {len(chain.stages)} stages, the model {len(traced.stages)}")
    if not found:
        for index, (stage, spec) in enumerate(zip(chain.stages, traced.stages)):
            if stage.name != spec.name:
                found.append(f"stage {index} is {stage.name!r} in the plan, {spec.name!r} in the model")
                break
    if not found:
        found.append("the layers of the traced graph differ (same stages and ODE blocks, other operations)")
    found.append(f"structure digest {plan.fingerprint} in the plan, {digest} for the model")
    return found


def check_plan_matches(plan: Any, traced: TracedModel, example_inputs: Sequence[torch.Tensor], source: str) -> None:
    """Raise :class:`PlanMismatchError` listing every way ``traced``/``example_inputs`` differ from ``plan``'s."""
    found = input_differences(plan, example_inputs) + structure_differences(plan, traced)
    if found:
        raise PlanMismatchError(f"{source} was made for {plan.chain.name} and does not fit this model or input: "
                                + "; ".join(found) + f". Pass the model and input shapes it was made for, or "
                                f"{_REPLAN}.", differences=tuple(found))


def example_inputs_for(plan: Any, model: torch.nn.Module) -> tuple[torch.Tensor, ...]:
    """Inputs shaped like the ones ``plan`` was made for, on ``model``'s device (values are irrelevant)."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    inputs = []
    for shape, dtype in zip(plan.input_shapes, plan.input_dtypes):
        dtype = getattr(torch, dtype.removeprefix("torch."))
        value = torch.zeros(shape, dtype=dtype, device=device)
        inputs.append(value.requires_grad_(plan.chain.input_grad and value.is_floating_point()))
    return tuple(inputs)
