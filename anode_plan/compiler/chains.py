"""The chain a compiled model plans on, eager or compiled, and a plan marked with the backend that runs it."""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch
from torch import nn

from anode_plan.compiler.step_fit import fit_whole_step
from anode_plan.measure.compiled_chain import compiled_chain_for
from anode_plan.measure.lower import lower_to_chain
from anode_plan.plans.plan import Plan
from anode_plan.stages.inductor import CompiledStages
from anode_plan.stages.sketch import XConv
from anode_plan.tracing.trace import TracedModel
from planners import Chain


def measured_chain(model: nn.Module, traced: TracedModel, inputs: Sequence[torch.Tensor], *, calibrate: bool,
                   approximate: XConv | None, compiled: CompiledStages | None = None) -> Chain:
    """The chain a plan is made on: the cost model's, or, with ``compiled`` stages, each stage measured on the
    device as it runs compiled (:mod:`anode_plan.measure.compiled_chain`), once per input key of the model; its
    times fitted to whole measured steps (:mod:`anode_plan.compiler.step_fit`) when they were measured."""
    if compiled is None:
        chain = lower_to_chain(model, traced, inputs, calibrate=calibrate, approximate=approximate)
        return fit_whole_step(model, traced, inputs, chain)
    chain = compiled_chain_for(model, traced, inputs, compiled)
    if compiled.refined(chain):  # fitted when this input key was first measured
        return chain
    return compiled.refine_chain(chain, fit_whole_step(model, traced, inputs, chain, compiled=compiled))


def with_backend(plan: Plan, compiled: CompiledStages | None, compile_seconds: float = 0.0) -> Plan:
    """``plan`` marked as run by ``compiled`` stages (``backend="inductor"``), or as it is for eager."""
    if compiled is None:
        return plan
    return replace(plan, backend="inductor", compile_seconds=compile_seconds, eager_stages=compiled.describe_eager())
