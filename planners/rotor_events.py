"""The events of :func:`planners.simulate_plan`, in the form the chain DP composes them.

:class:`ChainEvents` reads a chain once and answers, in O(1), what a schedule's
operations add to the memory at each moment the simulator checks. The chain DP
(:mod:`planners.rotor`) and :func:`predict_schedule` both build on it, and tests pin
``predict_schedule(...) == simulate_plan(...)`` on every schedule of small chains.

How a list of operations over stages ``[a, b)`` uses memory (derived from the rules in
:mod:`planners.simulate`; all numbers are *own* bytes, on top of the memory ``E``
that the enclosing operations hold for the whole time the list runs):

* The list is either the top-level schedule (``top``: its end ``b = n`` is the loss) or
  the body of a region being recomputed (its end ``b`` is where the body's output is
  dropped and backward starts). At the start of its forward, it owns ``x_a`` and, as a
  body, the output gradient ``δ_b`` and the parameter gradients already made,
  ``G(b) = Σ_{i ≥ b} P_i`` (``P_i`` is what the backward of stage ``i`` allocates for
  parameters no later stage touched; the backward order ``n-1 .. 0`` never changes,
  so ``G`` is a fixed function of the position). That is :meth:`forward_extra`.
* ``hold`` says what of ``x_a`` someone outside the list keeps alive anyway (nothing
  after a region; what the tape of stage ``a-1`` saved of it, after ``Run(a-1)``; all
  of it in the body of a region, whose record holds it). The rest dies as soon as the
  list no longer needs it.
* The top-level output ``x_n`` is held by the caller through all of backward
  (:meth:`backward_extra`); a recomputed output is a fresh buffer.
* ``Run(a)``: the taped forward peaks at ``x_a + forward_extra + max(fwd_taped,
  out + tape)``; it keeps ``tape_a`` and the part of ``x_a`` its tape saved or the
  hold keeps, while the rest of the list runs (holding what the tape saved of
  ``x_{a+1}``); its backward peaks at what it kept, plus what the rest leaves (the
  saved part of ``x_{a+1}``, ``δ_{a+1}``, ``G(a+1)``), plus ``max(bwd_bytes, δ_a + P_a -
  tape_a)`` (while it runs, and at its end, when the tape is freed and the gradients made).
* ``Region(a, j)``: the untaped forward peaks at ``x_a + forward_extra +`` the largest
  ``x_i·[i > a] + max(fwd_untaped_i, x_{i+1})`` over ``a ≤ i < j``; the rest of the list
  runs with ``x_a`` held by the region's record (and nothing of ``x_j`` held); then the
  body is recomputed as a body list over ``[a, j)`` holding all of ``x_a``, on top of
  :meth:`backward_extra` only.
* The end of the list: the loss peaks at ``x_n + δ_n + head_bytes``.

States are sets of values (:attr:`planners.Chain.state_values`): what a tape saves is
a set of values, and the gradients of the network input's values, made when a stage
consumes them and never freed, count with the parameter gradients in ``G``. A value
carried unchanged through a stage (a skip connection) would make states share
buffers; such chains are refused (:class:`ChainEvents`).

A list's peak is the largest of these, each shifted by what the list's earlier
operations still hold; the DP's recurrence is exactly this, with a choice at each
operation.
"""

from __future__ import annotations

from planners.chain import Chain
from planners.schedule import Op, Run


HOLD_NONE, HOLD_TAPE, HOLD_ALL = 0, 1, 2
"""What of ``x_a`` is kept alive from outside a list: nothing (it follows a region), what
the tape of stage ``a-1`` saved of its output (it follows ``Run(a-1)``), or all of it (it
is a region's body, whose record holds ``x_a``)."""


class ChainEvents:
    """Per-stage and per-position byte counts of a chain, as the simulator charges them.

    Positions ``k = 0 .. n`` name states: ``state_bytes[k]`` is ``x_k``, the sum of its
    values (:attr:`Chain.state_values`; the network input's values cost nothing).
    Stages ``i = 0 .. n-1`` name operations.

    Raises ``ValueError`` for a chain whose stages carry a value through unchanged (a
    skip connection, other than of the network input): a state is then not a buffer
    of its own, and :class:`~planners.CPSat` is the planner for it.
    """

    def __init__(self, chain: Chain) -> None:
        stages = chain.stages
        n = len(stages)
        self.chain = chain
        self.n = n
        free = set(chain.state_values[0])  # the network input's values
        value_bytes = chain.value_bytes

        def state_bytes(values) -> int:
            return sum(value_bytes[v] for v in values if v not in free)

        gradless = set(chain.gradless_values)

        def grad_bytes(values) -> int:
            return sum(value_bytes[v] for v in values if (v not in free or chain.input_grad) and v not in gradless)

        self.state_bytes = [state_bytes(values) for values in chain.state_values]
        # δ_k: the gradient of x_k, made by the backward of stage k and freed by that of
        # stage k-1. Gradients of input values are made when consumed and never freed;
        # gradless values (``Chain.gradless_values``) get none.
        self.grad_bytes = [sum(value_bytes[v] for v in values if v not in free and v not in gradless)
                           for values in chain.state_values[:n]] + [grad_bytes(chain.state_values[n])]
        permanent = [0] * n
        seen: set[int] = set()
        for i in reversed(range(n)):
            for param in stages[i].param_ids:
                if param not in seen:
                    seen.add(param)
                    permanent[i] += chain.param_grad_bytes[param]
        saved_consumed, self.saved_created = [], []
        for i, stage in enumerate(stages):
            ins, outs = chain.state_values[i], chain.state_values[i + 1]
            carried = [v for v in ins if v in outs and v not in free]
            if carried:
                raise ValueError(
                    f"ChainDP plans chains whose states are buffers of their own, but stage {i} ({stage.name}) of "
                    f"{chain.name} carries value(s) {carried} through unchanged (a skip connection). Plan it with "
                    "planners.CPSat, or with planners.Auto, which picks the planner by the chain's shape.")
            consumed, created, saved = chain.value_flow(i)
            saved_consumed.append({v for v in saved if v in consumed and v not in free})
            self.saved_created.append({v for v in saved if v in created})
            permanent[i] += grad_bytes(v for v in consumed if v in free)
        self.new_param_grad_bytes = permanent  # gradients made by a backward that stay to the end
        # G(k): those live once the stages >= k are done, with the gradients of input
        # values in the output, which the loss makes.
        self.param_grad_live = [0] * (n + 1)
        for i in reversed(range(n)):
            self.param_grad_live[i] = (self.param_grad_live[i + 1] + permanent[i]
                                       + (grad_bytes(v for v in chain.state_values[n] if v in free) if i == n - 1
                                          else 0))
        nonfree = [{v for v in values if v not in free} for values in chain.state_values]
        # Bytes of x_i kept by Run(i) besides its tape, for each hold; and the hold after it.
        self.kept_state_bytes = []
        self.hold_after = []
        self.held_output_bytes = []
        for i in range(n):
            held_by_tape = self.saved_created[i - 1] & nonfree[i] if i else set()
            self.kept_state_bytes.append(tuple(state_bytes(saved_consumed[i] | held)
                                               for held in (set(), held_by_tape, nonfree[i])))
            created_saved = self.saved_created[i]
            self.hold_after.append(HOLD_NONE if not created_saved else
                                   HOLD_ALL if created_saved == nonfree[i + 1] else HOLD_TAPE)
            self.held_output_bytes.append(state_bytes(created_saved))
        self.tape_bytes = [stage.tape_bytes for stage in stages]
        self.taped_peak = [max(s.fwd_taped_bytes, self.state_bytes[i + 1] + s.tape_bytes)
                           for i, s in enumerate(stages)]
        # A body's taped forward is a re-run, in backward.
        self.rerun_peak = [max(s.rerun_taped_bytes, self.state_bytes[i + 1] + s.tape_bytes)
                           for i, s in enumerate(stages)]
        self.untaped_peak = [max(s.fwd_untaped_bytes, self.state_bytes[i + 1]) for i, s in enumerate(stages)]
        # After the backward: the tape freed, the new gradients made (the saved states still counted).
        self.backward_peak = [max(s.bwd_bytes, self.grad_bytes[i] + permanent[i] - s.tape_bytes)
                              for i, s in enumerate(stages)]
        self.step_cost = [s.fwd_cost + s.bwd_cost for s in stages]
        self.fwd_cost_prefix = [0.0]
        for stage in stages:
            self.fwd_cost_prefix.append(self.fwd_cost_prefix[-1] + stage.fwd_cost)
        self.head_bytes = chain.head_bytes
        self._untaped_table = _SparseMax([self.state_bytes[i] + self.untaped_peak[i] for i in range(n)])

    def holds_at(self, position: int) -> tuple[int, ...]:
        """The holds a list starting at ``position`` can have."""
        partial = position > 0 and self.hold_after[position - 1] == HOLD_TAPE
        return (HOLD_NONE, HOLD_TAPE, HOLD_ALL) if partial else (HOLD_NONE, HOLD_ALL)

    def stage_signature(self, stage: int) -> tuple:
        """Everything the events of ``stage`` depend on, but its position: two stages
        with equal signatures and equal surroundings price every list the same. (The
        stage's own forward cost, not a difference of prefix sums, whose rounding varies
        with the position and would keep identical steps from sharing lists.)"""
        return (self.state_bytes[stage], self.state_bytes[stage + 1], self.kept_state_bytes[stage],
                self.hold_after[stage], self.held_output_bytes[stage], self.tape_bytes[stage],
                self.taped_peak[stage], self.rerun_peak[stage], self.untaped_peak[stage],
                self.backward_peak[stage],
                self.new_param_grad_bytes[stage], self.step_cost[stage], self.chain.stages[stage].fwd_cost)

    # -- context of a list of operations over [start, stop) --------------------------------

    def forward_extra(self, stop: int, top: bool) -> int:
        """Own bytes besides ``x_start`` during the list's forward: ``δ_stop + G(stop)`` for a body."""
        return 0 if top else self.grad_bytes[stop] + self.param_grad_live[stop]

    def backward_extra(self, top: bool) -> int:
        """The network output, held by the caller through all of backward at the top level."""
        return self.state_bytes[self.n] if top else 0

    def end_peak(self, stop: int, top: bool) -> int:
        """The empty list at ``stop``: the loss at the top level, else what is live there."""
        if top:
            return self.state_bytes[self.n] + self.grad_bytes[self.n] + self.head_bytes
        return self.state_bytes[stop] + self.grad_bytes[stop] + self.param_grad_live[stop]

    # -- one operation at the head of a list ---------------------------------------------

    def run_events(self, stage: int, hold: int, stop: int, top: bool) -> tuple[int, int, int]:
        """``Run(stage)`` heading a list ending at ``stop``: (forward peak, bytes kept, backward peak).

        The rest of the list runs on top of the kept bytes, with the hold :attr:`hold_after`.
        """
        forward, kept, backward = self.run_events_bare(stage, hold, top)
        return forward + self.forward_extra(stop, top), kept, backward + self.backward_extra(top)

    def run_events_bare(self, stage: int, hold: int, top: bool) -> tuple[int, int, int]:
        """:meth:`run_events` without :meth:`forward_extra` and :meth:`backward_extra`."""
        kept = self.tape_bytes[stage] + self.kept_state_bytes[stage][hold]
        forward = self.state_bytes[stage] + (self.taped_peak if top else self.rerun_peak)[stage]
        # At the top level the last stage's output is the network output, already counted.
        held_output = 0 if top and stage + 1 == self.n else self.held_output_bytes[stage]
        backward = (kept + held_output + self.grad_bytes[stage + 1] + self.param_grad_live[stage + 1]
                    + self.backward_peak[stage])
        return forward, kept, backward

    def region_forward_peak(self, start: int, end: int, stop: int, top: bool) -> int:
        """The untaped forward of ``Region(start, end)`` heading a list ending at ``stop``."""
        return self.region_forward_peak_bare(start, end) + self.forward_extra(stop, top)

    def region_forward_peak_bare(self, start: int, end: int) -> int:
        """:meth:`region_forward_peak` without :meth:`forward_extra`."""
        inner = self._untaped_table.query(start + 1, end)
        return self.state_bytes[start] + max(self.untaped_peak[start], inner if inner is not None else 0)

    def forward_cost(self, start: int, end: int) -> float:
        return self.fwd_cost_prefix[end] - self.fwd_cost_prefix[start]


class _SparseMax:
    """Range maximum in O(1) after O(n log n) preprocessing."""

    def __init__(self, values: list[int]) -> None:
        self.levels = [list(values)]
        width = 1
        while 2 * width <= len(values):
            previous = self.levels[-1]
            self.levels.append([max(previous[i], previous[i + width]) for i in range(len(previous) - width)])
            width *= 2

    def query(self, start: int, end: int) -> int | None:
        """max(values[start:end]), or None if the range is empty."""
        if end <= start:
            return None
        level = (end - start).bit_length() - 1
        row = self.levels[level]
        return max(row[start], row[end - (1 << level)])


def predict_schedule(events: ChainEvents, ops: tuple[Op, ...], start: int = 0, stop: int | None = None,
                     hold: int = HOLD_NONE, top: bool = True) -> tuple[int, float]:
    """(peak bytes, compute cost) of ``ops`` over ``[start, stop)`` by the DP's event rules.

    With the defaults it predicts a whole schedule, and equals
    ``simulate_plan(chain, ops)``'s ``(peak_bytes, compute_cost)``; the chain DP's
    recurrence is this function with a choice at every operation.
    """
    stop = events.n if stop is None else stop
    peak, cost, offset, cursor = 0, 0.0, 0, start
    for op in ops:
        if isinstance(op, Run):
            forward, kept, backward = events.run_events(cursor, hold, stop, top)
            peak = max(peak, offset + forward, offset + backward)
            cost += events.step_cost[cursor]
            offset += kept
            hold = events.hold_after[cursor]
            cursor += 1
        else:
            body_peak, body_cost = predict_schedule(events, op.body, op.start, op.stop, HOLD_ALL, False)
            peak = max(peak, offset + events.region_forward_peak(cursor, op.stop, stop, top),
                       offset + events.backward_extra(top) + body_peak)
            cost += events.forward_cost(cursor, op.stop) + body_cost
            offset += events.state_bytes[cursor]
            hold = HOLD_NONE
            cursor = op.stop
    return max(peak, offset + events.end_peak(stop, top)), cost
