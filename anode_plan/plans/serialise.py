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
import sys
from dataclasses import dataclass, fields
from typing import Any

import yaml
from torch.fx.node import _get_qualified_name

from anode_plan.tracing.trace import TracedModel
from planners import (
    Chain,
    Reconstruct,
    Reconstruction,
    Run,
    Schedule,
    Stage,
    format_bytes,
)
from planners.chain import Sketch
from planners.schedule import Op

FORMAT = "anode-plan plan"
VERSION = 1
STAGE_FIELDS = tuple(f.name for f in fields(Stage))
_RECURSION_LIMIT = 20_000  # PyYAML recurses per level; a block with one snapshot nests nt regions deep


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
    unit: Any = None
    segments: tuple[tuple[int, int], ...] = ()
    segment_fraction: float = 1.0


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
        f"predicted peak {format_bytes(plan.predicted_peak_bytes)}, recompute overhead {sim.recompute_overhead:+.1%} "
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
        **({"unit": {"fraction": plan.unit.fraction, "peak_bytes": plan.unit.peak_bytes, "step_ms": plan.unit.step_ms}}
           if plan.unit is not None else {}),
        **({"segments": [list(run) for run in plan.segments], "segment_fraction": plan.segment_fraction}
           if plan.segments else {}),
        "planner": plan.schedule.planner,
        "description": plan.schedule.description,
        "proven_optimal": plan.schedule.proven_optimal,
        "schedule": [_op_to_data(op) for op in plan.schedule.ops],
        "sketched": list(plan.schedule.sketched),
        "chain": _chain_to_data(chain),
    }
    with deep_recursion():
        body = yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=120)
    return "".join(f"# {line}\n" for line in header) + body


def _op_to_data(op: Op) -> Any:
    if isinstance(op, Run):
        return op.stage
    if isinstance(op, Reconstruct):
        return {"reconstruct": [op.start, op.stop]}
    return {"region": [op.start, op.stop], "body": [_op_to_data(inner) for inner in op.body]}


def _stage_to_data(stage: Stage) -> dict:
    entry = {}
    for name in STAGE_FIELDS:
        value = getattr(stage, name)
        if isinstance(value, Reconstruction):
            value = {"step_bytes": value.step_bytes, "inverse_cost": value.inverse_cost,
                     "error_per_step": value.error_per_step, "solution_bytes": value.solution_bytes,
                     "nominal_inverse_cost": value.nominal_inverse_cost}
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
        "cost_source": chain.cost_source,
        "region_cost": chain.region_cost,
        "step_overhead": chain.step_overhead,
        "timing_noise": chain.timing_noise,
        "time_scale": chain.time_scale,
        "adaptive_steps": [list(pair) for pair in chain.adaptive_steps],
    }


@contextlib.contextmanager
def deep_recursion():
    """Let PyYAML walk schedules nested hundreds of regions deep (revolve with one snapshot nests ``nt``)."""
    previous = sys.getrecursionlimit()
    sys.setrecursionlimit(max(previous, _RECURSION_LIMIT))
    try:
        yield
    finally:
        sys.setrecursionlimit(previous)
