"""Online checkpointing: which states to keep when the number of steps is known only at the end.

An adaptive ODE solver accepts steps one at a time and learns how many it took only
when it reaches the end of the interval, so the offline schedules (revolve, the chain DP)
cannot place its checkpoints. :class:`OnlineCheckpointing` decides at every accepted step,
from the step's index alone, whether to keep the state there and in which of ``slots``
slots (slot 0 holds the initial state, which the backward needs anyway):

* while the step count stays below ``u₂ − 1 = (c+1)(c+2)/2 − 1`` (``c`` slots), Algorithm 1
  of Stumm and Walther ("New algorithms for optimal online checkpointing", SIAM J. Sci.
  Comput. 32(2), 2010). Up to that count it matches the offline binomial optimum: every
  step is recomputed at most once, ``max(0, n − c)`` recomputed steps in all;
* from there on, the level-based dynamic scheme of Wang, Moin and Iaccarino ("Minimal
  repetition dynamic checkpointing algorithm for unsteady adjoint calculation", SIAM J.
  Sci. Comput. 31(4), 2009): the newest dispensable checkpoint is replaced at level 0, or,
  when none is dispensable, the newest one at one level up, which makes every checkpoint
  of a lower level dispensable.

The slot bookkeeping follows equinox's implementation of the two
(``equinox.internal.checkpointed_while_loop``), so its published backward orders are this
module's test values. The backward (:func:`reverse_actions`) knows the step count, so it
reverses each gap between kept states offline: linearly (keep every state) when the
free slots allow it, otherwise at revolve's optimal split (:func:`planners.revolve.optimal_split`),
which never advances more than equinox's midpoint rule.

Pure Python, deterministic; used by :func:`anode_plan.odeint`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable

from planners.revolve import optimal_split

NEVER = 2**62
"""The step of an empty slot."""


@dataclass(frozen=True)
class OnlineState:
    """The checkpointer's state after some steps: which step each slot holds, and each algorithm's counters."""

    slot_steps: tuple[int, ...]
    sw: tuple[int, int, int, bool]  # Stumm–Walther's (i, o, p, s)
    levels: tuple[int, ...]  # Wang–Moin's level per slot
    dispensable: tuple[bool, ...]

    @property
    def kept(self) -> tuple[int, ...]:
        """The kept steps, in order."""
        return tuple(sorted(step for step in self.slot_steps if step != NEVER))


@dataclass(frozen=True)
class Decision:
    """Whether to keep the state at a step, and in which slot (evicting what it held)."""

    keep: bool
    slot: int


@dataclass(frozen=True)
class OnlineCheckpointing:
    """Online placement of ``slots`` checkpoints (the initial state's among them); see the module docstring."""

    slots: int

    def __post_init__(self) -> None:
        if isinstance(self.slots, bool) or not isinstance(self.slots, int) or self.slots < 1:
            raise ValueError(f"OnlineCheckpointing(slots={self.slots!r}): needs at least one slot, for the "
                             "initial state")

    @property
    def optimal_up_to(self) -> int:
        """The step count up to which the placement matches the offline optimum: ``(c+1)(c+2)/2 − 1``."""
        return (self.slots + 1) * (self.slots + 2) // 2 - 1

    def start(self) -> OnlineState:
        c = self.slots
        return OnlineState(slot_steps=(NEVER,) * c, sw=(0, c, c, True), levels=(NEVER,) + (0,) * (c - 1),
                           dispensable=(False,) * c)

    def decide(self, state: OnlineState, step: int) -> tuple[Decision, OnlineState]:
        """Before step ``step`` (0, 1, ...) is taken from the state there: keep that state, and where."""
        if step < self.optimal_up_to:
            decision, sw = _stumm_walther(state.sw, step)
            state = replace(state, sw=sw)
        else:
            decision, state = _wang_moin(state)
        if decision.keep:
            steps = list(state.slot_steps)
            steps[decision.slot] = step
            state = replace(state, slot_steps=tuple(steps))
        return decision, state

    def plan(self, num_steps: int) -> tuple[int, ...]:
        """The steps kept after ``num_steps`` steps (what the forward leaves for the backward)."""
        state = self.start()
        for step in range(num_steps):
            _, state = self.decide(state, step)
        return state.kept


def _stumm_walther(sw: tuple[int, int, int, bool], step: int) -> tuple[Decision, tuple[int, int, int, bool]]:
    """Algorithm 1 of Stumm and Walther (2010), as equinox counts it."""
    i, o, p, s = sw
    decision = Decision(s, i)
    if s:
        i += 1
        if i > o:
            i = 1
    if step + 1 == p:
        s = False
    if step == p:
        p, o = p + o, o - 1
        i, s = o, o > 0
    return decision, (i, o, p, s)


def _wang_moin(state: OnlineState) -> tuple[Decision, OnlineState]:
    """One decision of Wang, Moin and Iaccarino's level-based scheme (Algorithms 1 and 3, 2009)."""
    if len(state.slot_steps) == 1:  # only the initial state's slot: keep nothing more
        return Decision(False, 0), state
    steps, levels, dispensable = state.slot_steps, list(state.levels), list(state.dispensable)
    if any(dispensable):
        slot = max(range(len(steps)), key=lambda i: (steps[i] if dispensable[i] else 0, -i))
        level = 0
        dispensable[slot] = False
    else:
        slot = max(range(len(steps)), key=lambda i: (steps[i], -i))  # an empty slot first, then the newest
        level = levels[slot] + 1
        dispensable = [d or levels[i] < levels[slot] for i, d in enumerate(dispensable)]
    levels[slot] = level
    return Decision(True, slot), replace(state, levels=tuple(levels), dispensable=tuple(dispensable))


@dataclass(frozen=True)
class Action:
    """One evaluation of a step in the backward: ``"advance"`` (untaped, to reach a later state; ``keep``:
    the state it makes goes into a free slot) or ``"vjp"`` (taped from the state there, and differentiated)."""

    kind: str
    step: int
    keep: bool = False


def reverse_actions(kept: Iterable[int], num_steps: int, slots: int) -> tuple[Action, ...]:
    """The backward's evaluations, given the kept steps (0 among them) of ``num_steps`` steps and ``slots`` slots.

    The gaps between kept states are reversed last first; within one, every state is kept
    while the free slots allow it (each step recomputed once), else the gap splits at
    revolve's optimal point.
    """
    kept = sorted(set(kept))
    if not kept or kept[0] != 0:
        raise ValueError(f"the kept steps {kept} must include step 0 (the initial state)")
    if len(kept) > slots or kept[-1] >= num_steps:
        raise ValueError(f"{len(kept)} kept steps {kept} do not fit {slots} slots of {num_steps} steps")
    actions: list[Action] = []
    bounds = kept + [num_steps]
    for index in range(len(kept) - 1, -1, -1):
        _reverse(bounds[index], bounds[index + 1], slots - (index + 1), actions)
    return tuple(actions)


def _reverse(start: int, stop: int, free: int, actions: list[Action]) -> None:
    """Reverse the steps ``[start, stop)`` from the kept state ``start``, with ``free`` more slots.

    Each gap splits at ``split``: advance to it, reverse ``[split, stop)`` (keeping the state
    at ``split`` in a slot unless it is the last step), then ``[start, split)``. An explicit
    stack, not recursion: a gap may be thousands of steps long.
    """
    pending = [(start, stop, free)]
    while pending:
        start, stop, free = pending.pop()
        length = stop - start
        if length == 1:
            actions.append(Action("vjp", start))
            continue
        split = start + (1 if free >= length - 2 else optimal_split(length, free + 1))
        held = stop - split > 1  # the state at split is kept in a slot, else it is only the live state
        actions.extend(Action("advance", step, keep=held and step == split - 1) for step in range(start, split))
        pending.append((start, split, free))  # second
        pending.append((split, stop, free - 1 if held else free))  # first


def recomputed_steps(actions: Iterable[Action]) -> int:
    """How many untaped step evaluations a backward makes."""
    return sum(1 for action in actions if action.kind == "advance")
