"""A CP-SAT planner for networks that are not chains: skip connections across ODE blocks.

Use it for U-Nets, DenseNets, torchvision ResNets: graphs where a tensor made early is
used much later. Traced and linearised, such a graph is a chain whose states carry the
skip tensors along (:attr:`planners.Chain.state_values`); a checkpoint placed anywhere
the skip is live holds it again, so the memory of two checkpoints is *not* the sum of
their sizes. The dynamic program assumes it is; this planner counts every value once.

The model follows Moccasin's use of CP-SAT (Bartan et al., ICML 2023,
arXiv 2304.14463) over *macro-stages*: every layer unit, and every ODE block as one
unit whose inner options (keep all tapes, ANODE, revolve with ``s`` snapshots, ANODE
with revolve inside) come from the chain planners with their cost and memory profile
from :func:`planners.simulate_plan`. The decisions:

* ``segment_start[b]``: a top-level segment starts at macro boundary ``b``;
* ``in_region[k]``: macro ``k`` lies in a segment that runs untaped and is recomputed
  in backward (a :class:`~planners.Region`); otherwise its segment keeps its tapes;
* ``option[k, o]``: macro ``k`` (an ODE block) runs with inner option ``o``;
* ``held[v, k]``: value ``v`` is kept, at the moments of macro ``k``, by a region that
  started at a boundary where ``v`` was live — one variable per value, however many
  regions hold it.

Memory is bounded at every macro's forward, untaped advance, recompute and backward,
in units of ``memory_unit_bytes`` with every size rounded up and the budget rounded
down, so rounding never breaks the budget. The objective is the total compute.
Phases: data → variables → constraints → objective → solve → extract → check. Each
result is checked by :func:`planners.simulate_plan`, the independent validator; if the
simulated peak is over the budget (the model is conservative, so it should not be),
the model is solved again with the budget lowered by the excess (more at each retry),
and at the end its smallest-peak schedule is returned if it fits; no schedule over
the budget is ever returned.

Statuses: OPTIMAL gives a plan marked ``proven_optimal`` (optimal among the schedules
this model describes: one level of regions over macro-stages, with the blocks' inner
options); FEASIBLE gives a plan marked not proven optimal; INFEASIBLE raises
:class:`InfeasibleBudgetError` with the smallest budget the model can reach; UNKNOWN
(no solution within ``time_limit_s``) raises :class:`PlanningTimeoutError`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from planners.chain import Chain
from planners.errors import AnodePlanError, PlanInvariantError
from planners.feasibility import infeasible_error
from planners.revolve import fewest_snapshots, revolve_ops, useful_snapshots
from planners.schedule import Op, Region, Run, Schedule
from planners.simulate import simulate_plan


class PlanningTimeoutError(AnodePlanError, RuntimeError):
    """The solver found no schedule within its time limit; raise ``time_limit_s``."""


@dataclass(frozen=True)
class _Macro:
    start: int
    stop: int
    block: int | None


@dataclass(frozen=True)
class _Profile:
    """One macro-stage under one inner option, simulated alone (bytes are exact)."""

    ops: tuple[Op, ...]
    cost: float
    forward_peak: int      # peak of its taped forward, its own output included
    kept: int              # what stays after its taped forward (tapes, inner snapshots, output)
    backward_peak: int     # peak of its backward and inner recompute, all its own memory included


def _macros(chain: Chain) -> list[_Macro]:
    macros, stage = [], 0
    for index, block in enumerate(chain.blocks):
        macros.extend(_Macro(i, i + 1, None) for i in range(stage, block.start))
        macros.append(_Macro(block.start, block.stop, index))
        stage = block.stop
    macros.extend(_Macro(i, i + 1, None) for i in range(stage, len(chain.stages)))
    return macros


def _options(macro: _Macro, snapshot_choices: int) -> list[tuple[Op, ...]]:
    """The inner schedules a macro-stage may run: its tapes; for a block also ANODE, revolve, ANODE+revolve."""
    runs = tuple(Run(i) for i in range(macro.start, macro.stop))
    if macro.block is None:
        return [runs]
    options = [runs, (Region(macro.start, macro.stop, runs),)]
    steps = macro.stop - macro.start
    if steps < 2:
        return options
    most = useful_snapshots(steps)
    choices = sorted({max(1, round(most ** (k / max(1, snapshot_choices - 1)))) for k in range(snapshot_choices)})
    for s in (s for s in choices if fewest_snapshots(steps) <= s < steps):
        inner = revolve_ops(macro.start, macro.stop, s)
        options += [inner, (Region(macro.start, macro.stop, inner),)]
    return options


def _sub_chain(chain: Chain, macro: _Macro) -> Chain:
    """The macro's stages alone: free inputs, no parameter gradients, no loss head."""
    stages = chain.stages[macro.start:macro.stop]
    return Chain(stages=stages, blocks=(), param_grad_bytes=(0,) * len(chain.param_grad_bytes), input_grad=True,
                 head_bytes=0, name=chain.name, state_values=chain.state_values[macro.start:macro.stop + 1],
                 value_bytes=chain.value_bytes)


def _profile(chain: Chain, macro: _Macro, ops: tuple[Op, ...]) -> _Profile:
    shifted = _shift(ops, -macro.start)
    sim = simulate_plan(_sub_chain(chain, macro), shifted, timeline=True)
    forward = [e for e in sim.timeline if e.phase == "forward"]
    later = [e for e in sim.timeline if e.phase in ("recompute", "backward")]
    loss = next(e for e in sim.timeline if e.phase == "loss")
    return _Profile(ops=ops, cost=sim.compute_cost, forward_peak=max(e.peak_bytes for e in forward),
                    kept=forward[-1].live_bytes, backward_peak=max([loss.live_bytes] + [e.peak_bytes for e in later]))


def _shift(ops: tuple[Op, ...], offset: int) -> tuple[Op, ...]:
    return tuple(Run(op.stage + offset) if isinstance(op, Run)
                 else Region(op.start + offset, op.stop + offset, _shift(op.body, offset)) for op in ops)


@dataclass(frozen=True)
class CPSat:
    """Optimal one-level segmentation of a DAG-shaped chain, with per-block inner options (OR-Tools CP-SAT).

    Attributes:
        time_limit_s: the solver's wall-clock limit for one solve.
        workers: CP-SAT search workers. One (the default) makes every solve deterministic,
            so the minimum budget an error reports is exactly the one that then plans.
        memory_unit_bytes: the memory unit; sizes round up, the budget down.
        snapshot_choices: how many revolve snapshot counts each block is offered.
        max_resolves: how many times to re-solve with a lowered budget if the simulator
            finds the model's schedule over budget.
    """

    time_limit_s: float = 20.0
    workers: int = 1
    memory_unit_bytes: int = 4096
    snapshot_choices: int = 4
    max_resolves: int = 3

    def plan(self, chain: Chain, *, budget_bytes: int) -> Schedule:
        macros = _macros(chain)
        profiles = [[_profile(chain, m, ops) for ops in _options(m, self.snapshot_choices)]
                    for m in macros]
        target = budget_bytes
        for attempt in range(self.max_resolves + 1):
            solved = self._solve(chain, macros, profiles, target, minimise_peak=False)
            if solved is None:
                break
            ops, optimal = solved
            sim = simulate_plan(chain, ops)
            if sim.peak_bytes <= budget_bytes:
                return Schedule(ops, planner="cp-sat", proven_optimal=optimal,
                                description=self._describe(ops, macros, optimal))
            # The model under-counted this schedule: ask again for less, more each time.
            target -= (sim.peak_bytes - budget_bytes) * (attempt + 1)
        # The model is conservative, or under-counted too often: its smallest-peak
        # schedule may still fit when simulated. Otherwise nothing it can build does.
        ops = self._smallest(chain, macros, profiles)
        smallest = simulate_plan(chain, ops)
        if smallest.peak_bytes > budget_bytes:
            raise infeasible_error(chain, "CP-SAT", budget_bytes, smallest)
        return Schedule(ops, planner="cp-sat", proven_optimal=False,
                        description=self._describe(ops, macros, False))

    def _smallest(self, chain, macros, profiles) -> tuple[Op, ...]:
        """The schedule of least modelled peak (what the infeasibility error reports)."""
        solved = self._solve(chain, macros, profiles, None, minimise_peak=True)
        if solved is None:  # pragma: no cover - every chain has a schedule; no budget bounds this solve
            raise PlanInvariantError(f"CP-SAT found no schedule at all for {chain.name}; this is a bug")
        return solved[0]

    @staticmethod
    def _describe(ops, macros, optimal) -> str:
        regions = sum(isinstance(op, Region) for op in ops)
        return f"CP-SAT, {regions} top-level regions over {len(macros)} macro-stages" + \
            ("" if optimal else " (feasible, not proven optimal)")

    # -- the model -------------------------------------------------------------------------------------------
    def _solve(self, chain: Chain, macros: list[_Macro], profiles: list[list[_Profile]], budget_bytes: int | None,
               *, minimise_peak: bool) -> tuple[tuple[Op, ...], bool] | None:
        from ortools.sat.python import cp_model  # imported here: the other planners need no OR-Tools

        unit = self.memory_unit_bytes
        up = lambda nbytes: -(-int(nbytes) // unit)  # noqa: E731 - sizes round up
        count = len(macros)
        boundary_values = [chain.state_values[m.start] for m in macros]
        free = set(chain.state_values[0])
        last_use = {}
        for b, m in enumerate(macros):
            for v in boundary_values[b]:
                last_use[v] = b
        # Memory that does not depend on the schedule, at each macro: parameter gradients
        # already made when its backward runs, and skip values live across it in forward.
        grads_after = [0] * (count + 1)
        seen: set[int] = set()
        for k in range(count - 1, -1, -1):
            new = {p for i in range(macros[k].start, macros[k].stop) for p in chain.stages[i].param_ids} - seen
            seen |= new
            grads_after[k] = grads_after[k + 1] + sum(chain.param_grad_bytes[p] for p in new)
        carried = [sum(chain.value_bytes[v] for v in boundary_values[k] if v not in free and last_use[v] > k
                       and k + 1 < count and v in boundary_values[k + 1]) for k in range(count)]

        model = cp_model.CpModel()
        start = [model.NewConstant(1)] + [model.NewBoolVar(f"segment_start[{b}]") for b in range(1, count)]
        region = [model.NewBoolVar(f"in_region[{k}]") for k in range(count)]
        option = [[model.NewBoolVar(f"option[{k},{o}]") for o in range(len(profiles[k]))] for k in range(count)]
        for k in range(count):
            model.AddExactlyOne(option[k])
            if k:
                model.Add(region[k] == region[k - 1]).OnlyEnforceIf(start[k].Not())
        # same[j][k]: macros j <= k lie in one segment.
        same = [[None] * count for _ in range(count)]
        for j in range(count):
            same[j][j] = model.NewConstant(1)
            for k in range(j + 1, count):
                same[j][k] = model.NewBoolVar(f"same_segment[{j},{k}]")
                model.AddBoolAnd([same[j][k - 1], start[k].Not()]).OnlyEnforceIf(same[j][k])
                model.AddBoolOr([same[j][k - 1].Not(), start[k]]).OnlyEnforceIf(same[j][k].Not())
        region_start = []
        for b in range(count):
            var = model.NewBoolVar(f"region_start[{b}]")
            model.AddBoolAnd([start[b], region[b]]).OnlyEnforceIf(var)
            model.AddBoolOr([start[b].Not(), region[b].Not()]).OnlyEnforceIf(var.Not())
            region_start.append(var)

        def choose(k: int, field: str):
            return sum(up(getattr(p, field)) * option[k][o] for o, p in enumerate(profiles[k]))

        # kept[j]: what macro j's taped run keeps (0 if it ran untaped in a region).
        kept_if_taped, kept_if_recomputed = [], []
        for j in range(count):
            taped = model.NewIntVar(0, max(up(p.kept) for p in profiles[j]), f"kept[{j}]")
            model.Add(taped == choose(j, "kept")).OnlyEnforceIf(region[j].Not())
            model.Add(taped == 0).OnlyEnforceIf(region[j])
            kept_if_taped.append(taped)
            kept_if_recomputed.append(choose(j, "kept"))
        # held[v, k]: bytes of region inputs kept at macro k, each value counted once.
        held_terms = [[] for _ in range(count)]
        values = sorted({v for vs in boundary_values for v in vs if v not in free and chain.value_bytes[v]})
        for v in values:
            holders = []
            for k in range(count):
                if v in boundary_values[k]:
                    holders.append(region_start[k])
                if holders:
                    var = model.NewBoolVar(f"held[{v},{k}]")
                    for h in holders:
                        model.AddImplication(h, var)
                    held_terms[k].append(up(chain.value_bytes[v]) * var)
        # Recomputed tapes of earlier macros in k's own region segment, while k runs backward.
        limit = model.NewIntVar(0, 1 << 50, "peak") if minimise_peak else None
        bound = limit if minimise_peak else budget_bytes // unit
        for k in range(count):
            before_taped = sum(kept_if_taped[j] for j in range(k))
            held = sum(held_terms[k])
            fixed = up(carried[k])
            state_in = sum(chain.value_bytes[v] for v in boundary_values[k] if v not in free)
            advance = up(state_in + max(chain.stages[i].fwd_untaped_bytes for i in range(macros[k].start,
                                                                                        macros[k].stop)))
            # forward (taped) and untaped advance
            model.Add(before_taped + held + fixed + choose(k, "forward_peak") <= bound).OnlyEnforceIf(region[k].Not())
            model.Add(before_taped + held + fixed + advance <= bound).OnlyEnforceIf(region[k])
            # recompute and backward: earlier macros of the same region segment are live again
            again = []
            for j in range(k):
                recomputed = model.NewBoolVar(f"recomputed[{j},{k}]")  # j runs again before k's backward
                model.AddBoolAnd([same[j][k], region[j]]).OnlyEnforceIf(recomputed)
                model.AddBoolOr([same[j][k].Not(), region[j].Not()]).OnlyEnforceIf(recomputed.Not())
                kept = model.NewIntVar(0, max(up(p.kept) for p in profiles[j]), f"kept_again[{j},{k}]")
                model.Add(kept == kept_if_recomputed[j]).OnlyEnforceIf(recomputed)
                model.Add(kept == 0).OnlyEnforceIf(recomputed.Not())
                again.append(kept)
            grads = up(grads_after[k]) + up(carried[k])
            model.Add(before_taped + sum(again) + held + grads + choose(k, "forward_peak") <= bound).OnlyEnforceIf(
                region[k])
            model.Add(before_taped + sum(again) + held + grads + choose(k, "backward_peak") <= bound)
        head = up(chain.head_bytes) + up(sum(chain.value_bytes[v] for v in chain.state_values[-1] if v not in free))
        model.Add(sum(kept_if_taped) + sum(held_terms[count - 1]) + head <= bound)

        if minimise_peak:
            model.Minimize(limit)
        else:
            scale = 1000.0 / max(1e-12, max(p.cost for ps in profiles for p in ps))
            extra = [int(math.ceil(sum(chain.stages[i].fwd_cost for i in range(m.start, m.stop)) * scale))
                     for m in macros]
            model.Minimize(sum(int(math.ceil(p.cost * scale)) * option[k][o] for k in range(count)
                               for o, p in enumerate(profiles[k])) + sum(extra[k] * region[k] for k in range(count)))

        solver = cp_model.CpSolver()
        solver.parameters.max_time_in_seconds = self.time_limit_s
        solver.parameters.num_search_workers = self.workers
        solver.parameters.random_seed = 0
        status = solver.Solve(model)
        if status == cp_model.INFEASIBLE:
            return None
        if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            raise PlanningTimeoutError(f"CP-SAT found no schedule for {chain.name} within {self.time_limit_s} s "
                                       f"(status {solver.StatusName(status)}); raise CPSat(time_limit_s=...)")
        # extract
        ops: list[Op] = []
        segment: list[Op] = []
        segment_is_region = False
        for k, macro in enumerate(macros):
            if k == 0 or solver.Value(start[k]):
                ops.extend(_close(segment, segment_is_region))
                segment, segment_is_region = [], bool(solver.Value(region[k]))
            chosen = next(o for o in range(len(profiles[k])) if solver.Value(option[k][o]))
            segment.extend(profiles[k][chosen].ops)
        ops.extend(_close(segment, segment_is_region))
        return tuple(ops), status == cp_model.OPTIMAL


def _close(segment: list[Op], is_region: bool) -> list[Op]:
    if not segment:
        return []
    if not is_region:
        return list(segment)
    first, last = segment[0], segment[-1]
    start = first.stage if isinstance(first, Run) else first.start
    stop = last.stage + 1 if isinstance(last, Run) else last.stop
    return [Region(start, stop, tuple(segment))]
