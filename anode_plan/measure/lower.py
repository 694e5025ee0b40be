"""``lower_to_chain``: the model measured as the planners' :class:`planners.Chain`, with every option it offers.

The entry point of the measurements: the fake-tensor cost model and its calibration
(:mod:`anode_plan.measure.chain`), and, when asked, each stage measured again with its
convolutions sketched (:mod:`anode_plan.measure.sketch_offers`).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from anode_plan.measure.chain import measure_chain
from anode_plan.measure.sketch_offers import offer_sketches
from anode_plan.tracing.trace import TracedModel
from planners import Chain


def lower_to_chain(model: nn.Module, traced: TracedModel, example_inputs: Sequence[torch.Tensor], *,
                   calibrate: bool = True, share: bool = True, approximate: Any = None) -> Chain:
    """Measure ``traced``'s stages on fake copies of ``model`` and ``example_inputs``.

    Returns the :class:`planners.Chain` the planners work on. With ``calibrate`` (the
    default) each distinct stage also runs once for real on the device of
    ``example_inputs``, to measure what its kernels allocate inside themselves
    (:mod:`anode_plan.measure.calibrate`); without it those workspaces are not in the chain.
    With ``share`` (the default) ODE blocks built alike are measured once
    (:mod:`anode_plan.measure.sharing`); ``share=False`` measures every block, to check that.
    With ``approximate`` (an :class:`anode_plan.XConv`) the stages with convolutions that
    can be sketched are measured once more with them sketched, and offer that
    (:class:`planners.chain.Sketch`, :mod:`anode_plan.measure.sketch_offers`).
    The model is left untouched (BatchNorm statistics included).
    """
    chain = measure_chain(model, traced, example_inputs, calibrate=calibrate, share=share)
    if approximate is None:
        return chain
    return offer_sketches(chain, model, traced, example_inputs, approximate, calibrate=calibrate, share=share)
