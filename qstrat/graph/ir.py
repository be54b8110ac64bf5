"""A small, immutable graph of a Keras model: one node per call of a layer or operation.

Passes read a `Graph` and return a new one; nothing here is mutated after it
is made. A node keeps the Keras operation it calls (shared layers: one object,
several nodes) and how to call it; `rebuild.py` turns a graph back into a
Keras model.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class TensorRef:
    """Output ``index`` of node ``node``."""

    node: str
    index: int = 0

    def __str__(self) -> str:
        return self.node if self.index == 0 else f"{self.node}:{self.index}"


@dataclass(frozen=True)
class Node:
    """One call of a layer or operation.

    Attributes:
        name: unique in the graph: the layer name, ``name@k`` for the k-th call
            of a shared layer.
        op: the Keras layer or operation called (never mutated).
        inputs: the tensors fed to it, in the order they appear in its arguments.
        arguments: the recorded call (Keras SymbolicArguments) used to replay
            it with new tensors, or None for a node made by a pass, which is
            called as ``op(x)`` (one input) or ``op([x1, x2, ...])``.
        in_tensors: the original Keras tensors matching ``inputs`` (for replay).
        num_outputs: how many tensors the call returns.
    """

    name: str
    op: Any
    inputs: tuple[TensorRef, ...]
    arguments: Any = None
    in_tensors: tuple[Any, ...] = ()
    num_outputs: int = 1
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def layer_name(self) -> str:
        return getattr(self.op, "name", self.name)

    @property
    def type_name(self) -> str:
        return type(self.op).__name__

    def with_op(self, op) -> Node:
        return replace(self, op=op)

    def output_dtype(self, index: int = 0) -> str:
        """The dtype of output ``index`` as captured ("float32" for nodes a pass made)."""
        dtypes = self.meta.get("dtypes") or ()
        return dtypes[index] if index < len(dtypes) else "float32"

    def input_dtype(self, index: int) -> str:
        """The dtype of input ``index``, from the recorded call."""
        if index < len(self.in_tensors) and getattr(self.in_tensors[index], "dtype", None) is not None:
            return str(self.in_tensors[index].dtype)
        return "float32"


def is_float_dtype(dtype: str) -> bool:
    """Floating-point tensors are quantized; integer and boolean ones never are."""
    return "float" in str(dtype)


def constant_operands(node: Node) -> list | None:
    """The operands of a binary keras.ops node with one tensor and one constant, on float32 tensors.

    The tensor comes back as None and the constant as a float32 array; None for
    anything else: two tensors (their layouts need matching, which a layer
    does), keyword arguments, or a constant that is not exactly a float32
    (Keras would then compute in a wider type).
    """
    import keras
    import numpy as np

    args = node.arguments.args if node.arguments is not None else ()
    if node.arguments is None or node.arguments.kwargs or len(args) != 2:
        return None
    if node.meta.get("dtypes", ("float32",))[0] != "float32":
        return None  # a float64 constant makes Keras compute in float64
    out = []
    for a in args:
        if isinstance(a, keras.KerasTensor):
            out.append(None)
        else:
            try:
                value = np.asarray(a)
                as32 = value.astype(np.float32)
            except (TypeError, ValueError):
                return None
            if not np.array_equal(as32, value):
                return None  # not exactly a float32: Keras would compute in a wider type
            out.append(as32)
    return out if sum(o is None for o in out) == 1 else None


# Layers with a kernel, and a fused activation: conv of every rank and kind, and Dense.
KERNEL_LAYERS = (
    "Conv1D",
    "Conv2D",
    "Conv3D",
    "DepthwiseConv1D",
    "DepthwiseConv2D",
    "SeparableConv1D",
    "SeparableConv2D",
    "Conv1DTranspose",
    "Conv2DTranspose",
    "Conv3DTranspose",
    "Dense",
)


@dataclass(frozen=True)
class Graph:
    """Nodes in topological order, with the model's inputs and outputs."""

    nodes: tuple[Node, ...]
    inputs: tuple[TensorRef, ...]
    outputs: tuple[TensorRef, ...]
    name: str = "model"
    # How the model nests its inputs and outputs (dicts, with their keys; tuples): (inputs, outputs), each
    # the model's own structure with every tensor replaced by its index in ``inputs`` or ``outputs``; None
    # where both are plain (one tensor, or a flat list of them), as `rebuild` makes them anyway.
    structure: tuple[Any, Any] | None = None

    def __post_init__(self):
        object.__setattr__(self, "_by_name", {n.name: n for n in self.nodes})

    def node(self, name: str) -> Node:
        return self._by_name[name]

    def nested_outputs(self, flat: list):
        """``flat`` (one value per output, in ``outputs`` order) nested as the model returns its outputs."""
        if self.structure is None:
            return flat[0] if len(flat) == 1 else list(flat)
        import keras

        return keras.tree.map_structure(lambda i: flat[i], self.structure[1])

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def consumers(self, ref: TensorRef) -> list[Node]:
        return [n for n in self.nodes if ref in n.inputs]

    def producers(self, node: Node) -> list[Node]:
        return [self._by_name[r.node] for r in node.inputs]

    def depth(self) -> int:
        """Nodes on the longest path from an input to an output (the depth Keras walks recursively)."""
        longest: dict[str, int] = {}
        for n in self.nodes:
            longest[n.name] = 1 + max((longest[r.node] for r in n.inputs), default=0)
        return max(longest.values(), default=0)

    def layers(self) -> list[Any]:
        """Distinct Keras layers (shared layers once), in order of first use."""
        seen, out = set(), []
        for n in self.nodes:
            if id(n.op) not in seen:
                seen.add(id(n.op))
                out.append(n.op)
        return out


def unique_name(name: str, taken: set[str], sep: str = "_") -> str:
    """``name``, or ``name<sep>1``, ``name<sep>2``, ... if taken; the result is added to ``taken``."""
    base, k = name, 1
    while name in taken:
        name = f"{base}{sep}{k}"
        k += 1
    taken.add(name)
    return name


def taken_names(graph: Graph, *models) -> set[str]:
    """Every node and layer name in ``graph`` and every operation name in ``models``.

    Layers and models qstrat makes take names outside this set, so they never
    collide with the user's names, whatever those are.
    """
    names = {n.name for n in graph.nodes} | {n.layer_name for n in graph.nodes} | {graph.name}
    for model in models:
        names.add(model.name)
        names.update(op.name for op in model.operations)
    return names


def views(graph: Graph):
    """The graph's nodes as `LayerView`s for strategy matching (inputs linked)."""
    from qstrat.strategy.match import NodeView

    built: dict[str, NodeView] = {}
    for n in graph.nodes:
        built[n.name] = NodeView(n.name, n.op, tuple(built[r.node] for r in n.inputs), n.meta.get("origin"))
    return list(built.values())
