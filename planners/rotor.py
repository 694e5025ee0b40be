"""The cheapest checkpoint schedule of a heterogeneous chain within a memory budget.

:class:`ChainDP` is the dynamic program of Beaumont, Eyraud-Dubois, Herrmann, Joly and
Shilova, "Optimal checkpointing for heterogeneous chains: how to train deep neural
networks with limited memory" (arXiv 1911.13214, 2019; "rotor"), of which Griewank and
Walther's binomial checkpointing ("Algorithm 799: revolve", ACM TOMS 26(1), 2000) is the
uniform special case. See docs/algorithms.md §2 and §3.

The recurrence, over the lists of operations of :mod:`planners.schedule` (a list over
stages ``[a, b)`` heads with one operation, then continues as a list over the rest)::

    best(a, b, hold) = min of
      option 2  Run(a), then best(a+1, b, hold = what tape a saved of x_{a+1}) on top
                of tape a and what it saved of x_a (all of x_a if hold says so)
      option 1  Region(a, j), then best(j, b, hold = nothing) on top of x_a, then, in
                backward, the body best(a, j, hold = all) as a recomputed list

with every memory event charged exactly as :func:`planners.simulate_plan` charges it
(:mod:`planners.rotor_events` derives each term). Two details of the simulator need
state beyond rotor's ``C(m, a, b)``: ``hold`` (what of ``x_a`` someone else keeps alive,
so it is not freed early), and whether the list is the top level (it ends at the loss, and the
network output stays live through backward) or a recomputed body (it ends where the
body's fresh output is dropped). Parameter gradients need no state: backward always
visits stages ``n-1 .. 0``, so what is live at each position is fixed.

Conventions:

* Base case. The recursion ends at the empty list: a body ends with nothing more to
  pay, the top level with the loss, ``x_n + δ_n + head_bytes``. Rotor's one-stage
  case ``C(m, a, a)`` is option 2 on the last stage, charged with the simulator's own
  forward peak ``max(fwd_taped_bytes, x_{a+1} + tape)`` (``rerun_taped_bytes`` in a
  body, a re-run) and backward peak ``max(bwd_bytes, δ_a + new parameter gradients -
  tape)`` on top of everything live then.
  With ``uf = ub = x = 1``, a tape of ``B`` and no loss head, ``s`` slots cost exactly
  ``B + 3 + s`` bytes here, and the DP there makes ``t(n, s)`` advances (tested).
* Memory discretisation. Instead of tabulating ``C(m, ·)`` on a grid of memory slots,
  each sub-problem keeps the steps of that function: its Pareto frontier of
  (exact peak, cost) schedules (:mod:`planners.rotor_frontier`). No size is rounded, so
  the predicted peak of the plan is its simulated peak, to the byte (checked on every
  plan). ``memory_slots`` caps each frontier: past that many points, the peak range is
  cut into ``memory_slots`` equal slots and each keeps its cheapest point. That only
  drops options, never makes a plan exceed the budget; the plan is ``proven_optimal``
  when no frontier needed it. Rotor's implementations tabulate 500 slots; exact points
  need fewer, so the default is 128.
* Scope. Regions are nested ``torch.utils.checkpoint`` calls; the DP searches every
  schedule of them except a region whose body is one region over the same stages
  (never cheaper, never smaller), so the flat DP is the exact optimum under the model.

When to use it: whenever the budget lies between the smallest schedule and store-all
and the compute matters; it dominates :class:`~planners.Landmarks`, whose schedules it
searches too. The flat DP costs O(n³·K) for frontiers of K points, so it runs up to
:data:`FLAT_STAGE_LIMIT` stages. Above that (or with ``two_level=True``) it runs the
two-level DP of :mod:`planners.rotor_two_level`, over layers and chunks of ODE blocks
with binomial checkpointing inside: 0.77 s for 4 blocks of 100 steps and 1.81 s for one
block of 10,000 on the CPU (slowest of four budgets, ``benchmarks/planner_sweep.py``). That is not proven optimal; how far it lands from the
flat optimum is measured in tests/test_rotor.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from math import inf

from planners.chain import Chain
from planners.errors import PlanInvariantError, format_bytes
from planners.feasibility import infeasible_error
from planners.progress import Progress
from planners.revolve import revolve_ops
from planners.rotor_events import HOLD_ALL, HOLD_NONE, ChainEvents
from planners.rotor_frontier import Point, combined, lower_envelope, shifted, thinned
from planners.rotor_two_level import BlockOptions, auto_block_chunks, macro_cuts
from planners.schedule import Op, Region, Run, Schedule, count_regions, counted, nesting_depth
from planners.simulate import Simulation, simulate_plan

FLAT_STAGE_LIMIT = 40
_log = logging.getLogger("anode_plan.planners.chain_dp")


@dataclass(frozen=True)
class ChainDP:
    """The cheapest schedule within ``budget_bytes``: rotor's DP, exact under the simulator's model.

    Use it to get the least recompute a budget allows; use :class:`~planners.Revolve` or
    :class:`~planners.Anode` when a fixed, explainable family is wanted instead.

    Attributes:
        memory_slots: the memory resolution: a sub-problem with more (peak, cost) points
            than this keeps one per slot of ``memory_slots`` equal slots of its peak
            range (see the module docstring). Larger is slower and closer to exact.
        two_level: ``False`` runs the flat DP over every stage (exact), ``True`` the
            two-level DP over layers and chunks of ODE blocks (fast), ``None`` picks the
            flat DP up to :data:`FLAT_STAGE_LIMIT` stages.
        block_chunks: for the two-level DP, the units each ODE block is cut into (1: the
            whole block; see :func:`planners.rotor_two_level.macro_cuts`); ``None`` cuts
            the blocks so the DP sees about
            :data:`~planners.rotor_two_level.TARGET_MACRO_STAGES` macro-stages.

    ``plan`` raises :class:`~planners.InfeasibleBudgetError` when no schedule of its
    search space fits; ``min_budget_bytes`` is then the smallest peak in that space.
    """

    memory_slots: int = 128
    two_level: bool | None = None
    block_chunks: int | None = None

    def plan(self, chain: Chain, *, budget_bytes: int) -> Schedule:
        if self.memory_slots < 1:
            raise ValueError(f"ChainDP(memory_slots={self.memory_slots}): needs at least 1 slot")
        if self.block_chunks is not None and self.block_chunks < 1:
            raise ValueError(f"ChainDP(block_chunks={self.block_chunks}): needs at least 1 unit per block")
        two_level, cuts = dp_cuts(chain, self.two_level, self.block_chunks)
        store_all = tuple(Run(stage) for stage in range(len(chain.stages)))
        simulation = simulate_plan(chain, store_all)
        if simulation.peak_bytes <= budget_bytes:  # no recompute at all: nothing is cheaper
            return Schedule(store_all, planner="chain-dp", proven_optimal=True,
                            description=f"store every tape (peak {format_bytes(simulation.peak_bytes)})")
        events = ChainEvents(chain)
        table = ScheduleTable(chain, events, cuts, two_level, self.memory_slots, budget_bytes)
        frontier = table.solve()
        if not frontier:
            smallest = ScheduleTable(chain, events, cuts, two_level, self.memory_slots, inf, min_peak_only=True)
            predicted_peak, predicted_cost, _ = smallest.solve()[0]
            simulation = _checked(chain, smallest.ops_of(0), predicted_peak, predicted_cost, inf)
            raise infeasible_error(chain, "chain-dp", budget_bytes, simulation)
        predicted_peak, predicted_cost, _ = frontier[-1]  # the cheapest point within the budget
        ops = table.ops_of(len(frontier) - 1)
        simulation = _checked(chain, ops, predicted_peak, predicted_cost, budget_bytes)
        level = (f"two-level DP over {len(cuts) - 1} macro-stages" if two_level
                 else f"flat DP over {len(chain.stages)} stages")
        # The two-level DP is exact too when every position is a cut (small blocks).
        exact_space = len(cuts) == len(chain.stages) + 1
        return Schedule(ops, planner="chain-dp", proven_optimal=exact_space and not table.thinned,
                        description=f"{level}: {counted(count_regions(ops), 'region')}, nesting depth "
                                    f"{nesting_depth(ops)}, peak {format_bytes(simulation.peak_bytes)}, "
                                    f"{counted(simulation.recomputed_forwards, 'recomputed forward')}")


def dp_cuts(chain: Chain, two_level: bool | None = None, block_chunks: int | None = None) -> tuple[bool, list[int]]:
    """Whether the DP runs two-level, and the positions its regions may start and end at.

    ``two_level=None`` picks the flat DP (every position) up to :data:`FLAT_STAGE_LIMIT`
    stages, else macro-stage boundaries (:func:`planners.rotor_two_level.macro_cuts`).
    """
    two_level = len(chain.stages) > FLAT_STAGE_LIMIT if two_level is None else two_level
    if not two_level:
        return False, list(range(len(chain.stages) + 1))
    return True, macro_cuts(chain, auto_block_chunks(chain) if block_chunks is None else block_chunks)


def _checked(chain: Chain, ops: tuple[Op, ...], predicted_peak: int, predicted_cost: float,
             budget_bytes: float) -> Simulation:
    """Simulate the DP's schedule: its peak and cost must be the predicted ones, the peak within the budget."""
    simulation = simulate_plan(chain, ops)
    cost_agrees = abs(simulation.compute_cost - predicted_cost) <= 1e-9 * max(1.0, abs(predicted_cost))
    if simulation.peak_bytes != predicted_peak or simulation.peak_bytes > budget_bytes or not cost_agrees:
        raise PlanInvariantError(
            f"ChainDP predicted a peak of {predicted_peak} bytes and a cost of {predicted_cost} for its "
            f"schedule of {chain.name}, but simulate_plan measures {simulation.peak_bytes} bytes and "
            f"{simulation.compute_cost} (budget {budget_bytes} bytes). The DP's event rules "
            "(planners/rotor_events.py) disagree with planners/simulate.py. This is a bug in the planner; "
            "please report it with the chain and the budget.")
    return simulation


class ScheduleTable:
    """Frontiers of every list of operations the DP considers, and the schedule rebuilt from them.

    :class:`~planners.CPSat` reads the frontiers of region bodies, ``(u, w, HOLD_ALL, False)``,
    from it.

    A list is keyed ``(u, v, hold, top)``: it covers stages ``cuts[u] .. cuts[v]-1``,
    where ``cuts`` are the positions a region may start or end at (every position for
    the flat DP, macro-stage boundaries for the two-level DP); ``hold`` is one of the
    ``HOLD_*`` codes of :mod:`planners.rotor_events`.
    """

    def __init__(self, chain: Chain, events: ChainEvents, cuts: list[int], two_level: bool, memory_slots: int,
                 budget: float, min_peak_only: bool = False) -> None:
        self.name = chain.name
        self.events = events
        self.cuts = cuts
        self.block_options = BlockOptions(chain, events, memory_slots) if two_level else None
        # The cut index of each block's end, keyed by the cut index of its start.
        index_of = {position: index for index, position in enumerate(cuts)}
        self.block_end_cut = {index_of[block.start]: index_of[block.stop] for block in chain.blocks
                              if block.start in index_of and block.stop in index_of}
        self.memory_slots = memory_slots
        self.budget = budget
        self.min_peak_only = min_peak_only
        self.thinned = False
        self.frontiers: dict[tuple[int, int, int, bool], list[Point]] = {}
        self._units: dict[tuple[int, int, bool], tuple[int, int, int, int, float]] = {}

    def solve(self, *, bodies_only: bool = False) -> list[Point]:
        """Fill the table; returns the frontier of the whole schedule (empty if none fits).

        ``bodies_only`` fills the lists of region bodies only (``top=False``) and returns ``[]``.
        """
        units = len(self.cuts) - 1
        progress = Progress(_log, f"chain-dp on {self.name}")
        for v in range(units + 1):
            for hold in self.events.holds_at(self.cuts[v]):
                self.frontiers[(v, v, hold, False)] = self._end(v, False)
                self.frontiers[(v, v, hold, True)] = self._end(v, True) if v == units else []
        for length in range(1, units + 1):
            progress.step(f"lists of {length} of {units} units")
            for u in range(units - length + 1):
                self._fill(u, u + length, False)
        progress.done(f"{units} units{', thinned frontiers' if self.thinned else ''}")
        if bodies_only:
            return []
        for u in reversed(range(units)):
            self._fill(u, units, True)
        return self.frontiers[(0, units, HOLD_NONE, True)]

    def _end(self, v: int, top: bool) -> list[Point]:
        peak = self.events.end_peak(self.cuts[v], top)
        return [(peak, 0.0, ("end",))] if peak <= self.budget else []

    def _fill(self, u: int, v: int, top: bool) -> None:
        """The frontiers of list ``(u, v, hold, top)`` for every ``hold`` it can have."""
        events, cuts, budget = self.events, self.cuts, self.budget
        start, stop = cuts[u], cuts[v]
        # Option 1: Region(start, cuts[w]), the rest on top of x_start, then the body in
        # backward. It does not depend on hold: the region's record keeps x_start anyway.
        # A body's region cannot span the whole body; the top level's can (it keeps no
        # tape at the loss).
        region_options = [
            combined(self.frontiers[(w, v, HOLD_NONE, top)], events.state_bytes[start],
                     self.frontiers[(u, w, HOLD_ALL, False)], events.backward_extra(top),
                     events.region_forward_peak(start, cuts[w], stop, top), events.forward_cost(start, cuts[w]),
                     w, budget)
            for w in range(u + 1, v + 1 if top else v)]
        if self.block_options is not None:
            # Regions every few steps of unit u, each recomputed with its tapes, then the rest.
            rest = self.frontiers[(u + 1, v, HOLD_NONE, top)]
            region_options.extend(shifted(rest, held, floor, cost, budget, ("segments", count))
                                  for count, floor, held, cost in
                                  self.block_options.segmentations(start, cuts[u + 1], stop, top))
            # Revolve over a whole block, then the rest (Revolve's schedule, the block not last).
            block_end = self.block_end_cut.get(u)
            if block_end is not None and block_end < v:
                region_options.extend(
                    shifted(self.frontiers[(block_end, v, hold_out, top)], held, floor, cost, budget,
                            ("inline revolve", snapshots, block_end))
                    for snapshots, floor, held, hold_out, cost in
                    self.block_options.inline_revolves(start, cuts[block_end], stop, top))
        regions = lower_envelope(region_options)
        for hold in events.holds_at(start):
            # Option 2: keep the tapes of unit u (one stage, or a whole block), then the rest.
            forward, kept, backward, hold_out, cost = self._unit(u, hold, top)
            floor = max(forward + events.forward_extra(stop, top), backward + events.backward_extra(top))
            options = [shifted(self.frontiers[(u + 1, v, hold_out, top)], kept, floor, cost, budget), regions]
            if self.block_options is not None:
                options.append(self.block_options.revolve_points(start, stop, hold, top, budget))
            frontier = lower_envelope(options)
            if self.min_peak_only:
                frontier = frontier[:1]
            elif len(frontier) > self.memory_slots:
                self.thinned = True
                frontier = thinned(frontier, self.memory_slots)
            self.frontiers[(u, v, hold, top)] = frontier

    def _unit(self, u: int, hold: int, top: bool) -> tuple[int, int, int, int, float]:
        """Taped runs of every stage of unit u: (forward peak, bytes kept, backward peak, hold after, cost).

        Peaks are without :meth:`ChainEvents.forward_extra` and ``backward_extra``.
        """
        start, end = self.cuts[u], self.cuts[u + 1]
        key = (u, hold, top)  # top: first runs (and the network output at the end), else re-runs
        found = self._units.get(key)
        if found is None:
            forward = backward = kept = 0
            cost = 0.0
            for stage in range(start, end):
                stage_forward, stage_kept, stage_backward = self.events.run_events_bare(stage, hold, top)
                forward = max(forward, kept + stage_forward)
                backward = max(backward, kept + stage_backward)
                kept += stage_kept
                hold = self.events.hold_after[stage]
                cost += self.events.step_cost[stage]
            found = (forward, kept, backward, hold, cost)
            self._units[key] = found
        return found

    def ops_of(self, index: int, key: tuple[int, int, int, bool] | None = None) -> tuple[Op, ...]:
        """The schedule of point ``index`` of list ``key`` (default: the whole schedule)."""
        cuts = self.cuts
        key = (0, len(cuts) - 1, HOLD_NONE, True) if key is None else key
        ops: list[Op] = []
        while True:
            u, v, hold, top = key
            if u == v:
                return tuple(ops)
            recipe = self.frontiers[key][index][2]
            if recipe[0] == "keep":
                ops.extend(Run(stage) for stage in range(cuts[u], cuts[u + 1]))
                key, index = (u + 1, v, self._unit(u, hold, top)[3], top), recipe[1]
            elif recipe[0] == "region":
                _, w, suffix_index, body_index = recipe
                ops.append(Region(cuts[u], cuts[w], self.ops_of(body_index, (u, w, HOLD_ALL, False))))
                key, index = (w, v, HOLD_NONE, top), suffix_index
            elif recipe[0] == "inline revolve":
                _, snapshots, block_end, suffix_index = recipe
                ops.extend(revolve_ops(cuts[u], cuts[block_end], snapshots))
                stage = cuts[block_end] - 1
                key, index = (block_end, v, self.events.hold_after[stage], top), suffix_index
            elif recipe[0] == "segments":
                _, count, suffix_index = recipe
                start, steps = cuts[u], cuts[u + 1] - cuts[u]
                bounds = [start + (part * steps) // count for part in range(count + 1)]
                ops.extend(Region(a, b, tuple(Run(stage) for stage in range(a, b))) for a, b in zip(bounds, bounds[1:]))
                key, index = (u + 1, v, HOLD_NONE, top), suffix_index
            else:
                ops.extend(revolve_ops(cuts[u], cuts[v], recipe[1]))
                return tuple(ops)
