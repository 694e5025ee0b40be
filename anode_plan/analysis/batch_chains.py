"""A chain at any batch, from chains measured at two: stage memory grows with the batch as ``a + b·batch``.

Activations and tapes are per sample; parameters and their gradients are not. So a chain
measured at two batch sizes predicts the chain at any other (:func:`interpolate_chain`),
and a batch search bisects on those predictions with the planners alone.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import torch

from anode_plan.errors import ExampleInputsError
from planners import Chain
from planners.chain import WORKSPACE_FIELDS

_SCALED = ("tape_bytes", "fwd_taped_bytes", "fwd_untaped_bytes", "bwd_bytes", "rerun_taped_bytes", "fwd_cost",
           "bwd_cost", *WORKSPACE_FIELDS)
_STRUCTURE = ("name", "saves_input", "saves_output", "param_ids", "block", "step", "saved_values", "uses_rng")


def chain_at(measured: dict[int, Chain], batch: int) -> Chain:
    """The chain measured at ``batch``, or the one on the line through the two nearest measured batches."""
    if batch in measured:
        return measured[batch]
    nearest = sorted(measured, key=lambda b: (abs(b - batch), b))[:2]
    return interpolate_chain(measured[nearest[0]], nearest[0], measured[nearest[1]], nearest[1], batch)


def interpolate_chain(first: Chain, first_batch: int, second: Chain, second_batch: int, batch: int) -> Chain:
    """The chain at ``batch``, each byte count and cost on the line through its values at two batch sizes.

    The two chains must have the same structure (stages, blocks, saved values), as the
    same traced model lowered at two batch sizes has. Bytes round up; a workspace never
    exceeds the peak it is part of.
    """
    if len(first.stages) != len(second.stages) or first.state_values != second.state_values:
        raise ValueError(f"the chains at batch {first_batch} and {second_batch} differ in structure")
    share = (batch - first_batch) / (second_batch - first_batch)

    def line(a: float, b: float, integer: bool = True) -> Any:
        value = a + (b - a) * share
        return max(0, math.ceil(value - 1e-9)) if integer else max(0.0, value)

    values = tuple(line(a, b) for a, b in zip(first.value_bytes, second.value_bytes))
    state_bytes = [sum(values[v] for v in state) for state in first.state_values]
    stages = []
    for index, (a, b) in enumerate(zip(first.stages, second.stages)):
        for name in _STRUCTURE:
            if getattr(a, name) != getattr(b, name):
                raise ValueError(f"stage {index} differs in {name} at batch {first_batch} and {second_batch}")
        fields = {name: line(getattr(a, name), getattr(b, name), isinstance(getattr(a, name), int))
                  for name in _SCALED}
        for workspace, peak in zip(WORKSPACE_FIELDS, ("fwd_untaped_bytes", "fwd_taped_bytes", "rerun_taped_bytes",
                                                      "bwd_bytes")):
            fields[workspace] = min(fields[workspace], fields[peak])
        stages.append(dataclasses.replace(a, input_bytes=state_bytes[index], output_bytes=state_bytes[index + 1],
                                          **fields))
    head = line(first.head_bytes, second.head_bytes)
    name = first.name.replace(f"(batch {first_batch})", f"(batch {batch})")
    return dataclasses.replace(first, stages=tuple(stages), value_bytes=values, head_bytes=head, name=name)


def batch_inputs(example_inputs: Sequence[torch.Tensor], batch: int) -> tuple[torch.Tensor, ...]:
    """``example_inputs`` at another batch size: their rows repeated in turn (so integer labels stay valid)."""
    rows = torch.arange(batch, device=example_inputs[0].device) % example_inputs[0].shape[0]
    out = []
    for x in example_inputs:
        resized = x.detach()[rows]
        out.append(resized.requires_grad_(x.requires_grad))
    return tuple(out)


def meta_inputs(example_inputs: Sequence[torch.Tensor], batch: int) -> tuple[torch.Tensor, ...]:
    """Inputs of the batch's shapes for a plan's record, without memory (meta tensors)."""
    return tuple(torch.empty((batch, *x.shape[1:]), dtype=x.dtype, device="meta").requires_grad_(x.requires_grad)
                 for x in example_inputs)


def check_batched(example_inputs: Sequence[torch.Tensor]) -> None:
    if not isinstance(example_inputs, (tuple, list)) or not example_inputs or \
            not all(isinstance(x, torch.Tensor) for x in example_inputs):
        raise ExampleInputsError("example_inputs must be a non-empty tuple of tensors, e.g. example_inputs=(x,)")
    batches = {x.shape[0] if x.dim() else None for x in example_inputs}
    if len(batches) != 1 or None in batches:
        shapes = [tuple(x.shape) for x in example_inputs]
        raise ExampleInputsError(f"the batch is dimension 0 of every input, and these inputs disagree on it (shapes "
                                 f"{shapes}); max_batch_size needs inputs of one batch size")
