"""Planning deep ODE networks fast: binomial checkpointing over blocks, with a schedule inside each.

The chain DP (:mod:`planners.rotor`) is exact but costs O(U³) in its units, and an ODE
network has at least one unit per block: 52 units plan in about 5 s, 200 would take
minutes. Deep networks repeat themselves, and this planner uses that. It cuts the
chain into *units*: each ODE block with the layers that follow it (and the layers before
the first block). It schedules the units as revolve schedules the steps of one block
(Griewank and Walther, "Algorithm 799: revolve", ACM TOMS 26(1), 2000): with ``s``
slots, unit inputs are kept as binomial checkpointing keeps states, and a unit whose
turn comes runs its own *inner* schedule, one of

* ``"tapes"``: every step keeps its tape (store-all inside the unit);
* ``"anode"``: a region around the block (ANODE: its input kept, recomputed once);
* ``("revolve", k)``: binomial checkpointing with ``k`` slots inside the block.

For each inner schedule the largest ``s`` that fits is found by bisection (the peak
grows with ``s``, the cost falls; every candidate is checked by the simulator, so a
non-monotone step only costs optimality, never the budget), and the cheapest fitting
schedule of all wins. That is O(I · log U) simulations of O(n) each for I inner
schedules: seconds for 1,000 blocks.

When to use it: through :class:`~planners.Auto`, which runs it where the chain DP
would take too long (more than :data:`DP_UNIT_LIMIT` units). It is not proven optimal;
``tests/test_nested.py`` and ``benchmarks/planner_sweep.py`` measure its gap to the
DP wherever both run.

Background, papers and test values: ``docs/algorithms.md`` §2 and §3.
"""

from __future__ import annotations

from dataclasses import dataclass

from planners.chain import Chain
from planners.errors import InfeasibleBudgetError, format_bytes
from planners.feasibility import infeasible_error
from planners.revolve import fewest_snapshots, optimal_split, revolve_ops, useful_snapshots
from planners.schedule import Op, Region, Run, Schedule, count_regions, counted, nesting_depth
from planners.simulate import Simulation, simulate_plan

DP_UNIT_LIMIT = 40
"""Above this many units, :class:`~planners.Auto` plans with :class:`Nested` instead of the chain DP."""

INNER_REVOLVE_SLOTS = (1, 2, 3, 4, 6, 8, 12, 16)
"""The slot counts of binomial checkpointing inside a block that :class:`Nested` tries (those below ``nt``)."""


def unit_bounds(chain: Chain) -> list[int]:
    """The positions where units start (and the chain's end): 0, then each ODE block's start."""
    bounds = sorted({0, len(chain.stages), *(block.start for block in chain.blocks)})
    return bounds


def _inner_ops(chain: Chain, start: int, stop: int, inner: object) -> tuple[Op, ...]:
    """The ops of one unit ``[start, stop)`` under ``inner``; stages outside its block keep their tapes."""
    block = next((b for b in chain.blocks if b.start == start), None)
    if block is None or inner == "tapes":
        return tuple(Run(i) for i in range(start, stop))
    rest = tuple(Run(i) for i in range(block.stop, stop))
    if inner == "anode":
        return (Region(block.start, block.stop, tuple(Run(i) for i in range(block.start, block.stop))),) + rest
    slots = max(fewest_snapshots(block.nt), min(inner[1], useful_snapshots(block.nt)))
    return revolve_ops(block.start, block.stop, slots) + rest


def nested_ops(chain: Chain, slots: int | None, inner: object, taped_tail: int = 0) -> tuple[Op, ...]:
    """Revolve over the units with ``slots`` slots; each unit's turn runs its ``inner`` schedule.

    ``slots=None`` keeps every unit at the top level, with no region around units (its
    inner schedule alone: store-all for ``"tapes"``, ANODE for ``"anode"``). The last
    ``taped_tail`` units keep all their tapes instead: backward reaches them first, so
    their tapes are freed before the others are recomputed.
    """
    bounds = unit_bounds(chain)
    split = len(bounds) - 1 - taped_tail

    def over(first: int, last: int, slots: int) -> tuple[Op, ...]:  # units first..last-1
        ops: list[Op] = []
        while last - first > 1:
            cut = optimal_split(last - first, slots)
            ops.append(Region(bounds[first], bounds[first + cut], over(first, first + cut, slots)))
            first += cut
            slots -= 1
        ops.extend(_inner_ops(chain, bounds[first], bounds[first + 1], inner))
        return tuple(ops)

    tail = tuple(Run(i) for i in range(bounds[split], bounds[-1]))
    if slots is None:
        return tuple(op for a, b in zip(bounds[:split], bounds[1:split + 1])
                     for op in _inner_ops(chain, a, b, inner)) + tail
    return (over(0, split, slots) if split > 0 else ()) + tail


def inner_schedules(chain: Chain) -> list[object]:
    """The inner schedules worth trying: tapes, ANODE, and the revolve slot counts below the longest block."""
    longest = max((block.nt for block in chain.blocks), default=1)
    return ["tapes", "anode"] + [("revolve", k) for k in INNER_REVOLVE_SLOTS if k < longest - 1]


@dataclass(frozen=True)
class Nested:
    """Binomial checkpointing over ODE blocks, each block's turn with its own inner schedule (see the module).

    Use it for deep networks (hundreds of blocks), where the chain DP is too slow; it is
    what :class:`~planners.Auto` picks there. ``inner`` fixes the inner schedule
    (``"tapes"``, ``"anode"``, ``("revolve", k)``); ``None`` tries them all.
    """

    inner: object | None = None

    def plan(self, chain: Chain, *, budget_bytes: int) -> Schedule:
        store_all = tuple(Run(stage) for stage in range(len(chain.stages)))
        simulation = simulate_plan(chain, store_all)
        if simulation.peak_bytes <= budget_bytes:  # no recompute at all: nothing is cheaper
            return Schedule(store_all, planner="nested", proven_optimal=True,
                            description=f"store every tape (peak {format_bytes(simulation.peak_bytes)})")
        units = len(unit_bounds(chain)) - 1
        least = fewest_snapshots(units)
        best: tuple[float, int, tuple[Op, ...], str] | None = None
        smallest: Simulation | None = None
        for inner in ([self.inner] if self.inner is not None else inner_schedules(chain)):
            found = _most_slots_fitting(chain, inner, least, units, budget_bytes)
            if isinstance(found, Simulation):
                if smallest is None or found.peak_bytes < smallest.peak_bytes:
                    smallest = found
                continue
            what, ops, simulation = found
            key = (simulation.step_cost, simulation.peak_bytes)
            if best is None or key < best[:2]:
                best = (*key, ops, what)
        if best is None:
            raise infeasible_error(chain, "nested", budget_bytes, smallest)
        _, peak, ops, what = best
        return Schedule(ops, planner="nested", proven_optimal=False,
                        description=f"nested over {units} units ({what}): {counted(count_regions(ops), 'region')}, nesting "
                                    f"depth {nesting_depth(ops)}, peak {format_bytes(peak)}")


def _most_slots_fitting(chain: Chain, inner: object, least: int, most: int, budget_bytes: int
                        ) -> tuple[str, tuple[Op, ...], Simulation] | Simulation:
    """The cheapest fitting schedule found for ``inner``, or the smallest schedule's simulation (for the error).

    First with no region around units: the most units of the tail that fit with their
    tapes kept, by bisection (the peak grows with the tail, the cost falls). If not even
    the inner schedule alone fits, the largest slot count of revolve over the units.
    """
    flat = simulate_plan(chain, nested_ops(chain, None, inner))
    if flat.peak_bytes <= budget_bytes:
        return _bisect(chain, budget_bytes, 0, most, lambda tail: nested_ops(chain, None, inner, taped_tail=tail),
                       lambda tail: f"inner {_describe(inner)} on {most - tail} units, the last {tail} keep their tapes")
    smallest = simulate_plan(chain, nested_ops(chain, least, inner))
    if smallest.peak_bytes > budget_bytes:
        return smallest
    return _bisect(chain, budget_bytes, least, most, lambda slots: nested_ops(chain, slots, inner),
                   lambda slots: f"revolve over the units with {slots} slots, inner {_describe(inner)}")


def _bisect(chain: Chain, budget_bytes: int, low: int, high: int, ops_for, describe
            ) -> tuple[str, tuple[Op, ...], Simulation]:
    """The cheapest fitting schedule met while bisecting for the largest ``k`` in ``[low, high]`` whose
    ``ops_for(k)`` fits (``ops_for(low)`` must fit): the peak grows with ``k`` and the cost falls."""
    ops = ops_for(low)
    found = (describe(low), ops, simulate_plan(chain, ops))
    while low < high:
        middle = (low + high + 1) // 2
        ops = ops_for(middle)
        simulation = simulate_plan(chain, ops)
        if simulation.peak_bytes <= budget_bytes:
            low = middle
            if simulation.step_cost <= found[2].step_cost:
                found = (describe(middle), ops, simulation)
        else:
            high = middle - 1
    return found


def _describe(inner: object) -> str:
    return inner if isinstance(inner, str) else f"revolve with {inner[1]} slots per block"


__all__ = ["DP_UNIT_LIMIT", "Nested", "nested_ops", "unit_bounds", "InfeasibleBudgetError"]
