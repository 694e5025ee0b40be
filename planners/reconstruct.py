"""Reconstruct as a planning option: rebuild a reversible block's states backwards, where it pays.

A step of a reversible ODE block (``Stage.reconstruct`` set) can be undone: backward may
walk the block from its output, computing each step's input from its output, re-running
that one step with a tape and differentiating it. Memory is a few states whatever the
number of steps, at one inverse and one re-run per step. This module weighs that option
against keeping tapes and recomputing from checkpoints, under the same simulator.

How: a reconstructed block behaves, to the rest of the schedule, like one stage per
segment between anchors. That stage keeps its output (``saves_output``) and no tape, its
forward peaks as the steps' untaped forwards do, and its backward peaks as the walk
back through its steps does (:func:`collapsed_chain` charges the simulator's own
sequence of events, and the forward as if the segment's input stayed live). So the existing planners plan the
collapsed chain as it is, and each of its segment stages becomes a
:class:`~planners.schedule.Reconstruct` in the schedule on the real chain, which the
simulator then checks and prices exactly.

Which blocks: greedily, in order, a reversible block is reconstructed when that makes
the cheapest schedule within the budget cheaper, or makes one fit at all
(:func:`plan_with_reconstruct`). The anchors: segments of at most ``max_inverted``
steps, where ``max_inverted`` keeps the measured round-off of rebuilt states
(``Reconstruction.error_per_step`` times the steps inverted in a row) within
``max_error``. Stages that draw random numbers are never reconstructed (an inverse step
would need the forward's random numbers).

Background, papers and test values: ``docs/algorithms.md`` §8.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

from planners.chain import Block, Chain, Stage
from planners.errors import InfeasibleBudgetError, NothingToReconstructError, format_bytes
from planners.feasibility import require_fit
from planners.schedule import Op, Reconstruct, Region, Run, Schedule
from planners.simulate import simulate_plan

MAX_ERROR = 1e-4
"""The default bound on the relative round-off of a rebuilt state (float32 rounding, times the steps inverted)."""


def reconstructible_blocks(chain: Chain) -> list[int]:
    """The blocks whose every step offers a reconstruction and draws no random numbers."""
    return [index for index, block in enumerate(chain.blocks)
            if all(stage.reconstruct is not None and not stage.uses_rng
                   for stage in chain.stages[block.start:block.stop])]


def anchor_spacing(chain: Chain, block: Block, max_error: float) -> int:
    """The most steps of ``block`` inverted in a row whose measured round-off stays within ``max_error``."""
    per_step = max(stage.reconstruct.error_per_step for stage in chain.stages[block.start:block.stop])
    if per_step <= 0:
        return block.nt
    return max(1, min(block.nt, math.floor(max_error / per_step)))


def segments(block: Block, spacing: int) -> list[tuple[int, int]]:
    """``block``'s steps cut into ``ceil(nt / spacing)`` segments as equal as possible."""
    count = -(-block.nt // spacing)
    bounds = [block.start + (part * block.nt) // count for part in range(count + 1)]
    return list(zip(bounds, bounds[1:]))


def _bytes(chain: Chain, values: tuple[int, ...], *, gradient: bool = False) -> int:
    return sum(chain.value_bytes[v] for v in values if not (gradient and v in chain.gradless_values))


def _backward_walk(chain: Chain, start: int, stop: int, touched: set[int]) -> int:
    """The peak of ``Reconstruct(start, stop)``'s backward above what is live when it starts.

    The simulator's own sequence (:meth:`planners.simulate._Simulator.reconstruct`), on
    byte counts: per stage from the last, the walk step's peak, the rebuilt input, the
    gradients made and freed. ``touched``: the parameters whose gradients exist already;
    updated with this segment's.
    """
    extra = peak = 0
    at_end = chain.blocks[chain.stages[start].block].stop == stop
    for i in reversed(range(start, stop)):
        stage = chain.stages[i]
        consumed, created, _ = chain.value_flow(i)
        peak = max(peak, extra + stage.reconstruct.step_bytes)
        extra += _bytes(chain, consumed)  # the rebuilt x_i
        if i + 1 != stop:  # x_{i+1} is freed (x_stop stays: the op saved it)
            extra -= _bytes(chain, created)
        extra += _bytes(chain, consumed, gradient=True)  # the gradient of x_i
        extra += sum(chain.param_grad_bytes[p] for p in stage.param_ids if p not in touched)
        touched.update(stage.param_ids)
        peak = max(peak, extra)
        if i + 1 != stop or at_end:  # the gradient of x_{i+1}; that of x_stop lives until the op returns
            extra -= _bytes(chain, created, gradient=True)
        if i + 1 == stop and at_end:  # at the block's end, only the solution's gradient was handed
            extra += stage.reconstruct.solution_bytes
    return peak


def _segment_stage(chain: Chain, start: int, stop: int, touched: set[int]) -> Stage:
    """One stage standing for ``Reconstruct(start, stop)``: its memory as the simulator charges it, its cost.

    The forward's peak is charged as if the segment's input stayed live under every
    step (it does when a region or a skip holds it; else this is one state too high).
    """
    stages = chain.stages[start:stop]
    held_input = _bytes(chain, chain.value_flow(start)[0])
    untaped = max(stage.fwd_untaped_bytes + (held_input if i > start else 0)
                  for i, stage in zip(range(start, stop), stages))
    backward = _backward_walk(chain, start, stop, touched)
    return Stage(
        name=f"{stages[0].name}..{stages[-1].name} (reconstruct)", input_bytes=stages[0].input_bytes,
        output_bytes=stages[-1].output_bytes, tape_bytes=0, saves_input=False, saves_output=True,
        fwd_taped_bytes=untaped, fwd_untaped_bytes=untaped, rerun_taped_bytes=untaped,
        bwd_bytes=backward, fwd_cost=sum(stage.fwd_cost for stage in stages),
        bwd_cost=sum(stage.reconstruct.inverse_cost + stage.fwd_cost + stage.bwd_cost for stage in stages),
        param_ids=tuple(sorted({p for stage in stages for p in stage.param_ids})))


def collapsed_chain(chain: Chain, cuts: dict[int, list[tuple[int, int]]]) -> tuple[Chain, list[tuple[int, int, bool]]]:
    """``chain`` with the blocks in ``cuts`` (block index -> segments) collapsed to one stage per segment.

    Returns the chain and, per stage of it, ``(start, stop, reconstructed)`` in ``chain``.
    """
    start_of = {stop: start for parts in cuts.values() for start, stop in parts}
    walked: list[tuple[tuple[int, int, bool], Stage]] = []
    touched: set[int] = set()
    # Backward meets the stages last to first: a parameter's gradient is made by the last
    # stage that uses it, so walk backwards to charge it to the right segment.
    index = len(chain.stages)
    while index > 0:
        if index in start_of:
            start = start_of[index]
            walked.append(((start, index, True), _segment_stage(chain, start, index, touched)))
            index = start
        else:
            index -= 1
            touched.update(chain.stages[index].param_ids)
            walked.append(((index, index + 1, False), chain.stages[index]))
    walked.reverse()
    spans = [span for span, _ in walked]
    stages = tuple(stage for _, stage in walked)
    position = {span[0]: at for at, span in enumerate(spans)}
    blocks = tuple(dataclasses.replace(block, start=position[block.start], stop=position[block.start] + block.nt)
                   for b, block in enumerate(chain.blocks) if b not in cuts)
    state_values = tuple(chain.state_values[span[0]] for span in spans) + (chain.state_values[-1],)
    return dataclasses.replace(chain, stages=stages, blocks=blocks, state_values=state_values), spans


def expand(ops: tuple[Op, ...], spans: list[tuple[int, int, bool]]) -> tuple[Op, ...]:
    """A schedule of the collapsed chain as a schedule of the real one: segment stages become ``Reconstruct``."""
    out: list[Op] = []
    for op in ops:
        if isinstance(op, Run):
            start, stop, rebuilt = spans[op.stage]
            out.append(Reconstruct(start, stop) if rebuilt else Run(start))
        elif isinstance(op, Region):
            out.append(Region(spans[op.start][0], spans[op.stop - 1][1], expand(op.body, spans)))
        else:  # pragma: no cover - planners of the collapsed chain make Run and Region only
            raise TypeError(f"unexpected operation {op!r}")
    return tuple(out)


def plan_with_reconstruct(chain: Chain, budget_bytes: int, plan: Callable[[Chain, int], Schedule], *,
                          max_error: float = MAX_ERROR) -> Schedule:
    """The cheapest schedule ``plan`` finds within the budget, each reversible block reconstructed where it pays.

    ``plan(chain, budget_bytes)`` is a planner without this option (it may raise
    :class:`InfeasibleBudgetError`). Blocks are tried in order; a block stays
    reconstructed when the schedule found with it is cheaper, or fits where none did.
    """
    candidates = reconstructible_blocks(chain)
    best, best_key, smallest = None, None, None

    def attempt(cuts: dict[int, list[tuple[int, int]]]) -> bool:
        nonlocal best, best_key, smallest
        collapsed, spans = collapsed_chain(chain, cuts) if cuts else (chain, None)
        try:
            schedule = plan(collapsed, budget_bytes)
        except InfeasibleBudgetError as error:
            if smallest is None or error.min_budget_bytes < smallest.min_budget_bytes:
                smallest = error
            return False
        if spans is not None:
            ops = expand(schedule.ops, spans)
            rebuilt = sum(1 for op in _flatten(ops) if isinstance(op, Reconstruct))
            schedule = Schedule(ops, planner=schedule.planner, proven_optimal=False,
                                description=f"{schedule.description}; {rebuilt} reconstructed segments")
        simulation = simulate_plan(chain, schedule)
        if simulation.peak_bytes > budget_bytes:  # the collapsed chain charges at least as much: not expected
            return False
        key = (simulation.step_cost, simulation.peak_bytes)
        if best_key is None or key < best_key:
            best, best_key = schedule, key
            return True
        return False

    attempt({})
    chosen: dict[int, list[tuple[int, int]]] = {}
    for block in candidates:
        trial = {**chosen, block: segments(chain.blocks[block], anchor_spacing(chain, chain.blocks[block], max_error))}
        if attempt(trial):
            chosen = trial
    if best is None:
        raise smallest
    return best


def _flatten(ops: tuple[Op, ...]):
    for op in ops:
        yield op
        if isinstance(op, Region):
            yield from _flatten(op.body)


@dataclass(frozen=True)
class Reconstructed:
    """The reconstruct landmark: every reversible block rebuilt backwards, every other stage taped.

    Use it to see what reconstruction alone costs and needs; :class:`~planners.Auto` mixes
    it with the other options where it pays. Anchors as in :func:`anchor_spacing`.
    """

    max_error: float = MAX_ERROR

    def plan(self, chain: Chain, *, budget_bytes: int) -> Schedule:
        blocks = reconstructible_blocks(chain)
        if not blocks:
            raise NothingToReconstructError(
                f"Reconstructed: {chain.name} has no reversible ODE block to reconstruct (build its "
                "blocks with method='reversible_heun' or 'alf', and no random operations in them), or use "
                "planner='auto', which reconstructs only where a block allows it")
        cuts = {b: segments(chain.blocks[b], anchor_spacing(chain, chain.blocks[b], self.max_error)) for b in blocks}
        collapsed, spans = collapsed_chain(chain, cuts)
        ops = expand(tuple(Run(i) for i in range(len(collapsed.stages))), spans)
        simulation = require_fit(chain, ops, budget_bytes, "reconstruct")
        return Schedule(ops, planner="reconstruct",
                        description=f"reconstruct {len(blocks)} reversible blocks in "
                                    f"{sum(len(parts) for parts in cuts.values())} segments, tapes elsewhere "
                                    f"(peak {format_bytes(simulation.peak_bytes)})")
