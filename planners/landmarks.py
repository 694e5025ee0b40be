"""The landmark schedules: store-all and ANODE, and the chooser among all landmarks.

* :class:`StoreAll` — plain backprop, every tape kept: O(L·Nt) memory, no recompute.
* :class:`Anode` — each ODE block keeps only its input in forward and is re-run with
  tapes in backward (Gholami, Keutzer and Biros, "ANODE", IJCAI 2019,
  arXiv 1902.10298): O(L + Nt) memory, one extra forward of every block. With
  ``snapshots`` set, the re-run itself uses revolve, the paper's fewer-checkpoint
  variant.
* :class:`Landmarks` — the cheapest of the above and of :class:`~planners.Revolve`
  that fits the budget.

Background, papers and test values: ``docs/algorithms.md`` §1 and §2.
"""

from __future__ import annotations

from dataclasses import dataclass

from planners.chain import Chain
from planners.feasibility import cheapest_fitting, fit_per_block, require_fit
from planners.revolve import Revolve, block_ops, fewest_snapshots, revolve_ops, useful_snapshots
from planners.schedule import Op, Region, Run, Schedule


@dataclass(frozen=True)
class StoreAll:
    """Keep every stage's tape: the fastest schedule, and the one that needs the most memory."""

    def plan(self, chain: Chain, *, budget_bytes: int) -> Schedule:
        ops = tuple(Run(i) for i in range(len(chain.stages)))
        require_fit(chain, ops, budget_bytes, "store-all")
        return Schedule(ops, planner="store-all", description="store every tape")


@dataclass(frozen=True)
class Anode:
    """ANODE: checkpoint each ODE block's input and recompute the block in backward.

    ``snapshots=None`` recomputes every block with all its tapes (the paper's scheme);
    an integer uses revolve with that many slots inside each block's recompute, and
    ``"auto"`` picks the counts per block (see :func:`planners.feasibility.fit_per_block`).
    """

    snapshots: int | str | None = None

    def plan(self, chain: Chain, *, budget_bytes: int) -> Schedule:
        if self.snapshots == "auto":
            counts, ops = fit_per_block(chain, self._ops, [fewest_snapshots(b.nt) for b in chain.blocks],
                                        [useful_snapshots(b.nt) for b in chain.blocks],
                                        budget_bytes, "ANODE+revolve")
            return Schedule(ops, planner="anode", description=f"ANODE, revolve inside blocks with snapshots {counts}")
        counts = None if self.snapshots is None else [int(self.snapshots)] * len(chain.blocks)
        ops = self._ops(chain, counts)
        require_fit(chain, ops, budget_bytes, "ANODE")
        what = "ANODE, recompute each block with its tapes" if counts is None else \
            f"ANODE, revolve inside blocks with snapshots {counts}"
        return Schedule(ops, planner="anode", description=what)

    @staticmethod
    def _ops(chain: Chain, counts: list[int] | None) -> tuple[Op, ...]:
        def choose(index, block):
            if counts is None:
                body = tuple(Run(i) for i in range(block.start, block.stop))
            else:
                slots = max(fewest_snapshots(block.nt), min(counts[index], useful_snapshots(block.nt)))
                body = revolve_ops(block.start, block.stop, slots)
            return (Region(block.start, block.stop, body),)
        return block_ops(chain, choose)


@dataclass(frozen=True)
class Landmarks:
    """The cheapest landmark schedule that fits: store-all, ANODE, revolve, ANODE+revolve.

    The foundation's chooser. Ties in cost go to the smaller peak. It is optimal only
    among these families; :class:`~planners.ChainDP` searches all schedules.
    """

    def plan(self, chain: Chain, *, budget_bytes: int) -> Schedule:
        candidates = (StoreAll(), Anode(), Revolve(), Anode(snapshots="auto"))
        schedule = cheapest_fitting(chain, candidates, budget_bytes)
        return Schedule(schedule.ops, planner=f"landmarks:{schedule.planner}", description=schedule.description)
