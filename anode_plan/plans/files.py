"""Plan files read back: every field's type checked (:class:`~anode_plan.PlanFileError`), and a :class:`Plan` made.

The format is :mod:`anode_plan.plans.serialise`'s; what a read plan must satisfy to run,
:mod:`anode_plan.plans.checks`.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import yaml

from anode_plan.budget import usable_bytes
from anode_plan.errors import PlanFileError
from anode_plan.plans.adaptive_share import adaptive_checkpoints
from anode_plan.plans.checks import REPLAN_ADVICE, check_plan_fits
from anode_plan.plans.plan import CompiledUnit, Plan
from anode_plan.plans.serialise import FORMAT, STAGE_FIELDS, VERSION, SavedPlan, deep_recursion, dump_plan
from planners import (
    Block,
    Chain,
    Reconstruct,
    Reconstruction,
    Region,
    Run,
    Schedule,
    Stage,
)
from planners.chain import WORKSPACE_FIELDS, Sketch
from planners.schedule import Op


def save_plan(plan: Any, path: str | os.PathLike) -> None:
    """Write ``plan`` (e.g. ``compiled.plan``) to ``path`` as YAML; reuse it with ``compile(model, plan=path)``."""
    with open(path, "w", encoding="utf-8") as stream:
        stream.write(dump_plan(plan))


# ---------------------------------------------------------------------------------------- reading


def read_plan_file(path: str | os.PathLike) -> SavedPlan:
    """Read and type-check a plan file; raises :class:`PlanFileError` saying which field is wrong.

    The schedule is not validated here; :func:`check_plan_fits` does that.
    """
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as stream, deep_recursion():
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
                            f"{REPLAN_ADVICE}")
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
        raise PlanFileError(f"{source}: workspace_margin is {margin!r}, not a fraction in [0, 1); {REPLAN_ADVICE}")
    backend = reader.string(top, "backend") if "backend" in top else "eager"
    if backend not in ("eager", "inductor"):
        raise PlanFileError(f"{source}: backend is {backend!r}, not 'eager' or 'inductor'; {REPLAN_ADVICE}")
    unit = None
    if "unit" in top:
        found = reader.mapping(top["unit"], "unit")
        fraction = reader.number(found, "fraction", "unit")
        if backend != "inductor" or not 0.0 < fraction <= 1.0:
            raise PlanFileError(f"{source}: unit.fraction is {fraction!r} with backend {backend!r}; a compiled unit "
                                f"needs backend 'inductor' and a fraction in (0, 1]; {REPLAN_ADVICE}")
        unit = CompiledUnit(fraction=fraction, peak_bytes=reader.integer(found, "peak_bytes", "unit", minimum=1),
                            step_ms=reader.number(found, "step_ms", "unit"))
    segments: tuple[tuple[int, int], ...] = ()
    if "segments" in top:
        runs = reader.sequence(top["segments"], "segments")
        segments = tuple(tuple(reader.integers(run, f"segments[{i}]", minimum=0)) for i, run in enumerate(runs))
        at = 0
        for run in segments:
            if backend != "inductor" or len(run) != 2 or run[0] != at or run[1] <= run[0]:
                raise PlanFileError(f"{source}: segments {[list(r) for r in segments]} with backend {backend!r}; "
                                    "compiled units need backend 'inductor' and [start, stop] runs covering the "
                                    f"stages in order; {REPLAN_ADVICE}")
            at = run[1]
    fraction = reader.number(top, "segment_fraction", "the file") if "segment_fraction" in top else 1.0
    if not 0.0 < fraction <= 1.0:
        raise PlanFileError(f"{source}: segment_fraction is {fraction!r}, not a fraction in (0, 1]; {REPLAN_ADVICE}")
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
                     backend=backend, unit=unit, segments=segments, segment_fraction=fraction)


class _Reader:
    """Typed access to the parsed YAML; every failure is a :class:`PlanFileError` naming the field."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, expected: str, value: Any) -> PlanFileError:
        return PlanFileError(f"{self.source}: {where} must be {expected}, got {value!r} "
                             f"({type(value).__name__}). The file was edited or corrupted; {REPLAN_ADVICE}.")

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
                                f"or corrupted; {REPLAN_ADVICE}.")
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
                                                                 "chain.unsketchable_layers")),
                         **self.timing(data))
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
                             f"corrupted; {REPLAN_ADVICE}.")

    def timing(self, data: dict) -> dict[str, Any]:
        """The chain's timing fields; a file written before costs were measured has none (nominal costs)."""
        found: dict[str, Any] = {}
        if "cost_source" in data:
            found["cost_source"] = self.string(data, "cost_source", "chain")
            if found["cost_source"] not in ("measured", "nominal"):
                raise self.fail("chain.cost_source", "'measured' or 'nominal'", found["cost_source"])
        for key in ("region_cost", "step_overhead", "timing_noise", "time_scale"):
            if key in data:
                found[key] = self.number(data, key, "chain")
        if "adaptive_steps" in data:
            pairs = self.sequence(data["adaptive_steps"], "chain.adaptive_steps")
            found["adaptive_steps"] = tuple(tuple(self.integers(pair, f"chain.adaptive_steps[{i}]", minimum=0))
                                            for i, pair in enumerate(pairs))
            if any(len(pair) != 2 for pair in found["adaptive_steps"]):
                raise self.fail("chain.adaptive_steps", "a list of [stage, steps] pairs", pairs)
        return found

    def stage(self, data: dict, where: str) -> Stage:
        unknown = sorted(set(data) - set(STAGE_FIELDS))
        if unknown:
            raise PlanFileError(f"{self.source}: {where} has unknown fields {unknown}; a stage has "
                                f"{list(STAGE_FIELDS)}. The file was edited or corrupted; {REPLAN_ADVICE}.")
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
                self.integer(offer, "solution_bytes", f"{where}.reconstruct", minimum=0),
                self.number(offer, "nominal_inverse_cost", f"{where}.reconstruct")
                if "nominal_inverse_cost" in offer else -1.0)
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
        for key in ("nominal_fwd_cost", "nominal_bwd_cost"):  # files written before measured costs have none
            if key in data:
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


def load_plan(path: str | os.PathLike) -> Plan:
    """Read a plan saved by :func:`anode_plan.save_plan`; equal to the plan that was saved.

    The schedule is validated and simulated on the chain recorded in the file, and must
    fit the file's budget. To run it, give it (or the path) to ``compile(model, plan=...)``,
    which checks it against the model as well.

    Raises:
        PlanFileError: the file cannot be read or a field has the wrong type.
        PlanInvariantError: the schedule would not compute the gradients.
        PlanOverBudgetError: the schedule needs more than the file's budget.
    """
    saved = read_plan_file(path)
    simulation = check_plan_fits(saved.schedule, saved.chain, saved.budget_bytes, saved.source, saved.workspace_margin,
                                 saved.unit.peak_bytes if saved.unit is not None else None)
    return Plan(schedule=saved.schedule, chain=saved.chain, budget_bytes=saved.budget_bytes, simulation=simulation,
                input_shapes=saved.input_shapes, input_dtypes=saved.input_dtypes, fingerprint=saved.fingerprint,
                workspace_margin=saved.workspace_margin, backend=saved.backend, unit=saved.unit,
                segments=saved.segments, segment_fraction=saved.segment_fraction,
                adaptive_checkpoints=adaptive_checkpoints(saved.chain, simulation,
                                                          usable_bytes(saved.budget_bytes, saved.workspace_margin)))
