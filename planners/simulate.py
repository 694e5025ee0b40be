"""Simulate a schedule: its peak memory, its compute cost, and a memory timeline.

This is the memory model every planner is judged against, and the independent
checker of their results. It mirrors what nested non-reentrant
``torch.utils.checkpoint`` regions do in PyTorch, buffer by buffer, with reference
counts. A state is a set of *values* (tensor storages, :attr:`Chain.state_values`): a
value carried unchanged through a stage (a skip connection) is one buffer, referenced
by every state that carries it.

* A taped ``Run(i)`` allocates, at its peak, ``fwd_taped_bytes`` on top of what is
  live (``rerun_taped_bytes`` when it is re-run in backward), and leaves its output
  ``x_{i+1}`` and its tape. The tape holds ``x_i`` if ``saves_input`` and ``x_{i+1}`` if
  ``saves_output``.
* A ``Region`` in a taped context keeps its input (``_NoopSaveInputs`` saves it) and
  runs its body untaped: each stage peaks at ``fwd_untaped_bytes`` and leaves only its
  output. Intermediate states die as soon as the next stage has consumed them.
* In backward, a ``Region`` is recomputed when backward reaches it: its body runs
  again taped, from the saved input (the "recompute" phase), the recomputed output is
  dropped unless a tape saved it, and the body is backpropagated in reverse.
* The backward of ``Run(i)`` peaks at ``bwd_bytes`` on top of what is live (the
  gradients it makes included), frees the tape, leaves the gradients of the values it
  consumed and of parameters it touched for the first time (those stay to the end), and
  frees the gradients of the values the stage created.
* A ``Reconstruct`` runs its stages untaped, like a region's body, and keeps its output
  ``x_stop`` (saved for its backward) until that backward ends. In backward, for each
  stage from the last, one walk step (inverse, taped re-run, products) peaks at
  ``reconstruct.step_bytes`` on top of what is live and leaves the rebuilt ``x_i`` (the
  state after it is freed, but for ``x_stop``) and the gradients of what the stage
  consumed, freeing those of what it created (but for the gradient of ``x_stop``, which
  backward handed the op: it lives until the op returns; at a block's end, only the
  solution's, ``reconstruct.solution_bytes``).
* The network input is not charged (the budget excludes the batch); the output stays
  live through backward (the caller holds it), and the loss after the network peaks at
  ``Chain.head_bytes`` on top of everything, then leaves the output gradient.

The peak is the budget the schedule needs: the most memory a training step allocates
on top of what was allocated when its forward started.

Background, papers and test values: ``docs/algorithms.md`` §3 and §6.
"""

from __future__ import annotations

from dataclasses import dataclass

from planners.chain import Chain
from planners.errors import PlanInvariantError
from planners.schedule import Op, Reconstruct, Region, Run, Schedule, validate_schedule

KINDS = ("states", "tapes", "gradients", "parameter gradients")


@dataclass(frozen=True)
class TimelineEvent:
    """One operation of a simulated training step.

    ``phase`` is ``"forward"``, ``"recompute"``, ``"reconstruct"`` (a step rebuilt and
    differentiated),
    ``"backward"`` or ``"loss"``;
    ``live_bytes`` is what is live after the operation, ``peak_bytes`` the most
    during it.
    """

    phase: str
    stage: int
    live_bytes: int
    peak_bytes: int


@dataclass(frozen=True)
class Simulation:
    """What a schedule costs under the chain's model.

    Attributes:
        peak_bytes: the most memory live at once (the budget the schedule needs).
        compute_cost: forward and backward cost of the whole step, recompute included.
        baseline_cost: the cost without any recompute (one forward, one backward).
        forward_counts: how many times each stage's forward runs.
        peak_breakdown: what is live at the peak, by kind, plus ``"transient"``.
        timeline: every operation in execution order (empty unless asked for).
        recompute_cost: the cost of the forward evaluations beyond the first of each stage.
        peak_phase: the phase of the operation at the peak (see :class:`TimelineEvent`).
        peak_stage: the stage of that operation (``len(chain)`` for the loss).
        peak_kernel: the kernel whose workspace is in the peak (``Stage.workspace_kernels``), or ``""``.
        inverse_counts: how many times each stage's inverse step runs (``Reconstruct``).
        region_calls: how many times a checkpoint region is entered (its first run, and each
            re-run of a region around it).
        overhead_cost: what the step costs besides its stages: ``region_calls`` times the
            chain's ``region_cost``, plus its ``step_overhead``.
    """

    peak_bytes: int
    compute_cost: float
    baseline_cost: float
    forward_counts: tuple[int, ...]
    peak_breakdown: tuple[tuple[str, int], ...]
    timeline: tuple[TimelineEvent, ...] = ()
    recompute_cost: float = 0.0
    peak_phase: str = ""
    peak_stage: int = -1
    peak_kernel: str = ""
    inverse_counts: tuple[int, ...] = ()
    region_calls: int = 0
    overhead_cost: float = 0.0
    baseline_overhead_cost: float = 0.0

    @property
    def step_cost(self) -> float:
        """The whole training step's predicted cost: its stages, recompute included, and the fixed overheads."""
        return self.compute_cost + self.overhead_cost

    @property
    def baseline_step_cost(self) -> float:
        """:attr:`step_cost` of plain autograd's step: every stage once, no region."""
        return self.baseline_cost + self.baseline_overhead_cost

    @property
    def reconstructed_steps(self) -> int:
        """Inverse steps run in backward (states rebuilt rather than kept or recomputed)."""
        return sum(self.inverse_counts)

    @property
    def recompute_overhead(self) -> float:
        """Extra compute as a fraction of the step without recompute (exactly 0.0 for none)."""
        return self.recompute_cost / self.baseline_cost if self.baseline_cost else 0.0

    @property
    def recomputed_forwards(self) -> int:
        """Forward evaluations beyond one per stage."""
        return sum(self.forward_counts) - len(self.forward_counts)

    def breakdown(self) -> dict[str, int]:
        return dict(self.peak_breakdown)


class _Memory:
    """Reference-counted buffers, with the peak and what was live at it."""

    def __init__(self, record: bool) -> None:
        self.live = 0
        self.peak = 0
        self.by_kind = {kind: 0 for kind in KINDS}
        self.peak_breakdown: dict[str, int] = {}
        self._refs: dict[int, int] = {}
        self._sizes: dict[int, tuple[str, int]] = {}
        self._next = 0
        self.record = record
        self.events: list[TimelineEvent] = []
        self.peak_where = ("", -1, "")

    def new(self, kind: str, nbytes: int) -> int:
        handle = self._next
        self._next += 1
        self._refs[handle] = 1
        self._sizes[handle] = (kind, nbytes)
        self.live += nbytes
        self.by_kind[kind] += nbytes
        self.touch(0)
        return handle

    def incref(self, handle: int) -> None:
        self._refs[handle] += 1

    def decref(self, handle: int) -> None:
        self._refs[handle] -= 1
        if self._refs[handle] == 0:
            kind, nbytes = self._sizes.pop(handle)
            del self._refs[handle]
            self.live -= nbytes
            self.by_kind[kind] -= nbytes

    def touch(self, transient: int, workspace: int = 0, where: tuple[str, int, str] = ("", -1, "")) -> int:
        """Note a moment where ``transient`` bytes are allocated on top of what is live,
        ``workspace`` of them inside kernels, during the operation ``where`` (phase, stage, kernel)."""
        total = self.live + transient
        if total > self.peak:
            self.peak = total
            self.peak_breakdown = {**self.by_kind, "transient": transient - workspace, "workspace": workspace}
            self.peak_where = where if workspace else where[:2] + ("",)
        return total

    def event(self, phase: str, stage: int, peak: int) -> None:
        if self.record:
            self.events.append(TimelineEvent(phase, stage, self.live, max(peak, self.live)))


class _Simulator:
    """Runs a schedule over value handles: a state is a dict value id -> handle."""

    def __init__(self, chain: Chain, record: bool) -> None:
        self.chain = chain
        self.stages = chain.stages
        self.mem = _Memory(record)
        self.counts = [0] * len(chain.stages)
        self.inverse_counts = [0] * len(chain.stages)
        self.cost = 0.0
        self.region_calls = 0
        self.grads_done: set[int] = set()
        self.grads: dict[int, int] = {}
        self.free_values = set(chain.state_values[0])
        self.gradless = set(chain.gradless_values)
        self.in_backward = False
        # Per stage: the values it consumes, creates, and whose references its tape holds.
        self.consumed, self.created, self.saved = [], [], []
        for i in range(len(chain.stages)):
            consumed, created, saved = chain.value_flow(i)
            self.consumed.append(consumed)
            self.created.append(created)
            self.saved.append(saved)

    def _bytes(self, value: int, *, gradient: bool = False) -> int:
        if value in self.free_values and not (gradient and self.chain.input_grad):
            return 0
        if gradient and value in self.gradless:
            return 0
        return self.chain.value_bytes[value]

    # A record per op of a taped forward: for Run, the handles its tape holds; for
    # Region, the state (value -> handle) it saved as its input.
    def forward(self, ops: tuple[Op, ...], state: dict[int, int], taped: bool) -> tuple[dict[int, int], list]:
        """Run ``ops`` from ``state``, whose references it takes over; returns the new state."""
        records: list = []
        phase = "recompute" if self.in_backward else "forward"
        for op in ops:
            if isinstance(op, Run):
                i = op.stage
                stage = self.stages[i]
                kernels = stage.workspace_kernels
                if not taped:
                    peak = self.mem.touch(stage.fwd_untaped_bytes, stage.fwd_untaped_workspace_bytes,
                                          (phase, i, kernels[0]))
                elif self.in_backward:
                    peak = self.mem.touch(stage.rerun_taped_bytes, stage.rerun_workspace_bytes, (phase, i, kernels[2]))
                else:
                    peak = self.mem.touch(stage.fwd_taped_bytes, stage.fwd_taped_workspace_bytes, (phase, i, kernels[1]))
                new_state = {}
                for value in self.chain.state_values[i + 1]:
                    if value in state:
                        self.mem.incref(state[value])
                        new_state[value] = state[value]
                    else:
                        new_state[value] = self.mem.new("states", self._bytes(value))
                self.counts[i] += 1
                self.cost += stage.fwd_cost
                if taped:
                    held = [self.mem.new("tapes", stage.tape_bytes)]
                    for value in self.saved[i]:
                        handle = state[value] if value in state else new_state[value]
                        self.mem.incref(handle)
                        held.append(handle)
                    records.append(held)
                for handle in state.values():
                    self.mem.decref(handle)
                state = new_state
                self.mem.event(phase, i, peak)
            elif isinstance(op, Reconstruct):
                state, _ = self.forward(tuple(Run(i) for i in range(op.start, op.stop)), state, taped=False)
                if taped:  # the output, saved for the backward
                    for handle in state.values():
                        self.mem.incref(handle)
                    records.append(dict(state))
            else:
                self.region_calls += 1
                if taped:
                    for handle in state.values():
                        self.mem.incref(handle)
                    records.append(dict(state))
                state, _ = self.forward(op.body, state, taped=False)
        return state, records

    def _make_gradients(self, i: int) -> None:
        """Stage ``i``'s backward makes the gradients of what it consumed, and of parameters reached first."""
        for value in self.consumed[i]:
            if value not in self.grads:
                self.grads[value] = self.mem.new("gradients", self._bytes(value, gradient=True))
        for param in self.stages[i].param_ids:
            if param not in self.grads_done:
                self.grads_done.add(param)
                self.mem.new("parameter gradients", self.chain.param_grad_bytes[param])

    def _free_gradients(self, i: int) -> None:
        """After stage ``i``'s backward, the gradients of what it created are freed."""
        for value in self.created[i]:
            if value in self.grads:
                self.mem.decref(self.grads.pop(value))

    def reconstruct(self, op: Reconstruct, kept: dict[int, int]) -> None:
        """Backpropagate a ``Reconstruct`` from its kept output, one walk step per stage, last first."""
        current = dict(kept)
        for handle in current.values():
            self.mem.incref(handle)
        # The gradients backward hands the op live until it returns: at the block's end, that of the
        # solution alone (the readout passes nothing else); inside the block, the whole state's.
        at_end = self.chain.blocks[self.stages[op.start].block].stop == op.stop
        handed = [] if at_end else [self.grads[value] for value in self.created[op.stop - 1] if value in self.grads]
        for handle in handed:
            self.mem.incref(handle)
        for i in reversed(range(op.start, op.stop)):
            stage = self.stages[i]
            peak = self.mem.touch(stage.reconstruct.step_bytes, 0, ("reconstruct", i, ""))
            rebuilt = {}
            for value in self.chain.state_values[i]:
                if value in current:
                    self.mem.incref(current[value])
                    rebuilt[value] = current[value]
                else:
                    rebuilt[value] = self.mem.new("states", self._bytes(value))
            for handle in current.values():
                self.mem.decref(handle)
            current = rebuilt
            self.counts[i] += 1
            self.inverse_counts[i] += 1
            self.cost += stage.reconstruct.inverse_cost + stage.fwd_cost + stage.bwd_cost
            self._make_gradients(i)
            peak = max(peak, self.mem.live)
            self._free_gradients(i)
            if at_end and i == op.stop - 1:
                handed.append(self.mem.new("gradients", stage.reconstruct.solution_bytes))
            self.mem.event("reconstruct", i, peak)
        for handle in list(current.values()) + list(kept.values()) + handed:
            self.mem.decref(handle)

    def backward(self, ops: tuple[Op, ...], records: list) -> None:
        """Backpropagate ``ops``; gradients live in ``self.grads`` (value id -> handle)."""
        for op, record in zip(reversed(ops), reversed(records)):
            if isinstance(op, Run):
                i = op.stage
                stage = self.stages[i]
                peak = self.mem.touch(stage.bwd_bytes, stage.bwd_workspace_bytes,
                                      ("backward", i, stage.workspace_kernels[3]))
                self.cost += stage.bwd_cost
                # bwd_bytes covers the backward while it runs, the gradients it makes
                # included; by its end autograd has freed the tape, and the new
                # gradients are checked on what is left (the saved states, for now).
                self.mem.decref(record[0])
                self._make_gradients(i)
                peak = max(peak, self.mem.live)
                for handle in record[1:]:
                    self.mem.decref(handle)
                self._free_gradients(i)
                self.mem.event("backward", i, peak)
            elif isinstance(op, Reconstruct):
                self.reconstruct(op, record)
            else:
                saved_state = record
                for handle in saved_state.values():
                    self.mem.incref(handle)
                out_state, inner = self.forward(op.body, dict(saved_state), taped=True)
                for handle in out_state.values():
                    self.mem.decref(handle)
                self.backward(op.body, inner)
                for handle in saved_state.values():
                    self.mem.decref(handle)

    def run(self, ops: tuple[Op, ...]) -> None:
        inputs = {value: self.mem.new("states", 0) for value in self.chain.state_values[0]}
        out, records = self.forward(ops, inputs, taped=True)
        self.in_backward = True
        for value in self.chain.state_values[-1]:
            self.grads[value] = self.mem.new("gradients", self._bytes(value, gradient=True))
        peak = self.mem.touch(self.chain.head_bytes, 0, ("loss", len(self.stages), ""))
        self.mem.event("loss", len(self.stages), peak)
        self.backward(ops, records)
        for handle in list(self.grads.values()) + list(out.values()):
            self.mem.decref(handle)


def simulate_plan(chain: Chain, schedule: Schedule | tuple[Op, ...], *, timeline: bool = False) -> Simulation:
    """Simulate one training step of ``schedule`` on ``chain``; see the module docstring.

    Validates the schedule first (:func:`planners.validate_schedule`), so it is also the
    independent checker of every planner's output.
    """
    ops = schedule.ops if isinstance(schedule, Schedule) else schedule
    validate_schedule(ops, len(chain.stages))
    if isinstance(schedule, Schedule) and schedule.sketched:
        chain = _sketched_chain(chain, schedule.sketched)
    _check_reconstructible(chain, ops)
    sim = _Simulator(chain, record=timeline)
    sim.run(ops)
    baseline = sum(stage.fwd_cost + stage.bwd_cost for stage in chain.stages)
    return Simulation(
        peak_bytes=sim.mem.peak,
        compute_cost=sim.cost,
        baseline_cost=baseline,
        forward_counts=tuple(sim.counts),
        peak_breakdown=tuple(sim.mem.peak_breakdown.items()),
        timeline=tuple(sim.mem.events),
        recompute_cost=sum((count - 1) * stage.fwd_cost + inverses * (stage.reconstruct.inverse_cost if inverses else 0)
                           for count, inverses, stage in zip(sim.counts, sim.inverse_counts, chain.stages)),
        peak_phase=sim.mem.peak_where[0],
        peak_stage=sim.mem.peak_where[1],
        peak_kernel=sim.mem.peak_where[2],
        inverse_counts=tuple(sim.inverse_counts),
        region_calls=sim.region_calls,
        overhead_cost=sim.region_calls * chain.region_cost + chain.step_overhead,
        baseline_overhead_cost=chain.step_overhead,
    )


def _check_reconstructible(chain: Chain, ops: tuple[Op, ...]) -> None:
    """Every ``Reconstruct`` covers steps of one ODE block, each offering a reconstruction."""
    for op in ops:
        if isinstance(op, Region):
            _check_reconstructible(chain, op.body)
        elif isinstance(op, Reconstruct):
            stages = chain.stages[op.start:op.stop]
            bad = next((s for s in stages if s.reconstruct is None or s.block != stages[0].block
                        or s.block is None), None)
            if bad is not None:
                raise PlanInvariantError(
                    f"Reconstruct[{op.start}, {op.stop}) covers stage {bad.name!r}, which cannot be rebuilt from "
                    "its output: only the steps of one reversible ODE block (method='reversible_heun' or 'alf') "
                    "offer a reconstruction")


def _sketched_chain(chain: Chain, sketched: tuple[int, ...]) -> Chain:
    """``chain`` with the stages a schedule sketches replaced by their sketched numbers."""
    try:
        return chain.with_sketches(sketched)
    except ValueError as error:
        raise PlanInvariantError(f"the schedule sketches stages that offer no sketch ({error}): only stages with "
                                 "supported convolutions offer one, and only when compiled with "
                                 "approximate=anode_plan.XConv(...)") from None
