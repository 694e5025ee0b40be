"""Schedules as plain data, and the structural validator.

A schedule is a sequence of operations over a chain (see :mod:`planners.chain`):

* :class:`Run` — run one stage with a tape, keeping the tape until that stage's
  backward (``F_all`` in the rotor paper).
* :class:`Region` — run stages ``start .. stop-1`` without a tape, keeping only the
  input state ``x_start`` (``F_ck`` followed by ``F_n``); when backward reaches the
  region, run its ``body`` again with tapes and differentiate it.

A ``Region``'s body is itself a schedule of the same stages, so regions nest. This is
exactly the recursion of Griewank's revolve and of the rotor dynamic program
(Beaumont et al., arXiv 1911.13214, option 1 "keep only x_j"), and it is also exactly
how nested non-reentrant ``torch.utils.checkpoint`` regions execute, which is what
``anode_plan`` rewrites a schedule into.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from planners.errors import PlanInvariantError


@dataclass(frozen=True)
class Run:
    """Run stage ``stage`` with a tape and keep the tape until its backward."""

    stage: int


@dataclass(frozen=True)
class Region:
    """Run stages ``[start, stop)`` untaped, keeping only ``x_start``; recompute ``body`` in backward."""

    start: int
    stop: int
    body: tuple["Op", ...]


@dataclass(frozen=True)
class Reconstruct:
    """Run stages ``[start, stop)`` untaped, keeping only ``x_stop``; in backward, rebuild the states backwards.

    For the steps of a reversible ODE block (each stage offers a
    :class:`~planners.chain.Reconstruction`): when backward reaches ``x_stop``, each step's
    input is computed from its output by the inverse step, the step is re-run with its
    tape from it and differentiated, last step first. Memory is a few states whatever
    the number of steps; consecutive ``Reconstruct`` ops are anchors, bounding how many
    steps are inverted in a row (round-off grows with that number).
    """

    start: int
    stop: int


Op = Union[Run, Region, Reconstruct]


@dataclass(frozen=True)
class Schedule:
    """A complete schedule for a chain, with who made it.

    Attributes:
        ops: the top-level operations; they cover every stage once, in order.
        planner: the name of the planner that produced it.
        proven_optimal: the planner proved this the cheapest schedule under its model.
        description: a short summary for reports, e.g. ``"revolve, snapshots per block [3, 3]"``.
        sketched: the stages that run with their convolutions sketched (each offers a
            :class:`~planners.chain.Sketch`): the schedule is inexact when this is not empty.
    """

    ops: tuple[Op, ...]
    planner: str
    proven_optimal: bool = False
    description: str = ""
    sketched: tuple[int, ...] = ()


def validate_schedule(schedule: Schedule | tuple[Op, ...], num_stages: int) -> None:
    """Check that a schedule covers stages ``0 .. num_stages-1`` once each, in order.

    Every region's body must cover exactly the region's stages. Raises
    :class:`PlanInvariantError` naming the first operation that breaks a rule.
    """
    ops = schedule.ops if isinstance(schedule, Schedule) else schedule
    _validate_ops(ops, 0, num_stages, "schedule")


def _validate_ops(ops: tuple[Op, ...], start: int, stop: int, where: str) -> None:
    cursor = start
    for position, op in enumerate(ops):
        if isinstance(op, Run):
            if op.stage != cursor:
                raise PlanInvariantError(
                    f"{where}, operation {position}: Run(stage={op.stage}) but the next stage to run is "
                    f"{cursor}; every stage must run once, in order")
            cursor += 1
        elif isinstance(op, Region):
            if op.start != cursor or not op.start < op.stop <= stop:
                raise PlanInvariantError(
                    f"{where}, operation {position}: Region[{op.start}, {op.stop}) does not start at stage "
                    f"{cursor} or does not end inside [{cursor}, {stop}]")
            if not op.body:
                raise PlanInvariantError(f"{where}, operation {position}: Region[{op.start}, {op.stop}) has an "
                                         "empty body")
            _validate_ops(op.body, op.start, op.stop, f"{where} > Region[{op.start}, {op.stop})")
            cursor = op.stop
        elif isinstance(op, Reconstruct):
            if op.start != cursor or not op.start < op.stop <= stop:
                raise PlanInvariantError(
                    f"{where}, operation {position}: Reconstruct[{op.start}, {op.stop}) does not start at stage "
                    f"{cursor} or does not end inside [{cursor}, {stop}]")
            cursor = op.stop
        else:
            raise PlanInvariantError(f"{where}, operation {position}: {op!r} is not a Run, Region or Reconstruct")
    if cursor != stop:
        raise PlanInvariantError(f"{where}: covers stages [{start}, {cursor}) but must cover [{start}, {stop})")


def counted(count: int, noun: str) -> str:
    """``count`` and ``noun``, plural unless one: ``counted(1, "region")`` is ``"1 region"``."""
    return f"{count} {noun}" + ("" if count == 1 else "s")


def count_regions(ops: tuple[Op, ...]) -> int:
    """How many regions, nested ones included, a schedule has."""
    return sum(1 + count_regions(op.body) for op in ops if isinstance(op, Region))


def nesting_depth(ops: tuple[Op, ...]) -> int:
    """The deepest nesting of regions (0 for a schedule without regions)."""
    return max((1 + nesting_depth(op.body) for op in ops if isinstance(op, Region)), default=0)
