"""An adaptive ODE block as one stage of the chain, and the checkpoints the plan leaves it.

An ``ODEBlock(f, method="dopri5")`` takes as many steps as its error control asks, known only
when it runs, so the cost model cannot run it on fake tensors (its loop reads values) and
the planners cannot count its steps. It is one stage of the chain, measured at its
minimum (:class:`AdaptiveProfile`): one checkpoint, the initial state's, with one step's
taped re-run and backward (:func:`anode_plan.adaptive.step_costs`, measured for real on
zeros of the state's shape, as the allocator counts it: memory does not depend on the
values). The planners never recompute it (its cost is set far above any stage's).

How the budget is shared (:func:`plan_sharing_adaptive`, :func:`adaptive_checkpoints`): the
rest of the network is planned under its minimum plus half of what the minimum leaves of
the budget, and the adaptive blocks share what that plan leaves, equally, as checkpoints
of ``(y, f)`` beyond the first. Each block then checkpoints online inside its share
(:mod:`planners.online`), so the step's peak stays within the budget whatever number of
steps the solves take; when even the minimum does not fit, the plan fails with
:class:`~anode_plan.InfeasibleBudgetError` as for any stage.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.utils._python_dispatch import _disable_current_modes

from anode_plan.memory import allocated_bytes
from planners import Chain, Schedule, Simulation, Stage
from planners.errors import InfeasibleBudgetError

NEVER_RECOMPUTED_COST = 1e9
"""An adaptive stage's nominal forward cost: high enough that no schedule recomputes it."""


class AdaptiveProfile:
    """What the cost model knows of an adaptive block's stage (the interface of its stage profiles)."""

    def __init__(self, spec: Any, fake_block: nn.Module, real_block: nn.Module, inputs: tuple,
                 param_index: dict[int, int]) -> None:
        from anode_plan.adaptive import TABLEAUS, _Problem, step_costs  # noqa: PLC0415 (adaptive imports runtime)

        z = inputs[0]
        parts = z if isinstance(z, tuple) else (z,)
        self.state_bytes = sum(allocated_bytes(p) for p in parts)
        needs_grad = any(p.requires_grad for p in parts) or any(p.requires_grad for p in fake_block.parameters())
        outputs = tuple(torch.empty_like(p).requires_grad_(needs_grad) for p in parts)
        self.outputs = (outputs if isinstance(z, tuple) else outputs[0],)
        self.param_ids = tuple(sorted(param_index[id(p)] for p in fake_block.parameters() if id(p) in param_index))
        with _disable_current_modes():  # real tensors, on the device, outside the fake mode and the tracker
            device = parts[0].device
            zeros = tuple(torch.zeros(p.shape, dtype=p.dtype, device=device) for p in parts)
            start = zeros if isinstance(z, tuple) else zeros[0]
            times = torch.tensor(real_block.t_span, dtype=torch.float64, device=device)
            problem = _Problem.make(real_block.func, start, times, real_block.rtol, real_block.atol,
                                    TABLEAUS[real_block.method], {}, None)
            self.costs = step_costs(problem, problem.flat_y0)
        params = sum(allocated_bytes(p) for p in real_block.parameters() if p.requires_grad)
        state = self.state_bytes
        # forward: the output buffer (t0 and t1), the initial derivative, the live state, a step's peak, the copy out
        self.fwd_bytes = 4 * state + self.costs.advance_bytes + state
        # backward: the output buffer's gradient (t0 and t1), a step's re-run and backward, the state's two
        # gradients, the input's, the parameters' running sum
        self.bwd_bytes = self.costs.vjp_bytes + 2 * state + 3 * state + params
        self.uses_rng = False

    def bwd_accumulating_bytes(self) -> int:
        return self.bwd_bytes

    def stage(self, spec: Any, values: Any, measured: Any = None, *, bwd_bytes: int | None = None,
              match: Any = None) -> Stage:
        return Stage(name=spec.name, input_bytes=values.state_bytes(spec.in_names),
                     output_bytes=values.state_bytes(spec.out_names), tape_bytes=self.state_bytes,
                     saves_input=True, saves_output=False, fwd_taped_bytes=self.fwd_bytes,
                     fwd_untaped_bytes=self.fwd_bytes, rerun_taped_bytes=self.fwd_bytes,
                     bwd_bytes=self.bwd_bytes if bwd_bytes is None else max(bwd_bytes, self.bwd_bytes),
                     fwd_cost=NEVER_RECOMPUTED_COST, bwd_cost=NEVER_RECOMPUTED_COST, param_ids=self.param_ids,
                     block=spec.block, step=spec.step)


def adaptive_stages(chain: Chain) -> tuple[int, ...]:
    """The stages of the chain that are adaptive blocks."""
    from anode_plan.ode import ADAPTIVE  # noqa: PLC0415

    return tuple(chain.blocks[s.block].start for s in chain.stages
                 if s.block is not None and chain.blocks[s.block].method in ADAPTIVE and s.step == 0)


def plan_sharing_adaptive(chain: Chain, usable: int, plan: Callable[[Chain, int], Schedule]) -> Schedule:
    """Plan the network under its minimum plus half of what that leaves, so the adaptive blocks get the rest."""
    if not adaptive_stages(chain):
        return plan(chain, usable)
    try:
        plan(chain, 0)
        minimum = 0
    except InfeasibleBudgetError as error:
        minimum = error.min_budget_bytes
    if usable < minimum:
        return plan(chain, usable)  # raises, with the minimum
    return plan(chain, minimum + (usable - minimum) // 2)


def adaptive_checkpoints(chain: Chain, simulation: Simulation, usable: int) -> tuple[tuple[str, int], ...]:
    """Per adaptive block (its qualified name), its checkpoints: one, plus an equal share of what the plan leaves."""
    stages = adaptive_stages(chain)
    if not stages:
        return ()
    share = max(0, usable - simulation.peak_bytes) // len(stages)
    return tuple((chain.blocks[chain.stages[i].block].name, 1 + share // (2 * chain.stages[i].input_bytes))
                 for i in stages)
