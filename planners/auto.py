"""The default planner: the right exact planner for the network's shape.

* A chain whose states carry no value from one stage to the next but one (a plain
  sequence of layers and ODE blocks) goes to :class:`~planners.ChainDP`, the optimal
  heterogeneous-chain dynamic program, when it has at most
  :data:`~planners.nested.DP_UNIT_LIMIT` units; a deeper one to
  :class:`~planners.Nested`, binomial checkpointing over its blocks, whose cost grows
  gently with depth (not proven optimal; the plan says so).
* A chain that carries skip values (a U-Net, a DenseNet: the graph is not a chain)
  goes to :class:`~planners.CPSat`, whose memory model counts each carried value once.
* Reversible ODE blocks (their steps offer a ``Reconstruction``) are reconstructed where
  that makes the schedule cheaper or lets it fit (:mod:`planners.reconstruct`): the
  planner above then plans the chain with those blocks collapsed.

On graphs the landmark schedules (:class:`~planners.Landmarks`) are planned too, and the
cheapest schedule the simulator finds within the budget wins: on a graph CP-SAT prices
region bodies pessimistically (:func:`planners.cpsat.separate_states`) and may stop at
its time limit, so a landmark can occasionally beat it. On chains
the DP already searches every landmark schedule (the flat DP exactly; the two-level DP
has store-all, ANODE and revolve among its options), so the landmarks are not planned
again. Which candidates run depends on the chain only, so the cost never rises when the
budget grows (each candidate's cost is monotone in the budget, and so is their minimum).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from planners.chain import Chain, carries_values
from planners.cpsat import CPSat
from planners.feasibility import cheapest_fitting
from planners.landmarks import Landmarks
from planners.nested import DP_UNIT_LIMIT, Nested
from planners.reconstruct import MAX_ERROR, plan_with_reconstruct, reconstructible_blocks
from planners.rotor import ChainDP, dp_cuts
from planners.schedule import Schedule


@dataclass(frozen=True)
class Auto:
    """ChainDP for chains, CP-SAT (and the landmarks) for graphs with skip connections."""

    chain_planner: ChainDP = field(default_factory=ChainDP)
    graph_planner: CPSat = field(default_factory=CPSat)

    #: The bound on the relative round-off of states rebuilt by reconstruction (see :mod:`planners.reconstruct`).
    reconstruct_max_error: float = MAX_ERROR

    def plan(self, chain: Chain, *, budget_bytes: int) -> Schedule:
        if reconstructible_blocks(chain):
            return plan_with_reconstruct(chain, budget_bytes, self._plan_without_reconstruct,
                                         max_error=self.reconstruct_max_error)
        return self._plan_without_reconstruct(chain, budget_bytes)

    def _plan_without_reconstruct(self, chain: Chain, budget_bytes: int) -> Schedule:
        if carries_values(chain):
            primary = self.graph_planner
        else:
            _, cuts = dp_cuts(chain, self.chain_planner.two_level, self.chain_planner.block_chunks)
            primary = self.chain_planner if len(cuts) - 1 <= DP_UNIT_LIMIT else Nested()
        candidates = [primary] + ([Landmarks()] if primary is self.graph_planner else [])
        return cheapest_fitting(chain, candidates, budget_bytes)
