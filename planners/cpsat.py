"""A CP-SAT planner that counts every value once: for networks that are not chains.

Use it for U-Nets, DenseNets, torchvision ResNets: graphs where a tensor made early is
used much later. Traced and linearised, such a graph is a chain whose states carry the
skip tensors along (:attr:`planners.Chain.state_values`); a checkpoint placed anywhere
the skip is live holds it again, so the memory of two checkpoints is *not* the sum of
their sizes. The dynamic program assumes it is; this planner counts every value once.
On chains it searches the same schedules as :class:`~planners.ChainDP` and reaches the
same optimum (tested against the flat DP).

The model is a retention model in the manner of Moccasin (Bartan et al., ICML 2023,
arXiv 2304.14463), solved with OR-Tools CP-SAT. The top-level schedule is a path over
the positions where a region may start or end (every stage boundary, or the macro-stage
boundaries of :func:`planners.rotor.dp_cuts` on long chains). Each arc of the path is a
*segment*:

* a taped unit: ``Run`` of each of its stages, keeping their tapes; or
* a ``Region(a, b)`` with one of its bodies: the body is a sub-chain problem, and its
  candidates are the Pareto points (peak, cost) of the chain DP's table
  (:class:`planners.rotor.ScheduleTable`, the heterogeneous-chain recurrence of
  Beaumont et al., arXiv 1911.13214), nested regions and revolve inside included. On a
  graph the table is built on the chain with every state counted as a buffer of its own
  (:func:`separate_states`), which over-counts shared skips and so never under-states a
  body's peak.

Variables: ``segment[s]`` (the path uses segment ``s``), and ``held[v, c]``: value ``v`` is
kept, at position ``c``, by a tape or a region record of some earlier segment: one
variable per value and position, however many segments hold it (the retention interval
of ``v`` runs from the first holder to the end of the forward pass, and its backward frees
it no earlier than the moments that are constrained). Memory is bounded at every moment
of every chosen segment (its forward, its untaped advance, its recompute and backward,
and the loss) by

    private bytes kept before it + Σ held values not live in the segment itself
    + the segment's own live bytes ≤ budget,

with the simulator's rules (:mod:`planners.simulate`) value by value, so on a chain every
moment equals :func:`planners.rotor_events.predict_schedule`'s, to the byte. The
objective is the total compute. Sizes are counted in ``memory_unit_bytes``, rounded up,
and the budget down, so rounding never breaks the budget (the default, 1, is exact).

Every result is checked by :func:`planners.simulate_plan`, the independent validator.
On a graph the bodies' peaks are over-counted, never under-counted, so a schedule over
the budget would be a bug; it is still handled: the model is solved again with the
budget lowered by the excess, and at the end its smallest-peak schedule is returned if
it fits. No schedule over the budget is ever returned.

Statuses: OPTIMAL gives a plan marked ``proven_optimal`` (optimal over this search
space: top-level paths with the table's bodies, each body frontier thinned to at most
``body_points`` points); FEASIBLE a plan marked not proven optimal; INFEASIBLE raises
:class:`InfeasibleBudgetError` with the smallest budget the model reaches; UNKNOWN (no
solution within ``time_limit_s``) raises :class:`PlanningTimeoutError`.

Background, papers and test values: ``docs/algorithms.md`` §4.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from math import inf

from ortools.sat.python import cp_model

from planners.chain import Chain, Stage, carries_values
from planners.errors import AnodePlanError, PlanInvariantError
from planners.feasibility import infeasible_error
from planners.rotor import ScheduleTable, dp_cuts
from planners.rotor_events import HOLD_ALL, ChainEvents
from planners.rotor_frontier import thinned
from planners.schedule import Op, Region, Run, Schedule, count_regions, counted, nesting_depth
from planners.simulate import simulate_plan

_log = logging.getLogger("anode_plan.planners.cpsat")


class PlanningTimeoutError(AnodePlanError, RuntimeError):
    """The solver found no schedule within its time limit; raise ``time_limit_s``."""


@dataclass(frozen=True)
class _Moment:
    """A moment a segment's memory is checked at: its own live bytes, and which values of
    the state at its start are among them (those are not charged again if held earlier)."""

    own_bytes: int
    holds: frozenset


@dataclass(frozen=True)
class _Segment:
    """One arc of the top-level path, from position index ``start`` to ``stop``."""

    start: int
    stop: int
    ops: tuple[Op, ...]
    cost: float
    moments: tuple[_Moment, ...]
    private_bytes: int      # kept from its forward to its backward, shared with no other segment
    kept_values: frozenset  # values kept from its forward to its backward, shared with other holders


class _Values:
    """The simulator's byte counts, value by value (see :mod:`planners.simulate`)."""

    def __init__(self, chain: Chain) -> None:
        n = len(chain.stages)
        free = set(chain.state_values[0])
        self.charge = [0 if v in free else b for v, b in enumerate(chain.value_bytes)]
        gradless = set(chain.gradless_values)
        grad_charge = [b if (v not in free or chain.input_grad) and v not in gradless else 0
                       for v, b in enumerate(chain.value_bytes)]
        self.states = [frozenset(v for v in values if self.charge[v]) for values in chain.state_values]
        self.saved, self.created_bytes = [], []
        consumed = []
        created = []
        for i in range(n):
            used, made, saved = chain.value_flow(i)
            consumed.append(used)
            created.append(made)
            self.saved.append(frozenset(v for v in saved if self.charge[v]))
            self.created_bytes.append(sum(self.charge[v] for v in made))
        # Gradients live before each stage's backward, and what its backward allocates:
        # both fixed by the position, since backward always visits stages n-1 .. 0.
        grads = {v: grad_charge[v] for v in chain.state_values[n]}
        self.loss_bytes = self.size(self.states[n]) + sum(grads.values()) + chain.head_bytes
        self.grad_before, self.grad_new = [0] * n, [0] * n
        params: set[int] = set()
        permanent = 0
        for i in reversed(range(n)):
            self.grad_before[i] = sum(grads.values()) + permanent
            new = 0
            for v in consumed[i]:
                if v not in grads:
                    grads[v] = grad_charge[v]
                    new += grad_charge[v]
            for p in chain.stages[i].param_ids:
                if p not in params:
                    params.add(p)
                    permanent += chain.param_grad_bytes[p]
                    new += chain.param_grad_bytes[p]
            self.grad_new[i] = new
            for v in created[i]:
                grads.pop(v, None)
        self.output = self.states[n]

    def size(self, values) -> int:
        return sum(self.charge[v] for v in values)


def separate_states(chain: Chain) -> Chain:
    """The chain with every state a buffer of its own: what the chain DP can plan.

    A value carried through stages is counted in every state that carries it, and a tape
    that saves any of a state saves all of it, so every peak of this chain is at least
    the true one: its table gives safe (if pessimistic) bodies on a graph.
    """
    values = _Values(chain)
    grads = chain.input_grad
    sizes = [chain.stages[0].input_bytes] + [
        sum(chain.value_bytes[v] for v in state if v in values.states[k] or grads)
        for k, state in enumerate(chain.state_values) if k]
    stages = []
    for i, stage in enumerate(chain.stages):
        ins, outs = set(chain.state_values[i]), set(chain.state_values[i + 1])
        saved = set(values.saved[i]) | set(stage.saved_values or ())
        stages.append(Stage(
            name=stage.name, input_bytes=sizes[i], output_bytes=sizes[i + 1], tape_bytes=stage.tape_bytes,
            saves_input=stage.saves_input if stage.saved_values is None else bool(saved & ins),
            saves_output=stage.saves_output if stage.saved_values is None else bool(saved & (outs - ins)),
            fwd_taped_bytes=stage.fwd_taped_bytes, fwd_untaped_bytes=stage.fwd_untaped_bytes,
            rerun_taped_bytes=stage.rerun_taped_bytes, bwd_bytes=stage.bwd_bytes, fwd_cost=stage.fwd_cost,
            bwd_cost=stage.bwd_cost,
            param_ids=stage.param_ids, block=stage.block, step=stage.step))
    return Chain(tuple(stages), chain.blocks, chain.param_grad_bytes, chain.input_grad, chain.head_bytes,
                 chain.name, chain.cost_unit)


@dataclass(frozen=True)
class CPSat:
    """The cheapest top-level path of taped units and regions, each value counted once (OR-Tools CP-SAT).

    Use it for networks with skip connections across blocks (:class:`~planners.Auto` does);
    on chains it agrees with :class:`~planners.ChainDP`.

    Attributes:
        time_limit_s: the limit of one solve, in CP-SAT's deterministic time units (the
            wall clock is capped at four times it), so that a plan repeats on any
            machine and under any load. The search starts from the table's schedule
            (``hint``), so a short limit costs optimality, never feasibility.
        workers: CP-SAT search workers. One (the default) makes every solve deterministic,
            so the minimum budget an error reports is exactly the one that then plans.
        memory_unit_bytes: the memory unit; sizes round up, the budget down (1: exact).
        body_points: how many (peak, cost) points of each region body's frontier the
            model may choose from (``None``: all of them).
        memory_slots: the resolution of the chain DP's table of bodies
            (:class:`~planners.ChainDP`'s ``memory_slots``).
        max_resolves: how many times to re-solve with a lowered budget if the simulator
            finds the model's schedule over budget.
        max_positions: the most positions the top-level path may visit. A longer chain's
            region boundaries are thinned to this many, evenly, keeping the ends of
            its ODE blocks; the stages in between form taped units (and the bodies still
            use every boundary the table has). More is slower and closer to optimal.
        hint: start the search from the table's own top-level schedule (on a graph, the
            chain DP's schedule with every state counted as a buffer of its own), where
            it is a path of this model. The search then only improves on it.
    """

    time_limit_s: float = 10.0
    workers: int = 1
    memory_unit_bytes: int = 1
    body_points: int | None = 12
    memory_slots: int = 128
    max_resolves: int = 3
    hint: bool = True
    max_positions: int = 24

    def plan(self, chain: Chain, *, budget_bytes: int) -> Schedule:
        if self.memory_unit_bytes < 1:
            raise ValueError(f"CPSat(memory_unit_bytes={self.memory_unit_bytes}): needs at least 1 byte")
        if self.max_positions < 1:
            raise ValueError(f"CPSat(max_positions={self.max_positions}): needs at least 1 position")
        if self.body_points is not None and self.body_points < 1:
            raise ValueError(f"CPSat(body_points={self.body_points}): needs at least 1 point per body")
        model = _Model(self, chain)
        segments, hint = model.segments(budget_bytes)
        target = budget_bytes
        for attempt in range(self.max_resolves + 1):
            solved = model.solve(segments, hint, target)
            if solved is None:
                break
            ops, optimal = solved
            simulation = simulate_plan(chain, ops)
            if simulation.peak_bytes <= budget_bytes:
                return self._schedule(ops, model, optimal, simulation.peak_bytes)
            # The model under-counted this schedule: ask again for less, more each time.
            target -= (simulation.peak_bytes - budget_bytes) * (attempt + 1)
        # Its smallest-peak schedule may still fit when simulated; otherwise nothing it builds does.
        solved = model.solve(*model.segments(inf, min_peak_only=True), None)
        if solved is None:  # pragma: no cover - every chain has a schedule; no budget bounds this solve
            raise PlanInvariantError(f"CP-SAT found no schedule at all for {chain.name}; this is a bug")
        smallest = simulate_plan(chain, solved[0])
        if smallest.peak_bytes > budget_bytes:
            raise infeasible_error(chain, "CP-SAT", budget_bytes, smallest)
        return self._schedule(solved[0], model, False, smallest.peak_bytes)

    @staticmethod
    def _schedule(ops: tuple[Op, ...], model: "_Model", optimal: bool, peak: int) -> Schedule:
        text = (f"CP-SAT over {len(model.cuts) - 1} positions: {counted(count_regions(ops), 'region')}, nesting depth "
                f"{nesting_depth(ops)}, peak {peak} bytes" + ("" if optimal else " (feasible, not proven optimal)"))
        return Schedule(ops, planner="cp-sat", proven_optimal=optimal, description=text)


class _Model:
    """Data → segments → variables → constraints → objective → solve → extract."""

    def __init__(self, planner: CPSat, chain: Chain) -> None:
        self.planner = planner
        self.chain = chain
        self.values = _Values(chain)
        self.graph = carries_values(chain)
        self.plain = separate_states(chain) if self.graph else chain
        self.two_level, self.cuts = dp_cuts(self.plain)
        if len(self.cuts) - 1 > planner.max_positions:
            self.two_level, self.cuts = True, _coarsened(self.plain, self.cuts, planner.max_positions)
        self.events = ChainEvents(self.plain)
        self.cut_values = frozenset().union(*(self.values.states[c] for c in self.cuts))

    # -- segments --------------------------------------------------------------------------------------------
    def segments(self, budget: float, *, min_peak_only: bool = False) -> tuple[list[_Segment], list[int]]:
        """Every segment whose bodies fit ``budget``, and the path of the table's own schedule (a hint)."""
        table = ScheduleTable(self.plain, self.events, self.cuts, self.two_level, self.planner.memory_slots, budget,
                              min_peak_only=min_peak_only)
        frontier = table.solve(bodies_only=not self.planner.hint)
        segments = [self._taped(u) for u in range(len(self.cuts) - 1)]
        for u in range(len(self.cuts) - 1):
            for w in range(u + 1, len(self.cuts)):
                segments.extend(self._regions(table, u, w))
        hint = self._path_of(table.ops_of(0 if min_peak_only else len(frontier) - 1), segments) if frontier else []
        return segments, hint

    def _path_of(self, ops: tuple[Op, ...], segments: list[_Segment]) -> list[int]:
        """The segments that make up ``ops``, or ``[]`` if ``ops`` is not such a path.

        A region whose body was thinned away is hinted with its smallest-peak body.
        """
        position = {cut: index for index, cut in enumerate(self.cuts)}
        by_arc: dict[tuple[int, int], list[int]] = {}
        for index, segment in enumerate(segments):
            by_arc.setdefault((segment.start, segment.stop), []).append(index)
        path, cursor, k = [], 0, 0
        while k < len(ops):
            op = ops[k]
            if isinstance(op, Run):  # a taped unit: every stage of it, taped
                u = position.get(op.stage)
                if u is None or u + 1 == len(self.cuts):
                    return []
                end = self.cuts[u + 1]
                if ops[k:k + end - op.stage] != tuple(Run(i) for i in range(op.stage, end)):
                    return []
                path.append(by_arc[(u, u + 1)][0])  # the taped unit comes first among its arc's segments
                k += end - op.stage
            else:
                candidates = by_arc.get((position.get(op.start), position.get(op.stop)), [])
                candidates = [i for i in candidates if isinstance(segments[i].ops[0], Region)]
                if not candidates:
                    return []
                same = [i for i in candidates if segments[i].ops == (op,)]
                path.append(same[0] if same else candidates[0])  # else the smallest-peak body
                k += 1
            cursor = segments[path[-1]].stop
        return path if cursor == len(self.cuts) - 1 else []

    def _taped(self, u: int) -> _Segment:
        """Unit ``u`` with every tape kept: the simulator's taped forward and backward, stage by stage."""
        values, stages = self.values, self.chain.stages
        a, b = self.cuts[u], self.cuts[u + 1]
        entry = values.states[a]
        moments = []
        tapes, kept = [0], [frozenset()]  # before stage a + k: tape bytes and values kept by the unit
        for i in range(a, b):
            live = kept[-1] | values.states[i]
            transient = max(stages[i].fwd_taped_bytes, values.created_bytes[i] + stages[i].tape_bytes)
            moments.append(_Moment(tapes[-1] + values.size(live) + transient, live & entry))
            tapes.append(tapes[-1] + stages[i].tape_bytes)
            kept.append(kept[-1] | values.saved[i])
        for k, i in reversed(list(enumerate(range(a, b)))):
            live = kept[k + 1] | values.output
            transient = max(stages[i].bwd_bytes, values.grad_new[i] - stages[i].tape_bytes)  # tape freed at the end
            moments.append(_Moment(tapes[k + 1] + values.size(live) + values.grad_before[i] + transient, live & entry))
        return _Segment(u, u + 1, tuple(Run(i) for i in range(a, b)), sum(s.fwd_cost + s.bwd_cost for s in stages[a:b]),
                        _merged(moments), tapes[-1] + values.size(kept[-1] - self.cut_values),
                        kept[-1] & self.cut_values)

    def _regions(self, table: ScheduleTable, u: int, w: int) -> list[_Segment]:
        """``Region(cuts[u], cuts[w])`` with each body point of the table."""
        values, stages = self.values, self.chain.stages
        a, b = self.cuts[u], self.cuts[w]
        entry = values.states[a]
        key = (u, w, HOLD_ALL, False)
        frontier = table.frontiers[key]
        if not frontier:
            return []
        points = frontier if self.planner.body_points is None else thinned(frontier, self.planner.body_points)
        index = {id(point): k for k, point in enumerate(frontier)}
        advance = max(values.size(entry | values.states[i])
                      + max(stages[i].fwd_untaped_bytes, values.created_bytes[i]) for i in range(a, b))
        forward_cost = sum(stage.fwd_cost for stage in stages[a:b])
        return [_Segment(u, w, (Region(a, b, table.ops_of(index[id(point)], key)),), forward_cost + point[1],
                         (_Moment(advance, entry), _Moment(values.size(values.output) + point[0], entry)),
                         0, entry)
                for point in points]

    # -- the model -------------------------------------------------------------------------------------------
    def solve(self, segments: list[_Segment], hint: list[int], budget_bytes: int | None
              ) -> tuple[tuple[Op, ...], bool] | None:
        """The cheapest path within the budget (``None``: the smallest peak); ``None`` if infeasible."""
        planner, values = self.planner, self.values
        unit = planner.memory_unit_bytes
        up = lambda nbytes: -(-int(nbytes) // unit)  # noqa: E731 - sizes round up
        last = len(self.cuts) - 1
        model = cp_model.CpModel()
        chosen = [model.NewBoolVar(f"segment[{s.start},{s.stop},{k}]") for k, s in enumerate(segments)]
        # The path: one segment leaves position 0, one reaches the end, and flow is conserved.
        leaving = [[] for _ in range(last + 1)]
        entering = [[] for _ in range(last + 1)]
        for var, segment in zip(chosen, segments):
            leaving[segment.start].append(var)
            entering[segment.stop].append(var)
        model.AddExactlyOne(leaving[0])
        model.AddExactlyOne(entering[last])
        for c in range(1, last):
            model.Add(sum(entering[c]) == sum(leaving[c]))
        # private[c]: bytes kept by the segments that ended at or before position c.
        total_private = sum(up(s.private_bytes) for s in segments)
        private = [model.NewConstant(0)]
        for c in range(1, last + 1):
            var = model.NewIntVar(0, total_private, f"private[{c}]")
            model.Add(var == private[-1] + sum(up(s.private_bytes) * x for x, s in zip(chosen, segments)
                                                if s.stop == c))
            private.append(var)
        # held[v][c]: value v is kept at position c by some earlier segment (once, however many hold it).
        held: dict[int, dict[int, object]] = {}
        for var, segment in zip(chosen, segments):
            for v in segment.kept_values:
                if values.charge[v]:
                    held.setdefault(v, {})
        first = {v: min(s.stop for s in segments if v in s.kept_values) for v in held}
        for v in held:
            for c in range(first[v], last + 1):
                held[v][c] = model.NewBoolVar(f"held[{v},{c}]")
                if c > first[v]:
                    model.AddImplication(held[v][c - 1], held[v][c])
        for var, segment in zip(chosen, segments):
            for v in segment.kept_values:
                if v in held:
                    model.AddImplication(var, held[v][segment.stop])

        def held_bytes(c: int, excluded: frozenset):
            return sum(up(values.charge[v]) * per_position[c] for v, per_position in held.items()
                       if c in per_position and v not in excluded)

        outside = []  # held values not in the state at c
        for c in range(last + 1):
            state = values.states[self.cuts[c]]
            bound = sum(up(values.charge[v]) for v, per_position in held.items() if c in per_position)
            var = model.NewIntVar(0, bound, f"held_outside[{c}]")
            model.Add(var == held_bytes(c, state))
            outside.append(var)
        limit = model.NewIntVar(0, 1 << 60, "peak") if budget_bytes is None else budget_bytes // unit
        # At most one segment leaves a position, so the moments that hold the whole state
        # there bound the memory in one linear constraint per position; the others (inside
        # a taped unit, where an earlier segment may hold part of the state) are enforced
        # only if their segment is chosen.
        whole = [[] for _ in range(last + 1)]
        for var, segment in zip(chosen, segments):
            c = segment.start
            state = values.states[self.cuts[c]]
            largest = 0
            for moment in segment.moments:
                if state <= moment.holds:
                    largest = max(largest, up(moment.own_bytes))
                    continue
                inside = sum(up(values.charge[v]) * held[v][c] for v in state - moment.holds
                             if v in held and c in held[v])
                model.Add(private[c] + outside[c] + inside + up(moment.own_bytes) <= limit).OnlyEnforceIf(var)
            whole[c].append(largest * var)
        for c in range(last):
            model.Add(private[c] + outside[c] + sum(whole[c]) <= limit)
        model.Add(private[last] + outside[last] + up(values.loss_bytes) <= limit)

        if budget_bytes is None:
            model.Minimize(limit)
        else:
            scale = 1e8 / max(1e-12, sum(s.fwd_cost + s.bwd_cost for s in self.chain.stages))
            model.Minimize(sum(round(s.cost * scale) * x for x, s in zip(chosen, segments)))

        for index in hint:
            model.AddHint(chosen[index], 1)
        solver = cp_model.CpSolver()
        # Deterministic time, so a plan repeats on any machine and load; the wall clock
        # is only a safety net.
        solver.parameters.max_deterministic_time = planner.time_limit_s
        solver.parameters.max_time_in_seconds = 4 * planner.time_limit_s
        solver.parameters.num_search_workers = planner.workers
        solver.parameters.random_seed = 0
        solver.parameters.linearization_level = 2  # the path and memory rows in the LP: much stronger bounds
        status = solver.Solve(model)
        if solver.WallTime() >= 2.0 and status in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            _log.info("CP-SAT on %s: %s in %.1f s, cost %.1f, bound %.1f, %d segments", self.chain.name,
                      solver.StatusName(status), solver.WallTime(), solver.ObjectiveValue(),
                      solver.BestObjectiveBound(), len(segments))
        if status == cp_model.INFEASIBLE:
            return None
        if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            raise PlanningTimeoutError(f"CP-SAT found no schedule for {self.chain.name} within {planner.time_limit_s} s "
                                       f"(status {solver.StatusName(status)}); raise CPSat(time_limit_s=...)")
        by_start = {s.start: s for x, s in zip(chosen, segments) if solver.Value(x)}
        ops: list[Op] = []
        c = 0
        while c < last:
            ops.extend(by_start[c].ops)
            c = by_start[c].stop
        return tuple(ops), status == cp_model.OPTIMAL


def _coarsened(chain: Chain, cuts: list[int], most: int) -> list[int]:
    """At most ``most`` units from ``cuts``: the ends of ODE blocks, then evenly spaced others."""
    kept = {cuts[0], cuts[-1]} | {k for block in chain.blocks for k in (block.start, block.stop)}
    kept = set(sorted(kept)[:most + 1]) | {cuts[0], cuts[-1]}
    spare = most + 1 - len(kept)
    others = [k for k in cuts if k not in kept]
    if spare > 0 and others:
        kept |= {others[(index * len(others)) // spare] for index in range(spare)}
    return sorted(kept)


def _merged(moments: list[_Moment]) -> tuple[_Moment, ...]:
    """One moment per set of held values: the largest (the others cannot bind)."""
    largest: dict[frozenset, int] = {}
    for moment in moments:
        largest[moment.holds] = max(largest.get(moment.holds, 0), moment.own_bytes)
    return tuple(_Moment(own, holds) for holds, own in largest.items())
