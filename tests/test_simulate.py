"""The schedule validator and the memory simulator, on hand-built unit chains.

Every expected number here is worked out by hand, in a comment, from the model in the
docstring of :mod:`planners.simulate`; a change to that model must change these numbers
on purpose.
"""

from __future__ import annotations

import re

import pytest

from planners import (Chain, PlanInvariantError, Region, Run, Schedule, Stage, count_regions, nesting_depth,
                      simulate_plan, validate_schedule)


# --------------------------------------------------------------------------- validate_schedule

@pytest.mark.parametrize("ops, num_stages, names", [
    # A stage skipped: after stage 0 the next must be 1.
    ((Run(0), Run(2)), 3, "operation 1: Run(stage=2)"),
    # A stage run twice.
    ((Run(0), Run(0), Run(1)), 2, "operation 1: Run(stage=0)"),
    # Stages out of order.
    ((Run(1), Run(0)), 2, "operation 0: Run(stage=1)"),
    # A region that does not start at the next stage.
    ((Run(0), Region(2, 3, (Run(2),))), 3, "operation 1: Region[2, 3)"),
    # A region that runs past the end of its enclosing range.
    ((Region(0, 4, (Run(0), Run(1), Run(2), Run(3))),), 3, "operation 0: Region[0, 4)"),
    # An empty region.
    ((Region(0, 2, ()), Run(2)), 3, "operation 0: Region[0, 2) has an empty body"),
    # A region whose body stops short of the region's end.
    ((Region(0, 3, (Run(0), Run(1))),), 3, "schedule > Region[0, 3): covers stages [0, 2)"),
    # A region whose body is itself out of order.
    ((Region(0, 2, (Run(1), Run(0))),), 2, "schedule > Region[0, 2), operation 0: Run(stage=1)"),
    # A broken region nested two deep is named by its full path.
    ((Region(0, 3, (Region(0, 2, (Run(0),)), Run(2))),), 3,
     "schedule > Region[0, 3) > Region[0, 2): covers stages [0, 1)"),
    # A zero-length region.
    ((Region(0, 0, (Run(0),)), Run(0)), 1, "operation 0: Region[0, 0)"),
    # Something that is not an operation.
    ((Run(0), "Run(1)"), 2, "operation 1: 'Run(1)' is not a Run, Region or Reconstruct"),
])
def test_validate_rejects_and_names_the_operation(ops, num_stages, names):
    with pytest.raises(PlanInvariantError, match=re.escape(names)):
        validate_schedule(ops, num_stages)
    # The simulator is the independent checker, so it refuses the same schedule.
    chain = Chain.uniform(num_stages)
    with pytest.raises(PlanInvariantError, match=re.escape(names)):
        simulate_plan(chain, ops)


@pytest.mark.parametrize("ops, num_stages", [
    ((), 2),                 # nothing at all
    ((Run(0),), 2),          # stops one stage early
    ((Run(0), Run(1)), 1),   # one stage too many
])
def test_validate_rejects_wrong_coverage_of_the_chain(ops, num_stages):
    with pytest.raises(PlanInvariantError, match=r"^schedule"):
        validate_schedule(ops, num_stages)


def test_validate_accepts_valid_nested_schedules():
    nested = (Run(0),
              Region(1, 5, (Region(1, 3, (Run(1), Region(2, 3, (Run(2),)))), Run(3), Run(4))),
              Region(5, 6, (Run(5),)),
              Run(6))
    validate_schedule(nested, 7)
    validate_schedule(Schedule(nested, planner="hand"), 7)
    validate_schedule(tuple(Run(i) for i in range(4)), 4)
    validate_schedule((Region(0, 4, tuple(Run(i) for i in range(4))),), 4)
    assert count_regions(nested) == 4
    assert nesting_depth(nested) == 3
    assert nesting_depth((Run(0),)) == 0


def test_plan_invariant_error_is_an_anode_plan_error():
    from planners import AnodePlanError
    with pytest.raises(AnodePlanError):
        validate_schedule((Run(1),), 2)


# --------------------------------------------------------------------------- simulate_plan

def three_stage_chain() -> Chain:
    """Three stages with different sizes, so every term of the model shows in the peak.

    Stage defaults: fwd_taped = output + tape, fwd_untaped = output, bwd = input,
    saves_input, not saves_output. Stage 1 owns parameter 0 (10 bytes of gradient).
    The head allows 2 * output = 12 bytes.
    """
    stages = (
        Stage("s0", input_bytes=4, output_bytes=3, tape_bytes=5, fwd_cost=1, bwd_cost=2),
        Stage("s1", input_bytes=3, output_bytes=2, tape_bytes=7, fwd_cost=2, bwd_cost=4, param_ids=(0,)),
        Stage("s2", input_bytes=2, output_bytes=6, tape_bytes=1, fwd_cost=3, bwd_cost=6),
    )
    return Chain(stages, param_grad_bytes=(10,), name="three")


def test_store_all_on_three_stages_matches_hand_count():
    # live after each step, with the peak of the step in brackets:
    #   x0 is the network input, charged 0 bytes.
    #   Run(0): [0 + 8]  -> x1 3 + tape0 5                        = 8
    #   Run(1): [8 + 9]  -> + x2 2 + tape1 7                      = 17
    #   Run(2): [17 + 7] -> + x3 6 + tape2 1                      = 24
    #   loss:   output gradient 6 -> 30, [30 + head 12 = 42]
    #   B(2):   [30 + 2] grad_in 2, free tape2, x2, grad 6        = 23
    #   B(1):   [23 + 3], free tape1 -> 16, grad_in 3, param grad 10 -> 29, free x1, grad 2 = 24
    #   B(0):   [24 + 4] grad_in 0 (input_grad=False), free tape0, grad 3 = 16 (x3 + param grad)
    # peak 42 at the loss: states 3+2+6, tapes 5+7+1, gradients 6, transient 12.
    chain = three_stage_chain()
    sim = simulate_plan(chain, tuple(Run(i) for i in range(3)), timeline=True)
    assert sim.peak_bytes == 42
    assert sim.breakdown() == {"states": 11, "tapes": 13, "gradients": 6, "parameter gradients": 0,
                               "transient": 12, "workspace": 0}
    assert sim.compute_cost == 1 + 2 + 3 + 2 + 4 + 6 == 18
    assert sim.baseline_cost == 18
    assert sim.recompute_overhead == 0.0
    assert sim.forward_counts == (1, 1, 1)
    assert sim.recomputed_forwards == 0
    assert [(e.phase, e.stage, e.live_bytes, e.peak_bytes) for e in sim.timeline] == [
        ("forward", 0, 8, 8), ("forward", 1, 17, 17), ("forward", 2, 24, 24), ("loss", 3, 30, 42),
        ("backward", 2, 23, 32), ("backward", 1, 24, 29), ("backward", 0, 16, 28)]
    assert simulate_plan(chain, tuple(Run(i) for i in range(3))).timeline == ()


def test_region_on_three_stages_matches_hand_count():
    # Region[0, 2) around stages 0 and 1, then Run(2):
    #   Region keeps x0 (0 bytes) and runs untaped:
    #     s0: [0 + 3] -> x1 3;   s1: [3 + 2] -> x2 2, x1 freed   = 2
    #   Run(2): [2 + 7] -> x3 6 + tape2 1 (holds x2)             = 9
    #   loss:   output gradient 6 -> 15, [15 + 12 = 27]
    #   B(2):   [15 + 2] grad_in 2, free tape2, x2, grad 6       = 8 (x3 6 + grad 2)
    #   recompute s0 taped: [8 + 8] -> x1 3 + tape0 5            = 16
    #   recompute s1 taped: [16 + 9] -> x2 2 + tape1 7           = 25; x2 dropped = 23
    #   B(1):   [23 + 3 = 26], free tape1 -> 16, grad_in 3, param grad 10 -> 29 (the peak), free x1, grad 2 = 24
    #   B(0):   [24 + 4] free tape0, grad 3                      = 16
    # peak 29: states x3 6 + x1 3, tapes 5, gradients 2 + 3, parameter gradients 10.
    chain = three_stage_chain()
    ops = (Region(0, 2, (Run(0), Run(1))), Run(2))
    sim = simulate_plan(chain, ops, timeline=True)
    assert sim.peak_bytes == 29
    assert sim.breakdown() == {"states": 9, "tapes": 5, "gradients": 5, "parameter gradients": 10,
                               "transient": 0, "workspace": 0}
    assert [(e.phase, e.stage, e.live_bytes, e.peak_bytes) for e in sim.timeline][-2:] == [
        ("backward", 1, 24, 29), ("backward", 0, 16, 28)]
    assert sim.forward_counts == (2, 2, 1)
    assert sim.recomputed_forwards == 2
    assert sim.compute_cost == 18 + 1 + 2
    assert sim.recompute_overhead == pytest.approx(3 / 18)


def test_input_grad_is_charged_when_asked_for():
    # With input_grad=True, B(0) allocates a 4-byte input gradient that stays to the end:
    # the last event's live memory is x3 6 + parameter gradient 10 + input gradient 4 = 20
    # instead of 16. B(0) peaks at 24 + bwd 4 = 28 either way, and the peak stays 42.
    chain = three_stage_chain()
    charged = Chain(chain.stages, param_grad_bytes=(10,), input_grad=True)
    ops = tuple(Run(i) for i in range(3))
    assert simulate_plan(charged, ops).peak_bytes == 42
    last = simulate_plan(charged, ops, timeline=True).timeline[-1]
    assert (last.phase, last.stage, last.live_bytes, last.peak_bytes) == ("backward", 0, 20, 28)


def test_anode_on_one_block_recomputes_every_step_once():
    n = 7
    chain = Chain.uniform(n)
    ops = (Region(0, n, tuple(Run(i) for i in range(n))),)
    sim = simulate_plan(chain, ops)
    assert sim.forward_counts == (2,) * n
    assert sim.recomputed_forwards == n
    # ANODE's cost, docs/algorithms.md §1: 2·Nt·f + Nt·g.
    assert sim.compute_cost == 2 * n * 1.0 + n * 1.0


def test_nested_regions_recompute_counts():
    # Region[0, 4) whose body checkpoints [0, 2) again:
    #   forward:  stages 0-3 untaped once                      -> 1 1 1 1
    #   backward of the outer region: body runs taped, its inner region untaped
    #             -> stages 0, 1 untaped, stages 2, 3 taped     -> 2 2 2 2
    #   backward of the inner region: stages 0, 1 taped again   -> 3 3 2 2
    #   then Run(4) is taped once.
    chain = Chain.uniform(5)
    ops = (Region(0, 4, (Region(0, 2, (Run(0), Run(1))), Run(2), Run(3))), Run(4))
    sim = simulate_plan(chain, ops)
    assert sim.forward_counts == (3, 3, 2, 2, 1)
    assert sim.recomputed_forwards == 6
    # Unit chain (state 1, tape 1, head 2; x0 is the network input and costs 0). After
    # B(4), x5 1 + grad 1 = 2 are live. Recomputing the outer body: the inner region
    # leaves x2 (x1 freed) -> 3; Run(2) taped adds x3 + tape2 -> 5; Run(3) taped peaks at
    # 5 + fwd_taped 2 = 7, above the loss (x4 + x5 + tape4 + grad 1 + head 2 = 6).
    assert sim.peak_bytes == 7
    assert sim.breakdown() == {"states": 3, "tapes": 1, "gradients": 1, "parameter gradients": 0,
                               "transient": 2, "workspace": 0}


def test_recompute_phase_is_labelled_in_the_timeline():
    chain = Chain.uniform(3)
    ops = (Region(0, 2, (Run(0), Run(1))), Run(2))
    phases = [(e.phase, e.stage) for e in simulate_plan(chain, ops, timeline=True).timeline]
    assert phases == [("forward", 0), ("forward", 1), ("forward", 2), ("loss", 3), ("backward", 2),
                      ("recompute", 0), ("recompute", 1), ("backward", 1), ("backward", 0)]


def test_saves_output_keeps_the_recomputed_output_alive_through_backward():
    # Two unit stages (state 1, tape 0), ops Region[0, 1) then Run(1); stage 0 saves its
    # output in one chain and not in the other. After B(1) the live memory is x2 1 + grad 1.
    # The region then recomputes x1 taped and drops its own reference to it:
    #   saves_output: the tape still holds x1, so B(0) peaks at 2 + x1 1 + bwd 1 = 4;
    #   plain:        x1 is freed at once,      so B(0) peaks at 2 + bwd 1     = 3.
    ops = (Region(0, 1, (Run(0),)), Run(1))
    keeps = Chain((Stage("a", 1, 1, 0, saves_output=True), Stage("b", 1, 1, 0)))
    plain = Chain((Stage("a", 1, 1, 0), Stage("b", 1, 1, 0)))

    def backward_of_stage0(chain):
        (event,) = [e for e in simulate_plan(chain, ops, timeline=True).timeline
                    if (e.phase, e.stage) == ("backward", 0)]
        return event.peak_bytes

    assert backward_of_stage0(keeps) == 4
    assert backward_of_stage0(plain) == 3
