"""Griewank's binomial checkpointing (revolve) for the time steps of an ODE block.

Use it when the block is too large to keep every step's tape: with ``s`` snapshot
slots it reverses ``n`` steps with the fewest untaped forward steps possible,

    t(n, s) = r·n − C(s+r, s+1),  where r = min{ r ≥ 0 : C(s+r, s) ≥ n },

and no step is run more than ``r + 1`` times. Reference: A. Griewank and A. Walther,
"Algorithm 799: revolve", ACM TOMS 26(1), 2000. The slot holding the block input
counts among the ``s``.

The schedule is the binary recursion t(n, s) = k + t(n−k, s−1) + t(k, s), with the
optimal split ``k`` read off the binomial numbers in O(1), written as nested
:class:`~planners.schedule.Region` operations: store ``x_k``, reverse the last
``n−k`` steps with ``s−1`` slots, then the first ``k`` steps with ``s``.

Background, papers and test values: ``docs/algorithms.md`` §2.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import comb

from planners.chain import Chain
from planners.errors import InfeasibleBudgetError
from planners.feasibility import fit_per_block, require_fit
from planners.schedule import Op, Region, Run, Schedule


def binomial_beta(snapshots: int, repetitions: int) -> int:
    """β(s, r) = C(s+r, s): the longest chain ``s`` slots reverse with ``r`` repetitions."""
    if repetitions < 0:
        return 0
    return comb(snapshots + repetitions, snapshots)


def repetition_number(steps: int, snapshots: int) -> int:
    """r(n, s): the least r with β(s, r) ≥ n; the most times any step is advanced."""
    _check(steps, snapshots)
    repetitions = 0
    while binomial_beta(snapshots, repetitions) < steps:
        repetitions += 1
    return repetitions


def optimal_advances(steps: int, snapshots: int) -> int:
    """t(n, s): the fewest untaped forward steps that reverse ``n`` steps with ``s`` slots."""
    _check(steps, snapshots)
    if steps == 1:
        return 0
    repetitions = repetition_number(steps, snapshots)
    return repetitions * steps - comb(snapshots + repetitions, snapshots + 1)


def optimal_split(steps: int, snapshots: int) -> int:
    """An optimal first checkpoint position k, 1 ≤ k < n, for t(n, s) = k + t(n−k, s−1) + t(k, s).

    Any k with β(s, r−2) ≤ k ≤ β(s, r−1) and β(s−1, r−1) ≤ n−k ≤ β(s−1, r) is optimal;
    this returns the largest.
    """
    _check(steps, snapshots)
    if steps < 2:
        raise ValueError(f"a split needs at least 2 steps, got {steps}")
    r = repetition_number(steps, snapshots)
    high = min(steps - 1, binomial_beta(snapshots, r - 1), steps - binomial_beta(snapshots - 1, r - 1))
    low = max(1, binomial_beta(snapshots, r - 2), steps - binomial_beta(snapshots - 1, r))
    if low > high:  # pragma: no cover - the binomial identities guarantee low <= high
        raise ArithmeticError(f"no optimal split for n={steps}, s={snapshots}")
    return high


def revolve_ops(start: int, stop: int, snapshots: int) -> tuple[Op, ...]:
    """The revolve schedule of stages ``[start, stop)`` with ``snapshots`` slots.

    Run at the top of a chain (taped context), it performs exactly
    ``optimal_advances(stop - start, snapshots)`` untaped forward steps.
    """
    steps = stop - start
    _check(steps, snapshots)
    ops: list[Op] = []
    # The right-hand part t(n-k, s-1) continues at this level, so iterate over it.
    while stop - start > 1:
        split = optimal_split(stop - start, snapshots)
        ops.append(Region(start, start + split, revolve_ops(start, start + split, snapshots)))
        start += split
        snapshots -= 1
    ops.append(Run(start))
    return tuple(ops)


def _check(steps: int, snapshots: int) -> None:
    if steps < 1:
        raise ValueError(f"revolve needs at least one step, got n={steps}")
    if snapshots < 1 and steps > 1:
        raise ValueError(f"revolve needs at least one snapshot slot (the input's) for n={steps} > 1 "
                         f"steps, got s={snapshots}")


MAX_REVOLVE_NESTING = 100
"""The deepest revolve tree planned: ``s`` slots for ``n`` steps nest ``r(n, s)`` regions
deep, and each level is a nested ``torch.utils.checkpoint`` call (and a level of Python
recursion in the simulator). One slot on 10,000 steps would nest 9,999 deep."""


def fewest_snapshots(steps: int) -> int:
    """The fewest slots whose revolve tree nests at most :data:`MAX_REVOLVE_NESTING` deep."""
    snapshots = 1
    while steps > 1 and binomial_beta(snapshots, MAX_REVOLVE_NESTING) < steps:
        snapshots += 1
    return snapshots


def useful_snapshots(steps: int) -> int:
    """The most slots that still help: with s = n−1 every state is kept and t = n−1."""
    return max(1, steps - 1)


def block_ops(chain: Chain, choose) -> tuple[Op, ...]:
    """Top-level ops: non-block stages taped, each block ``b`` replaced by ``choose(b)``."""
    ops: list[Op] = []
    stage = 0
    for index, block in enumerate(chain.blocks):
        ops.extend(Run(i) for i in range(stage, block.start))
        ops.extend(choose(index, block))
        stage = block.stop
    ops.extend(Run(i) for i in range(stage, len(chain.stages)))
    return tuple(ops)


@dataclass(frozen=True)
class Revolve:
    """Binomial checkpointing inside every ODE block; the other layers keep their tapes.

    Use it when even ANODE's one-block-of-tapes does not fit, or when a block's states
    are much smaller than its tapes (then many snapshots beat ANODE in memory *and*
    compute). ``snapshots`` is the number of slots per block, the block input's
    included; ``None`` picks the counts per block that fit the budget, spending memory
    where it saves the most compute (:func:`planners.feasibility.fit_per_block`). Counts
    are at least :func:`fewest_snapshots`, so trees nest at most 100 regions deep.
    """

    snapshots: int | None = None

    def plan(self, chain: Chain, *, budget_bytes: int) -> Schedule:
        if self.snapshots is not None:
            counts = [max(fewest_snapshots(b.nt), min(self.snapshots, useful_snapshots(b.nt))) for b in chain.blocks]
            ops = self._ops(chain, counts)
            require_fit(chain, ops, budget_bytes, "revolve")
        else:
            counts, ops = fit_per_block(chain, self._ops, [fewest_snapshots(b.nt) for b in chain.blocks],
                                        [useful_snapshots(b.nt) for b in chain.blocks], budget_bytes, "revolve")
        return Schedule(ops, planner="revolve", description=f"revolve, snapshots per block {counts}")

    @staticmethod
    def _ops(chain: Chain, counts: list[int]) -> tuple[Op, ...]:
        return block_ops(chain, lambda i, b: revolve_ops(b.start, b.stop, counts[i]))


__all__ = ["Revolve", "binomial_beta", "block_ops", "optimal_advances", "optimal_split",
           "repetition_number", "revolve_ops", "useful_snapshots", "fewest_snapshots", "MAX_REVOLVE_NESTING", "InfeasibleBudgetError"]
