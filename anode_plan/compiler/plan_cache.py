"""Which plan a call runs: the plans of one compiled model, found by key and batch size.

A plan's memory promise holds for the inputs it was measured on and for any smaller
batch, under the same :class:`~anode_plan.plan_key.PlanKey` (shapes but the batch,
dtypes, devices, modes, frozen parameters, autocast, the settings that choose kernels).
:class:`~anode_plan.CompiledModel` runs the cached plan with the same key and the
smallest batch that covers the call, and otherwise measures and plans again (about as
long as ``compile`` took). A plan that cannot fit raises
:class:`~anode_plan.InfeasibleBudgetError` instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from anode_plan.plan_key import PlanKey


@dataclass(frozen=True)
class CachedPlan:
    """A plan, the key, batch sizes and input ``requires_grad`` flags it was made for, and the runner that
    executes it."""

    key: PlanKey
    batches: tuple[int | None, ...]
    plan: Any
    runner: Any
    input_grads: tuple[bool, ...] = ()


def covers(planned: Sequence[int | None], batches: Sequence[int | None]) -> bool:
    """Whether a plan for batch sizes ``planned`` keeps its promise for ``batches``."""
    return all(b is None or b <= p for b, p in zip(batches, planned))


class PlanCache:
    """The plans of one compiled model, most recent last; at most :attr:`MAX_PLANS` are kept."""

    MAX_PLANS = 8

    def __init__(self) -> None:
        self.entries: list[CachedPlan] = []

    def find(self, key: PlanKey, batches: tuple, input_grads: Sequence[bool], *,
             exact: bool = False) -> CachedPlan | None:
        """The plan for ``key`` with the smallest batch that covers ``batches``, or ``None``.

        A plan made for inputs that require a gradient (it charges their gradients) also
        covers a call whose inputs do not; not the other way round. ``exact``: only a plan
        for these very batch sizes and input flags (compiled stages, ``backend="inductor"``,
        run code compiled and measured for one shape: another would compile unmeasured code).
        """
        if exact:
            return next((entry for entry in reversed(self.entries) if entry.key == key and entry.batches == batches
                         and tuple(entry.input_grads) == tuple(input_grads)), None)
        fits = [entry for entry in self.entries if entry.key == key and covers(entry.batches, batches)
                and all(planned or not needed for planned, needed in zip(entry.input_grads, input_grads))]
        return min(fits, key=lambda e: sum(b or 0 for b in e.batches), default=None)

    def add(self, entry: CachedPlan) -> CachedPlan:
        self.entries.append(entry)
        del self.entries[:-self.MAX_PLANS]
        return entry
