"""The two-level chain DP for ODE networks (docs/algorithms.md §3, "Two levels").

The flat DP over all ``Σ Nt`` time steps costs O(n³) frontier merges: a second at
n ≈ 30, hours at n = 10,000. The two-level DP runs the same recurrence over
*macro-stages*: every stage outside the ODE blocks, and the units of every block (the
whole block with ``block_chunks = 1``, the form of docs/algorithms.md §3; else its last step alone
and near-equal chunks of the rest, so that regions may also start inside a block).
Regions start and end only between units. A unit of block steps offers, besides the
recurrence's two options (keep all its tapes: option 2 over each step; a region around
it or around a run of units: option 1, an untaped advance costing ``Σ f``):

* as the base case, when the list's remaining steps lie in one block: binomial
  checkpointing over them with ``s`` snapshot slots — the schedule
  :func:`planners.revolve_ops`, ``(t(n, s) + n)·f + n·g`` of compute for ``n`` steps
  (Griewank and Walther, "Algorithm 799: revolve", ACM TOMS 26(1), 2000);
* anywhere in a list: a region every ``n / m`` steps, each recomputed with all its
  tapes (``checkpoint_sequential``'s pattern, one extra forward of each step).

:class:`BlockOptions` prices each of those exactly in its context, by the event rules
of :mod:`planners.rotor_events` walked along the schedule, sharing the sub-lists of a
block of identical steps. The schedule is executable as it stands: the DP's own ops,
with :func:`planners.revolve_ops` for the revolve trees.

Conventions that bound the work:

* Blocks are cut so the DP sees about :data:`TARGET_MACRO_STAGES` macro-stages.
* Only ``s`` whose revolve tree nests at most :data:`MAX_REVOLVE_NESTING` regions deep
  are offered (``r(n, s)`` ≤ that; ``s = 1`` on 10,000 steps would nest 9,999 deep,
  past Python's stack in the simulator and in nested ``torch.utils.checkpoint``).
* At most :data:`REVOLVE_CANDIDATES` values of ``s`` (all of them when there are fewer,
  else the smallest half densely and a geometric grid up to ``n - 1``), and at most
  :data:`SEGMENT_CANDIDATES` values of ``m``, are tried per unit.
"""

from __future__ import annotations

from math import comb

from planners.chain import Chain
from planners.revolve import MAX_REVOLVE_NESTING, optimal_split
from planners.rotor_events import HOLD_ALL, HOLD_NONE, ChainEvents
from planners.rotor_frontier import Point

TARGET_MACRO_STAGES = 24
REVOLVE_CANDIDATES = 64
SEGMENT_CANDIDATES = 32


def macro_cuts(chain: Chain, block_chunks: int) -> list[int]:
    """Positions that bound macro-stages: around every stage outside the ODE blocks, and
    between the ``block_chunks`` units of every block.

    With ``block_chunks = 1`` a block is one unit. With ``k ≥ 2`` its last step is a unit of
    its own (a region around just that step keeps every tape out of the loss's peak), and
    the other steps form ``k - 1`` near-equal chunks.
    """
    inside = {k for block in chain.blocks for k in range(block.start + 1, block.stop)}
    cuts = {k for k in range(len(chain.stages) + 1) if k not in inside}
    for block in chain.blocks:
        chunks = min(block_chunks, block.nt)
        if chunks >= 2:
            cuts.add(block.stop - 1)
            cuts.update(block.start + (index * (block.nt - 1)) // (chunks - 1) for index in range(chunks - 1))
    return sorted(cuts)


def auto_block_chunks(chain: Chain) -> int:
    """Units per block so that the DP runs over about :data:`TARGET_MACRO_STAGES` macro-stages."""
    if not chain.blocks:
        return 1
    plain = len(chain.stages) - sum(block.nt for block in chain.blocks)
    return max(1, (TARGET_MACRO_STAGES - plain) // len(chain.blocks))


def snapshot_candidates(steps: int, most: int) -> list[int]:
    """The snapshot counts tried for a revolve base case over ``steps`` steps, increasing."""
    if steps < 2:
        return []
    smallest = 1
    while comb(smallest + MAX_REVOLVE_NESTING, smallest) < steps:  # β(s, R) ≥ n  ⇔  r(n, s) ≤ R
        smallest += 1
    largest = steps - 1  # with n - 1 slots every state is kept
    if largest - smallest + 1 <= most:
        return list(range(smallest, largest + 1))
    dense = max(1, most // 2)
    values = set(range(smallest, smallest + dense))
    low, count = smallest + dense, most - dense
    ratio = (largest / low) ** (1.0 / max(1, count - 1))
    for index in range(count):
        values.add(min(largest, int(round(low * ratio ** index))))
    values.add(largest)
    return sorted(values)


def segment_counts(steps: int) -> list[int]:
    """How many segments :meth:`BlockOptions.segmentations` tries for ``steps`` steps."""
    if steps <= SEGMENT_CANDIDATES:
        return list(range(2, steps + 1))
    ratio = (steps / 2) ** (1.0 / (SEGMENT_CANDIDATES - 1))
    return sorted({min(steps, int(round(2 * ratio ** index))) for index in range(SEGMENT_CANDIDATES)})


class BlockOptions:
    """The options of the two-level DP inside ODE blocks, priced in the context of a list.

    A list is ``[start, stop)`` with its ``hold`` and ``top`` flags (see
    :mod:`planners.rotor_events`); every method answers ``[]`` unless the steps it is
    asked about lie inside one ODE block and number at least two.
    """

    def __init__(self, chain: Chain, events: ChainEvents, memory_slots: int) -> None:
        self.chain = chain
        self.events = events
        self.memory_slots = memory_slots
        self._uniform = [self._is_uniform(index) for index in range(len(chain.blocks))]
        self._block_at = {k: index for index, block in enumerate(chain.blocks) for k in range(block.start, block.stop)}
        self._trees: dict[tuple, tuple[int, float]] = {}
        self._segmentations: dict[tuple[int, int], list[tuple[int, int, int, int, float]]] = {}
        self._inline: dict[tuple[int, int, bool], list[tuple]] = {}

    def revolve_points(self, start: int, stop: int, hold: int, top: bool, budget: float) -> list[Point]:
        """Frontier points ``(peak, cost, ("revolve", s))`` of ``revolve_ops(start, stop, s)`` as the list."""
        block_index = self._block_at.get(start)
        if block_index is None or stop > self.chain.blocks[block_index].stop or stop - start < 2:
            return []
        points: list[Point] = []
        for snapshots in snapshot_candidates(stop - start, min(self.memory_slots, REVOLVE_CANDIDATES)):
            # Peaks usually grow with s, but not always (a large untaped transient deep in
            # the recursion can outweigh a snapshot), so every candidate is evaluated.
            peak, cost = self.tree(start, stop, snapshots, hold, top)
            if peak <= budget:
                points.append((peak, cost, ("revolve", snapshots)))
        return points

    def segmentations(self, start: int, end: int, stop: int, top: bool) -> list[tuple[int, int, int, float]]:
        """Checkpoint every few steps of ``[start, end)``, heading a list that ends at ``stop``.

        The operations are ``Region(a_i, a_{i+1})`` for ``m`` near-equal segments, each
        recomputed with all its tapes: one extra forward of every step, and ``m``
        snapshots held while the rest of the list runs. Returns, for each ``m`` tried,
        ``(m, peak of these operations, bytes they hold for the rest, cost)``.
        """
        block_index = self._block_at.get(start)
        if block_index is None or end > self.chain.blocks[block_index].stop or end - start < 2:
            return []
        bare = self._segmentations.get((start, end))
        if bare is None:
            bare = self._segmentations[(start, end)] = self._segmentations_bare(start, end)
        forward_extra, backward_extra = self.events.forward_extra(stop, top), self.events.backward_extra(top)
        return [(count, max(forward + forward_extra, backward + backward_extra), held, cost)
                for count, forward, backward, held, cost in bare]

    def _segmentations_bare(self, start: int, end: int) -> list[tuple[int, int, int, int, float]]:
        events = self.events
        steps = end - start
        out = []
        for count in segment_counts(steps):
            bounds = [start + (index * steps) // count for index in range(count + 1)]
            forward = backward = held = 0
            cost = events.forward_cost(start, end)
            for a, b in zip(bounds, bounds[1:]):
                body_peak, body_cost = self._taped_body(a, b)
                forward = max(forward, held + events.region_forward_peak_bare(a, b))
                backward = max(backward, held + body_peak)
                cost += body_cost
                held += events.state_bytes[a]
            out.append((count, forward, backward, held, cost))
        return out

    def inline_revolves(self, start: int, end: int, stop: int, top: bool) -> list[tuple[int, int, int, int, float]]:
        """``revolve_ops(start, end, s)`` heading a list that ends at ``stop``, and more after it.

        :class:`~planners.Revolve`'s schedule of a block that is not the last of its
        list. Returns, for each ``s`` tried, ``(s, peak of these operations, bytes they
        hold for the rest, hold flag of the rest, cost)``.
        """
        block_index = self._block_at.get(start)
        if block_index is None or end > self.chain.blocks[block_index].stop or end - start < 2:
            return []
        # ``top``: its last Run is a first run (not a re-run), and the network output if end == n.
        bare = self._inline.get((start, end, top))
        if bare is None:
            bare = self._inline[(start, end, top)] = self._inline_revolves_bare(start, end, top)
        forward_extra, backward_extra = self.events.forward_extra(stop, top), self.events.backward_extra(top)
        return [(snapshots, max(forward + forward_extra, backward + backward_extra), held, hold_out, cost)
                for snapshots, forward, backward, held, hold_out, cost in bare]

    def _inline_revolves_bare(self, start: int, end: int, top: bool) -> list[tuple]:
        events = self.events
        out = []
        for snapshots in snapshot_candidates(end - start, min(self.memory_slots, REVOLVE_CANDIDATES)):
            forward = backward = held = 0
            cost = 0.0
            cursor, slots = start, snapshots
            while end - cursor > 1:
                split_end = cursor + optimal_split(end - cursor, slots)
                body_peak, body_cost = self.tree(cursor, split_end, slots, HOLD_ALL, False)
                forward = max(forward, held + events.region_forward_peak_bare(cursor, split_end))
                backward = max(backward, held + body_peak)
                cost += events.forward_cost(cursor, split_end) + body_cost
                held += events.state_bytes[cursor]
                cursor, slots = split_end, slots - 1
            run_forward, run_kept, run_backward = events.run_events_bare(cursor, HOLD_NONE, top)
            out.append((snapshots, max(forward, held + run_forward), max(backward, held + run_backward),
                        held + run_kept, events.hold_after[cursor], cost + events.step_cost[cursor]))
        return out

    def _taped_body(self, start: int, stop: int) -> tuple[int, float]:
        """(peak, cost) of a recomputed body that runs every stage of ``[start, stop)`` with its tape."""
        key = ("taped",) + self._key(start, stop, 0, HOLD_ALL, False)
        found = self._trees.get(key)
        if found is None:
            events = self.events
            peak, kept, hold, cost = 0, 0, HOLD_ALL, 0.0
            for stage in range(start, stop):
                forward, stage_kept, backward = events.run_events(stage, hold, stop, False)
                peak = max(peak, kept + forward, kept + backward)
                kept += stage_kept
                hold = events.hold_after[stage]
                cost += events.step_cost[stage]
            found = (max(peak, kept + events.end_peak(stop, False)), cost)
            self._trees[key] = found
        return found

    def tree(self, start: int, stop: int, snapshots: int, hold: int, top: bool) -> tuple[int, float]:
        """(peak, cost) of ``revolve_ops(start, stop, snapshots)`` as the list ``[start, stop)``.

        Mirrors :func:`planners.revolve_ops`: the list is ``Region(start, start + k)``
        (body: revolve over those ``k`` steps, same slots), then the revolve list of the
        remaining steps with one slot fewer, down to one taped ``Run``. Every list on
        that spine, and every body, is memoised.
        """
        events = self.events
        spine = []
        cursor, slots = start, snapshots
        while True:
            key = self._key(cursor, stop, slots, hold, top)
            found = self._trees.get(key)
            if found is not None:
                break
            if stop - cursor == 1:
                forward, kept, backward = events.run_events(cursor, hold, stop, top)
                found = (max(forward, backward, kept + events.end_peak(stop, top)), events.step_cost[cursor])
                self._trees[key] = found
                break
            end = cursor + optimal_split(stop - cursor, slots)
            spine.append((cursor, end, slots, key))
            cursor, slots, hold = end, slots - 1, HOLD_NONE
        peak, cost = found
        for cursor, end, slots, key in reversed(spine):
            body_peak, body_cost = self.tree(cursor, end, slots, HOLD_ALL, False)
            peak = max(events.region_forward_peak(cursor, end, stop, top), events.state_bytes[cursor] + peak,
                       events.backward_extra(top) + body_peak)
            cost += events.forward_cost(cursor, end) + body_cost
            self._trees[key] = (peak, cost)
        return peak, cost

    def _key(self, start: int, stop: int, snapshots: int, hold: int, top: bool) -> tuple:
        # With s >= n - 1 slots revolve keeps every state, whatever s is.
        snapshots = min(snapshots, stop - start - 1)
        block_index = self._block_at[start]
        if not self._uniform[block_index]:
            return start, stop, snapshots, hold, top
        # In a block of identical steps whose parameter gradients are all made by its
        # last step's backward, a list's events depend only on its length, its hold, how
        # it ends (strictly inside the block, at the block's end, or at the loss), and
        # whether it starts at x_0 (which costs nothing) or at the block's input, so
        # lists are shared.
        block = self.chain.blocks[block_index]
        ending = "top" if top else "block end" if stop == block.stop else "inside"
        # What the stage before the block saved of its output is not what a step saves.
        return block_index, stop - start, snapshots, hold, ending, start == 0, start == block.start

    def _is_uniform(self, block_index: int) -> bool:
        """Whether the steps strictly inside the block are alike, so :meth:`_key` may share lists.

        The first step heads only lists that start at the block's input and the last
        step ends only lists that end at the block's end; the key tells those apart.
        """
        block = self.chain.blocks[block_index]
        inside = range(block.start + 1, block.stop - 1)
        signatures = {self.events.stage_signature(stage) for stage in inside}
        # Their parameter gradients must all come from the last step's backward (or
        # earlier ones), so that what is live at every inner position is the same.
        return len(signatures) <= 1 and not any(self.events.new_param_grad_bytes[stage] for stage in inside)


__all__ = ["BlockOptions", "MAX_REVOLVE_NESTING", "auto_block_chunks", "macro_cuts", "segment_counts",
           "snapshot_candidates"]
