"""The plain-data description of a network that the planners work on.

A network is lowered to a *chain* of stages: stage ``i`` maps the state ``x_i`` to
``x_{i+1}``. Every time step of every ODE block is one stage, and each run of other
layers between blocks is one stage. The numbers come from
``anode_plan.lower_to_chain`` (measured on fake tensors), or are written by hand in
tests, where unit-sized stages make peaks and recompute counts exact integers.

The memory model behind these fields is documented in :mod:`planners.simulate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterable


WORKSPACE_FIELDS = ("fwd_untaped_workspace_bytes", "fwd_taped_workspace_bytes", "rerun_workspace_bytes",
                    "bwd_workspace_bytes")
"""The :class:`Stage` fields of the kernel workspace inside each phase's peak."""


@dataclass(frozen=True)
class Reconstruction:
    """A stage's offer to be rebuilt from its output instead of kept or recomputed from its input.

    Offered by the time steps of a reversible ODE block (``anode_plan.ODEBlock(method=
    "reversible_heun" | "alf")``): the inverse step computes ``x_i`` from ``x_{i+1}``.

    Attributes:
        step_bytes: the most memory one step of the walk back allocates on top of what is
            live when it starts (the state after the step, its gradient, the parameters'
            gradients): the inverse, the rebuilt ``x_i``, the taped re-run, its
            vector-Jacobian products and the gradients they make, kernel workspaces included.
        inverse_cost: the inverse step's cost, in the chain's cost unit (the re-run and the
            backward cost the stage's ``fwd_cost`` and ``bwd_cost``).
        error_per_step: the relative error of a rebuilt state per inverted step, as
            measured on the example input (0.0 when not measured).
        solution_bytes: the bytes of the solution part of the carried state (``y``): at the
            block's end only its gradient reaches the walk, and it stays live through it.
        nominal_inverse_cost: the FLOP model's ``inverse_cost``, kept beside a measured one
            (as :attr:`Stage.nominal_fwd_cost`); defaults to ``inverse_cost``.
    """

    step_bytes: int
    inverse_cost: float
    error_per_step: float = 0.0
    solution_bytes: int = 0
    nominal_inverse_cost: float = -1.0

    def __post_init__(self) -> None:
        if self.nominal_inverse_cost < 0:
            object.__setattr__(self, "nominal_inverse_cost", self.inverse_cost)
        if self.step_bytes < 0 or self.inverse_cost < 0:
            raise ValueError(f"Reconstruction: step_bytes={self.step_bytes} and "
                             f"inverse_cost={self.inverse_cost} must be >= 0")


@dataclass(frozen=True)
class Sketch:
    """A stage's offer to keep random sketches of its convolutions' inputs instead of the inputs (inexact).

    XConv (Siahkoohi et al., arXiv 2106.06998): a convolution keeps ``probes`` random
    projections of its input, and its weight gradient becomes an unbiased estimate. Offered
    only when the user opts in (``compile(..., approximate=anode_plan.XConv(...))``).

    Attributes:
        stage: the stage's numbers with those convolutions sketched, measured like the
            exact stage (fake tensors, then calibration): the forward's projections, the
            backward's regenerated probes and products.
        layers: the qualified names of the sketched convolutions.
        relative_errors: per layer, the relative error of its weight gradient,
            ``‖ĝ - g‖ / ‖g‖``, measured on the example batch (root mean square over draws
            of the probes).
        probes, seed: the sketch's number of probes and base seed.
    """

    stage: "Stage"
    layers: tuple[str, ...]
    relative_errors: tuple[float, ...]
    probes: int
    seed: int = 0

    def __post_init__(self) -> None:
        if len(self.relative_errors) != len(self.layers) or not self.layers:
            raise ValueError(f"Sketch: {len(self.layers)} layers with {len(self.relative_errors)} errors; give one "
                             "error per sketched layer, and at least one layer")


@dataclass(frozen=True)
class Stage:
    """One stage of a chain and what running it costs.

    Attributes:
        name: a label for reports, such as ``"layer1.0@step3"`` or ``"stem"``.
        input_bytes: bytes of the state ``x_i`` that enters the stage.
        output_bytes: bytes of the state ``x_{i+1}`` it produces.
        tape_bytes: bytes autograd saves for backward when the stage runs with a tape,
            not counting its input, its output or parameters (those are counted once,
            elsewhere).
        saves_input: the tape keeps ``x_i`` alive.
        saves_output: the tape keeps ``x_{i+1}`` alive.
        fwd_taped_bytes: the most memory the taped forward allocates on top of what was
            live before it (output, tape and temporaries together), as the allocator
            counts it: kernel workspaces included (``fwd_taped_workspace_bytes`` of it).
        fwd_untaped_bytes: the same for an untaped forward (output and temporaries).
        rerun_taped_bytes: ``fwd_taped_bytes`` for a taped forward re-run in backward (a
            checkpoint region's recompute), which can differ from the first run: it
            starts once backward has made the gradients that need no saved tensor, and
            stops when the last saved tensor exists again. Defaults to ``fwd_taped_bytes``.
        bwd_bytes: the most memory the backward allocates on top of what was live
            before it (input gradient, parameter gradients and temporaries).
        fwd_untaped_workspace_bytes, fwd_taped_workspace_bytes, rerun_workspace_bytes,
            bwd_workspace_bytes: the part of each of those four peaks that no tensor
            holds: memory kernels allocate and free inside themselves (convolution
            workspaces, internal copies), measured on the real device by
            :mod:`anode_plan.measure.calibrate`. Already included in the peaks; kept apart to say
            what a peak is made of.
        workspace_kernels: for each of those four workspaces, the kernel at its peak
            (``"aten::convolution_backward"``), or ``""``.
        uses_rng: the stage draws random numbers (dropout), so a re-run must replay the
            generator's state.
        fwd_cost: cost of one forward, in milliseconds: measured on the device when the
            chain is calibrated (:attr:`Chain.cost_source` ``"measured"``), else nominal
            (FLOPs and bytes written at fixed rates).
        bwd_cost: cost of one backward, likewise.
        nominal_fwd_cost, nominal_bwd_cost: the FLOP model's costs of the same runs, kept
            beside measured ones: they carry no timing noise, so a plan that they prefer
            wins a tie (see ``anode_plan.plans.plan.plan_schedule``). Default to
            ``fwd_cost`` and ``bwd_cost``.
        param_ids: indices into :attr:`Chain.param_grad_bytes` of the trainable
            parameters the stage uses; each one's gradient is allocated by the first
            backward that reaches it and then stays.
        block: index of the ODE block this stage is a time step of, or ``None``.
        step: the time step within that block, or ``None``.
        saved_values: the value ids (see :attr:`Chain.state_values`) the tape holds;
            ``None`` derives them from ``saves_input`` (the input values the stage
            consumes) and ``saves_output`` (the values it creates).
        reconstruct: the stage's offer to be rebuilt backwards from its output (a
            :class:`Reconstruction`), or ``None``: the options a planner has for a stage
            are keeping its tape, recomputing it from a kept state, and this.
        sketch: the stage's offer to run with its convolutions sketched (a
            :class:`Sketch`), or ``None``; a schedule that takes it lists the stage in
            :attr:`~planners.schedule.Schedule.sketched`.
    """

    name: str
    input_bytes: int
    output_bytes: int
    tape_bytes: int
    saves_input: bool = True
    saves_output: bool = False
    fwd_taped_bytes: int = -1
    fwd_untaped_bytes: int = -1
    bwd_bytes: int = -1
    rerun_taped_bytes: int = -1
    fwd_cost: float = 1.0
    bwd_cost: float = 2.0
    param_ids: tuple[int, ...] = ()
    block: int | None = None
    step: int | None = None
    saved_values: tuple[int, ...] | None = None
    fwd_untaped_workspace_bytes: int = 0
    fwd_taped_workspace_bytes: int = 0
    rerun_workspace_bytes: int = 0
    bwd_workspace_bytes: int = 0
    workspace_kernels: tuple[str, str, str, str] = ("", "", "", "")
    uses_rng: bool = False
    reconstruct: Reconstruction | None = None
    sketch: Sketch | None = None
    nominal_fwd_cost: float = -1.0
    nominal_bwd_cost: float = -1.0

    def __post_init__(self) -> None:
        if self.nominal_fwd_cost < 0:
            object.__setattr__(self, "nominal_fwd_cost", self.fwd_cost)
        if self.nominal_bwd_cost < 0:
            object.__setattr__(self, "nominal_bwd_cost", self.bwd_cost)
        if min(self.fwd_cost, self.bwd_cost) < 0:
            raise ValueError(f"Stage {self.name!r}: fwd_cost={self.fwd_cost} and bwd_cost={self.bwd_cost} must be >= 0")
        for attr in ("input_bytes", "output_bytes", "tape_bytes", *WORKSPACE_FIELDS):
            if getattr(self, attr) < 0:
                raise ValueError(f"Stage {self.name!r}: {attr} must be >= 0, got {getattr(self, attr)}")
        # Defaults for hand-written chains: a taped forward allocates its output and
        # tape, an untaped one its output, and backward the input gradient.
        if self.fwd_taped_bytes < 0:
            object.__setattr__(self, "fwd_taped_bytes", self.output_bytes + self.tape_bytes)
        if self.fwd_untaped_bytes < 0:
            object.__setattr__(self, "fwd_untaped_bytes", self.output_bytes)
        if self.bwd_bytes < 0:
            object.__setattr__(self, "bwd_bytes", self.input_bytes)
        if self.rerun_taped_bytes < 0:
            object.__setattr__(self, "rerun_taped_bytes", self.fwd_taped_bytes)
        for workspace, peak in zip(WORKSPACE_FIELDS, ("fwd_untaped_bytes", "fwd_taped_bytes", "rerun_taped_bytes",
                                                      "bwd_bytes")):
            if getattr(self, workspace) > getattr(self, peak):
                raise ValueError(f"Stage {self.name!r}: {workspace}={getattr(self, workspace)} is part of "
                                 f"{peak}={getattr(self, peak)} and cannot exceed it")
        if len(self.workspace_kernels) != len(WORKSPACE_FIELDS):
            raise ValueError(f"Stage {self.name!r}: workspace_kernels needs {len(WORKSPACE_FIELDS)} names, one per "
                             f"phase, got {len(self.workspace_kernels)}")


@dataclass(frozen=True)
class Block:
    """An ODE block: the stages ``start .. stop-1`` are its time steps, in order."""

    name: str
    start: int
    stop: int
    method: str = "euler"

    @property
    def nt(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Chain:
    """A chain of stages, with the ODE blocks marked.

    Attributes:
        stages: the stages in forward order.
        blocks: the ODE blocks, as ranges of stages, in order and not overlapping.
        param_grad_bytes: bytes of each trainable parameter's gradient.
        input_grad: whether the network input's gradient is computed (it is charged).
        head_bytes: memory the loss after the network is allowed, on top of the output
            gradient; by default twice the output.
        name: a label for reports and error messages.
        state_values: for each boundary ``0..n``, the ids of the values (tensor storages)
            that make up the state there. A value in two consecutive states is carried
            through the stage unchanged (a skip connection) and is counted once. By
            default every state is one value of its own: a plain chain.
        value_bytes: the bytes of each value id. Values of the network input
            (``state_values[0]``) are never charged, since the budget excludes the batch.
        gradless_values: the value ids no gradient ever reaches (the parts a reversible
            ODE block carries besides its solution, at its end: nothing reads them).
        unsketchable_layers: with sketches offered (XConv), the convolutions that cannot be
            sketched (groups, dilation, other padding modes, not 2-d) and always run exactly.
        cost_unit: the unit of every cost (``"ms"``).
        cost_source: ``"measured"`` when the stage costs were timed on the device,
            ``"nominal"`` when they come from FLOP counts at fixed rates.
        region_cost: the fixed cost of one checkpoint region, each time it is entered
            (its forward and its re-run's setup in backward), fitted from whole measured
            steps; 0 when not measured.
        step_overhead: the fixed cost of a training step besides its stages (the loss,
            backward's start), fitted from whole measured steps; 0 when not measured.
        timing_noise: the relative uncertainty of the stage timings (their spread over the
            square root of their repeats, weighted by time); predicted differences within
            twice it are ties (:func:`tie_tolerance`).
        time_scale: the factor the stage timings were scaled by to match whole measured steps
            (``anode_plan.compiler.step_fit``); 1.0 when not fitted.
        adaptive_steps: per adaptive ODE block's stage (one stage each), ``(stage, steps)``:
            the accepted steps its measured solve took, from which its recompute at a given
            number of checkpoints is predicted (``anode_plan.plans.adaptive_share``).
    """

    stages: tuple[Stage, ...]
    blocks: tuple[Block, ...] = ()
    param_grad_bytes: tuple[int, ...] = ()
    input_grad: bool = False
    head_bytes: int = -1
    name: str = "chain"
    cost_unit: str = field(default="ms")
    state_values: tuple[tuple[int, ...], ...] = ()
    value_bytes: tuple[int, ...] = ()
    gradless_values: tuple[int, ...] = ()
    unsketchable_layers: tuple[str, ...] = ()
    cost_source: str = "nominal"
    region_cost: float = 0.0
    step_overhead: float = 0.0
    timing_noise: float = 0.0
    adaptive_steps: tuple[tuple[int, int], ...] = ()
    time_scale: float = 1.0

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError("a Chain needs at least one stage")
        if self.cost_source not in ("measured", "nominal"):
            raise ValueError(f"cost_source={self.cost_source!r}: use 'measured' (timed on the device) or 'nominal'")
        if min(self.region_cost, self.step_overhead, self.timing_noise) < 0:
            raise ValueError(f"region_cost={self.region_cost}, step_overhead={self.step_overhead} and "
                             f"timing_noise={self.timing_noise} must be >= 0")
        if not self.state_values:
            object.__setattr__(self, "state_values", tuple((i,) for i in range(len(self.stages) + 1)))
            object.__setattr__(self, "value_bytes", tuple(s.input_bytes for s in self.stages)
                               + (self.stages[-1].output_bytes,))
        if len(self.state_values) != len(self.stages) + 1:
            raise ValueError(f"state_values has {len(self.state_values)} boundaries; a chain of "
                             f"{len(self.stages)} stages has {len(self.stages) + 1}")
        for i, values in enumerate(self.state_values):
            total = sum(self.value_bytes[v] for v in values)
            expected = self.stages[i].input_bytes if i < len(self.stages) else self.stages[-1].output_bytes
            if total != expected:
                raise ValueError(f"the values of state {i} add up to {total} bytes, but its stage says {expected}")
        for i in range(len(self.stages) - 1):
            out_b, in_b = self.stages[i].output_bytes, self.stages[i + 1].input_bytes
            if out_b != in_b:
                raise ValueError(f"stage {i} ({self.stages[i].name}) outputs {out_b} bytes but stage "
                                 f"{i + 1} ({self.stages[i + 1].name}) takes {in_b} bytes")
        previous_stop = 0
        for block in self.blocks:
            if not previous_stop <= block.start < block.stop <= len(self.stages):
                raise ValueError(f"block {block.name!r} [{block.start}, {block.stop}) does not fit "
                                 f"in order in a chain of {len(self.stages)} stages")
            previous_stop = block.stop
        if self.head_bytes < 0:
            object.__setattr__(self, "head_bytes", 2 * self.stages[-1].output_bytes)

    def __len__(self) -> int:
        return len(self.stages)

    def value_flow(self, stage: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """``(consumed, created, saved)`` value ids of a stage: what leaves the state there,
        what enters it, and what its tape holds (see :attr:`Stage.saved_values`)."""
        ins, outs = self.state_values[stage], self.state_values[stage + 1]
        consumed = tuple(v for v in ins if v not in outs)
        created = tuple(v for v in outs if v not in ins)
        spec = self.stages[stage]
        if spec.saved_values is not None:
            return consumed, created, spec.saved_values
        return consumed, created, (consumed if spec.saves_input else ()) + (created if spec.saves_output else ())

    @property
    def output_bytes(self) -> int:
        return self.stages[-1].output_bytes

    @property
    def sketchable_stages(self) -> tuple[int, ...]:
        """The stages that offer a :class:`Sketch`."""
        return tuple(i for i, stage in enumerate(self.stages) if stage.sketch is not None)

    def with_sketches(self, stages: "Iterable[int]") -> "Chain":
        """This chain with ``stages`` replaced by their sketched numbers (each must offer a :class:`Sketch`).

        A sketched stage offers neither a reconstruction nor a sketch; the chain's
        states are the same, since a sketch changes what a stage keeps, not what it makes.
        """
        chosen = sorted(set(stages))
        if not chosen:
            return self
        replaced = list(self.stages)
        for index in chosen:
            if not 0 <= index < len(replaced) or replaced[index].sketch is None:
                raise ValueError(f"stage {index} of {self.name} offers no sketch; the stages that do are "
                                 f"{list(self.sketchable_stages)}")
            replaced[index] = replace(replaced[index].sketch.stage, reconstruct=None, sketch=None)
        return replace(self, stages=tuple(replaced))

    def nominal(self) -> "Chain":
        """This chain priced by the FLOP model (:attr:`Stage.nominal_fwd_cost`), without fitted overheads."""
        if self.cost_source == "nominal":
            return self
        return replace(self, stages=tuple(_nominal_stage(stage) for stage in self.stages), cost_source="nominal",
                       region_cost=0.0, step_overhead=0.0, timing_noise=0.0, time_scale=1.0)

    @classmethod
    def uniform(cls, n: int, *, state_bytes: int = 1, tape_bytes: int = 1, fwd_cost: float = 1.0,
                bwd_cost: float = 1.0, as_block: bool = True) -> "Chain":
        """A chain of ``n`` identical stages; with ``as_block`` they form one ODE block.

        The unit chain of the revolve papers: use it in tests, where every peak is an
        integer number of states.
        """
        stages = tuple(
            Stage(name=f"step{i}", input_bytes=state_bytes, output_bytes=state_bytes,
                  tape_bytes=tape_bytes, fwd_cost=fwd_cost, bwd_cost=bwd_cost,
                  block=0 if as_block else None, step=i if as_block else None)
            for i in range(n))
        blocks = (Block("block0", 0, n),) if as_block else ()
        return cls(stages=stages, blocks=blocks, name=f"uniform{n}")


TIE_FLOOR = 0.02
"""The smallest relative difference in predicted step time that a measured chain's plans treat as real."""


def tie_tolerance(chain: Chain) -> float:
    """The relative difference in predicted step time below which two plans of ``chain`` tie.

    0 for nominal costs (they carry no noise); for measured ones twice the timings'
    uncertainty, at least :data:`TIE_FLOOR`: a choice inside it would flip from one
    calibration to the next on a shared machine.
    """
    return 0.0 if chain.cost_source == "nominal" else max(TIE_FLOOR, 2 * chain.timing_noise)


def _nominal_stage(stage: Stage) -> Stage:
    sketch = stage.sketch and replace(stage.sketch, stage=_nominal_stage(stage.sketch.stage))
    reconstruct = stage.reconstruct and replace(stage.reconstruct, inverse_cost=stage.reconstruct.nominal_inverse_cost)
    return replace(stage, fwd_cost=stage.nominal_fwd_cost, bwd_cost=stage.nominal_bwd_cost, sketch=sketch,
                   reconstruct=reconstruct)


def carries_values(chain: Chain) -> bool:
    """Whether some value other than the network input rides through a stage unchanged (a skip connection)."""
    inputs = set(chain.state_values[0])
    return any((set(before) & set(after)) - inputs for before, after in zip(chain.state_values, chain.state_values[1:]))
