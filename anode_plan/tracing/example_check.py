"""Whether the example inputs fit the model: the first layer that cannot run on them, named with its line.

:class:`~anode_plan.tracing.capture.ShapeTracer` runs every node it records on fake values of
``example_inputs``. A node whose fake run fails for a reason other than needing tensor
values (a 1-channel batch for a 3-channel stem, float64 inputs for float32 weights) is a
model and an input that do not fit: :func:`check_example_fits` raises
:class:`~anode_plan.errors.ExampleInputsError` naming that layer, the line of ``forward``
that called it, the shapes and dtypes it got and what it needs, with PyTorch's own error
chained (without its frames inside the fake-tensor machinery, which say nothing about the
model).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException
from torch.utils._pytree import tree_flatten

from anode_plan.errors import ExampleInputsError
from anode_plan.ode.block import ODEBlock
from anode_plan.tracing.capture import Unknown, user_line

_NEEDS_VALUES = (DataDependentOutputException, DynamicOutputShapeException)


def _dtype_mismatch(root: nn.Module, node: fx.Node, values: Mapping[fx.Node, Any]) -> Exception | None:
    """Floating inputs of another dtype than a layer's floating parameters, outside autocast.

    Fake tensors do not check this everywhere (a fake ``conv2d`` of float64 inputs and
    float32 weights returns float64), and the real layer refuses it: checked for
    ``torch.nn`` layers and ODE blocks, whose parameters meet their inputs directly.
    """
    if node.op != "call_module" or any(torch.is_autocast_enabled(d) for d in ("cpu", "cuda")):
        return None
    module = root.get_submodule(node.target)
    if not (type(module).__module__.startswith("torch.nn") or isinstance(module, ODEBlock)):
        return None
    params = {p.dtype for p in module.parameters() if p.is_floating_point()}
    inputs = {t.dtype for arg in node.all_input_nodes for t in tree_flatten(values.get(arg))[0]
              if isinstance(t, torch.Tensor) and t.is_floating_point()}
    if len(params) == 1 and inputs and inputs != params:
        return TypeError(f"input dtype {', '.join(sorted(map(str, inputs)))} and parameter dtype "
                         f"{next(iter(params))} differ (the layer would refuse them: convert the model with "
                         f".to(dtype) or the inputs)")
    return None


def first_failure(root: nn.Module, graph: fx.Graph, values: Mapping[fx.Node, Any]
                  ) -> tuple[fx.Node, BaseException] | None:
    """The first node whose own fake run failed (its inputs all known) for a reason other than needing values,
    or whose inputs' dtype its parameters' refuse; with the error."""
    for node in graph.nodes:
        value = values.get(node)
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        if any(values.get(arg) is None or isinstance(values.get(arg), Unknown) for arg in node.all_input_nodes):
            continue  # an input not known on fake values (a tensor constant fx stores on the root only later)
        if isinstance(value, Unknown):
            if not isinstance(value.error, _NEEDS_VALUES):
                return node, value.error
            continue
        mismatch = _dtype_mismatch(root, node, values)
        if mismatch is not None:
            return node, mismatch
    return None


def _describe(value: Any) -> str:
    tensors = [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]
    return ", ".join(f"{list(t.shape)} ({t.dtype})" for t in tensors) or repr(value)


def layer_needs(module: nn.Module) -> str:
    """What ``module`` needs of its input, in words (for the common layers; the dtype of its parameters otherwise)."""
    weight = getattr(module, "weight", None)
    dtype = f" of {weight.dtype}" if isinstance(weight, torch.Tensor) else ""
    if isinstance(module, nn.modules.conv._ConvNd):
        dims = len(module.kernel_size)
        spatial = ", ".join("HWD"[i] if dims > 1 else "L" for i in range(dims))
        return f"a {dims + 2}-d input (N, {module.in_channels}, {spatial}){dtype}: in_channels={module.in_channels}"
    if isinstance(module, nn.Linear):
        return f"an input whose last dimension is in_features={module.in_features}{dtype}"
    if isinstance(module, nn.modules.batchnorm._NormBase):
        return f"num_features={module.num_features} channels in dimension 1{dtype}"
    if isinstance(module, nn.GroupNorm):
        return f"num_channels={module.num_channels} channels in dimension 1{dtype}"
    if isinstance(module, nn.LayerNorm):
        return f"trailing dimensions {list(module.normalized_shape)}{dtype}"
    if isinstance(module, nn.Embedding):
        return f"integer indices below num_embeddings={module.num_embeddings}"
    dtypes = sorted({str(p.dtype) for p in module.parameters(recurse=True)})
    return f"inputs of its parameters' dtype ({', '.join(dtypes)})" if dtypes else ""


def check_example_fits(model: nn.Module, graph: fx.Graph, values: Mapping[fx.Node, Any],
                       example_inputs: Sequence[torch.Tensor]) -> None:
    """Raise :class:`ExampleInputsError` if some layer of ``graph`` could not run on the example's fake values."""
    failure = first_failure(model, graph, values)
    if failure is None:
        return
    node, error = failure
    got = "; ".join(_describe(values.get(arg)) for arg in node.all_input_nodes) or "no tensor"
    if node.op == "call_module":
        module = model.get_submodule(node.target)
        what, needs = f"layer {node.target!r} ({module})", layer_needs(module)
    else:
        what, needs = f"{node.op} {getattr(node.target, '__name__', node.target)!r} (fx node {node.name!r})", ""
    where = user_line(node)
    inputs = ", ".join(f"{list(x.shape)} ({x.dtype})" for x in example_inputs)
    message = (f"example_inputs do not fit {type(model).__name__}: {what}"
               + (f", called at {where}," if where else "")
               + f" got {got}" + (f"; it needs {needs}" if needs else "")
               + f". The example inputs were {inputs}. Give example_inputs shaped and typed like a training batch "
               f"(the model, its dtype and device as you will train them). Cause: "
               f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
    raise ExampleInputsError(message) from error.with_traceback(None)
