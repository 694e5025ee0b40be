"""An fx tracer that knows the example's shapes, so shape-only Python in ``forward`` traces.

Plain ``torch.fx`` tracing gives every tensor a symbolic proxy with no shape: Python
that *uses* a shape fails, for instance torchdiffeq's MNIST ``Flatten``::

    shape = torch.prod(torch.tensor(x.shape[1:])).item()
    return x.view(-1, shape)

``torch.export`` (non-strict) captures such code by running it on fake tensors and
specialising the shapes. :class:`ShapeTracer` does the same inside fx: every node it
records is also run on a fake copy of the example input (shapes, no values), and
``x.shape``, ``x.size(d)``, ``x.dim()``, ``x.numel()`` and ``len(x)`` return the fake
value's numbers. Two things keep the graph general where plain fx's was:

* A size is a :class:`Dim`, an ``int`` that remembers where it came from. Used by
  Python (``torch.tensor(shape)``, ``range(n)``, comparisons) it is its number; passed
  to a traced operation (``x.view(x.size(0), -1)``) or combined with ``+ - * // %``
  and then passed, it becomes the ``size`` node fx would have recorded, so the graph
  still follows the batch size.
* ``out += y`` on a tensor is recorded as the in-place ``operator.iadd`` it is (plain
  fx records ``out + y``), so the compiled model computes, allocates and fails exactly
  as the model does.
* Values stay symbolic wherever fx could trace them: dtypes, devices and tensor values
  are never read. A branch on a tensor's value (``if x.sum() > 0``) fails as it does in
  fx, since a fake tensor has no value to branch on.

Specialising is sound for the shapes traced; :func:`anode_plan.tracing.trace.trace_model`
traces at a second batch size when a shape was read, and a model whose graph differs
there (its Python computed with the batch size) is marked as planned for that batch
alone. The design, and why not ``torch.export``'s ATen graph: ``docs/capture.md``.
"""

from __future__ import annotations

import copy
import operator
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeCopyMode, FakeTensorMode
from torch.utils._pytree import tree_flatten, tree_map

from anode_plan.ode.block import ODEBlock


class Unknown:
    """The fake value of a node that could not be computed (it needs tensor values), and why."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


_ARITHMETIC = {
    "__add__": operator.add, "__radd__": operator.add, "__sub__": operator.sub, "__rsub__": operator.sub,
    "__mul__": operator.mul, "__rmul__": operator.mul, "__floordiv__": operator.floordiv,
    "__rfloordiv__": operator.floordiv, "__mod__": operator.mod, "__rmod__": operator.mod,
}


class Dim(int):
    """A size read from a traced tensor: its number, and how to record it as an fx node.

    ``recipe`` is ``("size", proxy, d)`` for ``proxy.size(d)``, or ``("op", fn, args)``
    for arithmetic on sizes and ints. The node is made only when the size reaches a
    traced operation (:meth:`ShapeTracer.create_arg`), so sizes used by Python alone
    leave nothing in the graph.
    """

    def __new__(cls, value: int, recipe: tuple) -> "Dim":
        dim = super().__new__(cls, value)
        dim.recipe = recipe
        dim.node = None
        return dim

    def __neg__(self) -> "Dim":
        return Dim(-int(self), ("op", operator.neg, (self,)))

    def __repr__(self) -> str:
        return f"Dim({int(self)})"


def _arithmetic(name: str, fn: Callable[[int, int], int]) -> Callable[[Dim, Any], Any]:
    reflected = name.startswith("__r")

    def method(self: Dim, other: Any) -> Any:
        if isinstance(other, bool) or not isinstance(other, int):
            return getattr(int, name)(self, other)  # a float, a proxy: plain int arithmetic, or NotImplemented
        args = (other, self) if reflected else (self, other)
        return Dim(fn(int(args[0]), int(args[1])), ("op", fn, args))

    method.__name__ = name
    return method


for _name, _fn in _ARITHMETIC.items():
    setattr(Dim, _name, _arithmetic(_name, _fn))


class Shape(tuple):
    """``x.shape`` while tracing: a tuple of :class:`Dim` (slices stay ``Shape``)."""

    def __getitem__(self, index: Any) -> Any:
        found = super().__getitem__(index)
        return Shape(found) if isinstance(index, slice) else found

    def numel(self) -> Dim:
        total: Any = Dim(1, ("op", operator.mul, (1, 1)))
        for dim in self:
            total = total * dim
        return total


class _ShapedProxy(fx.Proxy):
    """An fx proxy whose shape queries answer from its node's fake value, when it has one."""

    def _tensor(self) -> torch.Tensor | None:
        value = self.tracer.values.get(self.node)
        return value if isinstance(value, torch.Tensor) else None

    def __getattr__(self, name: str) -> Any:
        value = self._tensor() if name in _SHAPE_QUERIES else None
        if value is None:
            return super().__getattr__(name)
        self.tracer.read_shape = True
        shape = Shape(Dim(n, ("size", self, d)) for d, n in enumerate(value.shape))
        if name == "shape":
            return shape
        if name == "ndim":
            return value.dim()
        if name == "size":
            return lambda dim=None: shape if dim is None else shape[dim]
        if name in ("numel", "nelement"):
            return lambda: shape.numel()
        return lambda: value.dim()  # dim, ndimension

    def __len__(self) -> int:
        value = self.tracer.values.get(self.node)
        if isinstance(value, torch.Tensor) and value.dim():
            self.tracer.read_shape = True
            return value.shape[0]
        if isinstance(value, (tuple, list)):
            return len(value)
        return super().__len__()


def _in_place(name: str, fn: Callable[[Any, Any], Any]) -> Callable[[_ShapedProxy, Any], Any]:
    """``proxy += y`` recorded as the in-place operation it is on a tensor (plain fx records ``proxy + y``)."""

    def method(self: _ShapedProxy, other: Any) -> Any:
        if isinstance(self.tracer.values.get(self.node), torch.Tensor):
            return self.tracer.create_proxy("call_function", fn, (self, other), {})
        return getattr(fx.Proxy, name.replace("__i", "__", 1))(self, other)

    method.__name__ = name
    return method


for _name, _fn in {"__iadd__": operator.iadd, "__isub__": operator.isub, "__imul__": operator.imul,
                   "__itruediv__": operator.itruediv}.items():
    setattr(_ShapedProxy, _name, _in_place(_name, _fn))


_SHAPE_QUERIES = frozenset({"shape", "size", "dim", "ndim", "ndimension", "numel", "nelement"})


class ShapeTracer(fx.Tracer):
    """``fx.Tracer`` with ODE blocks (and ``leaf_types``) as leaves and fake values for every node.

    Args:
        example_inputs: the inputs the fake values are made from.
        leaf_types: module classes recorded as one node, as ``fx.Tracer`` records
            ``torch.nn`` layers.
        batch: trace as if dimension 0 of every input had this size (default: as it is).
    """

    def __init__(self, example_inputs: Sequence[torch.Tensor], leaf_types: tuple[type, ...] = (),
                 batch: int | None = None) -> None:
        super().__init__()
        self.record_stack_traces = True  # error messages name the line of forward that made a node
        self.leaf_types = leaf_types
        self.fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        self.example_inputs = [self._fake(x) for x in example_inputs]
        if batch is not None:
            with self.fake_mode:
                self.example_inputs = [x.new_empty((batch, *x.shape[1:])) if x.dim() else x
                                       for x in self.example_inputs]
        self.values: dict[fx.Node, Any] = {}
        self.read_shape = False
        self._fake_modules: dict[int, nn.Module] = {}
        self._evaluating = False

    def _fake(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.fake_mode.from_tensor(tensor)

    def is_leaf_module(self, module: nn.Module, qualname: str) -> bool:
        if isinstance(module, (ODEBlock, *self.leaf_types)):
            return True
        return super().is_leaf_module(module, qualname)

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        if self._evaluating:  # a leaf's fake copy runs as it is, not traced
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict) -> Any:
        if self._evaluating:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ShapedProxy(node, self)

    def create_arg(self, a: Any) -> Any:
        if isinstance(a, Dim):
            return self._materialise(a)
        if isinstance(a, Shape):
            return tuple(self.create_arg(dim) for dim in a)
        return super().create_arg(a)

    def _materialise(self, dim: Dim) -> fx.Node:
        if dim.node is None:
            if dim.recipe[0] == "size":
                _, proxy, index = dim.recipe
                dim.node = self.create_proxy("call_method", "size", (proxy, index), {}).node
            else:
                _, fn, args = dim.recipe
                dim.node = self.create_proxy("call_function", fn, args, {}).node
        return dim.node

    def create_proxy(self, kind: str, target: Any, args: tuple, kwargs: dict, name: str | None = None,
                     type_expr: Any = None, proxy_factory_fn: Any = None) -> fx.Proxy:
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        self.values[proxy.node] = self._evaluate(proxy.node)
        return proxy

    def iter(self, obj: fx.Proxy) -> Iterator:
        """``for part in proxy``: over the parts of a tuple value, or the rows of a tensor."""
        value = self.values.get(obj.node)
        if isinstance(value, (tuple, list)) or (isinstance(value, torch.Tensor) and value.dim()):
            if isinstance(value, torch.Tensor):
                self.read_shape = True
            return iter([obj[i] for i in range(len(value))])
        return super().iter(obj)

    def to_bool(self, obj: fx.Proxy) -> bool:
        """``if proxy``: a Python number's truth; a tensor's value is unknown, as in fx."""
        value = self.values.get(obj.node)
        if isinstance(value, (bool, int, float)):
            return bool(value)
        return super().to_bool(obj)

    def _evaluate(self, node: fx.Node) -> Any:
        """The fake value of ``node``, from those of its arguments (an :class:`Unknown` when it needs values)."""
        args = fx.node.map_arg(node.args, lambda n: self.values.get(n))
        kwargs = fx.node.map_arg(node.kwargs, lambda n: self.values.get(n))
        unknown = [v for v in tree_flatten((args, kwargs))[0] if isinstance(v, Unknown)]
        if unknown:
            return unknown[0]
        try:
            with self.fake_mode:
                if node.op == "placeholder":  # the placeholders come first, in order
                    index = len(self.values)
                    return self.example_inputs[index] if index < len(self.example_inputs) else Unknown(
                        TypeError("no example input for this argument"))
                if node.op == "get_attr":
                    value = fetch_attr(self.root, node.target)
                    return self._fake(value) if isinstance(value, torch.Tensor) else value
                if node.op == "call_module":
                    module = self.root.get_submodule(node.target)
                    if isinstance(module, ODEBlock):  # a solve keeps the state's shapes
                        return tree_map(lambda t: torch.empty_like(t) if isinstance(t, torch.Tensor) else t,
                                        tuple(args[0]) if isinstance(args[0], list) else args[0])
                    self._evaluating = True
                    try:
                        return self._fake_module(module)(*args, **kwargs)
                    finally:
                        self._evaluating = False
                if node.op == "call_function":
                    return node.target(*args, **kwargs)
                if node.op == "call_method":
                    return getattr(args[0], node.target)(*args[1:], **kwargs)
        except Exception as error:  # the value stays unknown; only a shape query on it will fail
            return Unknown(error)
        return None

    def _fake_module(self, module: nn.Module) -> nn.Module:
        """A copy of a leaf module on fake tensors: its side effects (counters, statistics) stay there."""
        if id(module) not in self._fake_modules:
            with FakeCopyMode(self.fake_mode):
                self._fake_modules[id(module)] = copy.deepcopy(module)
        return self._fake_modules[id(module)]


def user_line(node: fx.Node) -> str | None:
    """Where the user's code made ``node``: ``file:line (code)`` of the innermost frame outside torch and anode-plan."""
    lines = (node.stack_trace or "").splitlines()
    found = None
    for index, line in enumerate(lines):
        text = line.strip()
        if text.startswith("File ") and "/torch/" not in text and "/anode_plan/" not in text:
            path, _, rest = text[len("File "):].partition(", line ")
            number = rest.split(",")[0]
            code = lines[index + 1].strip() if index + 1 < len(lines) else ""
            code = "" if code.startswith("File ") else code  # no source (stdin, a notebook cell)
            found = f"{path.strip(chr(34))}:{number}" + (f" ({code})" if code else "")
    return found


def fetch_attr(root: nn.Module, target: str) -> Any:
    """The attribute ``target`` (a dotted path, as in an fx ``get_attr`` node) of ``root``."""
    obj: Any = root
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


def graph_signature(graph: fx.Graph, root: nn.Module) -> list[tuple]:
    """What two traces must share to be the same program: each node's op, target and arguments.

    Tensor constants fx stores on the root get fresh names per trace, so they compare
    by shape and dtype, and by their order of appearance.
    """
    names: dict[str, str] = {}

    def arg(value: Any) -> Any:
        return names.get(value.name, value.name) if isinstance(value, fx.Node) else repr(value)

    signature = []
    for node in graph.nodes:
        target = node.target
        if node.op == "get_attr" and str(target).startswith("_tensor_constant"):
            constant = fetch_attr(root, target)
            target = ("constant", tuple(constant.shape), str(constant.dtype))
            names[node.name] = f"constant {len(names)}"
        signature.append((node.op, str(target), names.get(node.name, node.name),
                          repr(fx.node.map_aggregate(node.args, arg)), repr(fx.node.map_aggregate(node.kwargs, arg))))
    return signature
