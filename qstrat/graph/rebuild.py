"""`Graph` -> Keras model, replaying every node's recorded call on new tensors.

``copy_layers=True`` gives the new model its own layers (built from each
layer's config, with its full state copied: weights, adapted statistics,
assets), so nothing done to the new model can touch the user's float model. Layers shared by several nodes stay
shared: one copy each.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Callable, Iterator

import numpy as np

from qstrat.arrays import to_numpy
from qstrat.graph.ir import Graph, Node, TensorRef
from qstrat.graph.rewrite import layer_from_config, refill


def _clone(layer, dtype: str | None = None, fill_zeros: bool = False):
    """A new, unbuilt layer of the same class and config (``dtype``: another dtype policy).

    ``fill_zeros``: its variables start at zero (their values are about to be replaced; see `unfilled`).
    """
    import keras

    if type(layer) is keras.layers.Lambda:
        # A Lambda's config holds its function as bytecode, which Keras refuses to
        # deserialize by default; the layer is in memory, so make one around the same function.
        return keras.layers.Lambda(
            layer.function,
            output_shape=layer._output_shape,
            mask=layer.mask,
            arguments=dict(layer.arguments),
            name=layer.name,
            dtype=dtype or layer.dtype_policy,
        )
    config = layer.get_config()
    if dtype is not None:
        config["dtype"] = dtype
    return layer_from_config(layer.__class__, config, fill_zeros)


def has_state(layer) -> bool:
    """Whether a layer carries state to copy: variables, or assets (a vocabulary, say)."""
    return bool(layer.weights) or any(hasattr(sub, "save_assets") for sub in layer._flatten_layers())


def copy_state(src, dst) -> None:
    """Copy a built layer's full state into a built copy of it.

    Each (sub)layer's own variables go through ``save_own_variables`` /
    ``load_own_variables``, as ``.keras`` saving does, so state that lives
    outside the variables is rebuilt too (an adapted Normalization recomputes
    its mean and variance in ``load_own_variables``); assets go through a
    temporary folder. Values are cast to the copy's variable dtypes.
    """
    srcs, dsts = list(src._flatten_layers()), list(dst._flatten_layers())
    if len(srcs) != len(dsts):
        dst.set_weights(src.get_weights())
        for sub in dsts:
            if hasattr(sub, "finalize_state"):
                sub.finalize_state()
        return
    for a, b in zip(srcs, dsts, strict=True):
        store: dict = {}
        a.save_own_variables(store)
        # Copies, never the source's buffers: on JAX a shared buffer is deleted when one
        # model's predict donates it, which would break the user's model.
        store = {k: np.array(to_numpy(v)) for k, v in store.items()}
        if store or b._trainable_variables or b._non_trainable_variables:
            b.load_own_variables(store)
        if hasattr(a, "save_assets") and hasattr(b, "load_assets"):
            import tempfile

            with tempfile.TemporaryDirectory(prefix="qstrat-assets-") as folder:
                a.save_assets(folder)
                b.load_assets(folder)


class _Source:
    """Holds the layer a copy takes its state from (a plain object, so Keras does not track it as a sublayer)."""

    __slots__ = ("layer",)

    def __init__(self, layer):
        self.layer = layer


def copy_layer(layer, input_shape=None, dtype: str | None = None):
    """A new layer with the same config and the same full state (weights, adapted statistics).

    With ``input_shape`` the copy is built and loaded at once; without it, its
    state goes in right after its first call in `rebuild`, which builds it.
    ``dtype`` gives the copy another dtype policy ("float16", ...); weights are cast.
    """
    import keras

    if not isinstance(layer, keras.layers.Layer):
        return layer  # a keras.ops operation holds no state
    clone = _clone(layer, dtype, fill_zeros=has_state(layer))
    if has_state(layer):
        if input_shape is not None:
            clone.build(input_shape)
            copy_state(layer, clone)
            refill(clone)
        else:
            clone._qstrat_pending_state = _Source(layer)
    return clone


def built_copy(layer, dtype: str | None = None):
    """`copy_layer`, built at once with the shapes ``layer`` was built with (its build config)."""
    clone = _clone(layer, dtype, fill_zeros=has_state(layer))
    clone.build_from_config(layer.get_build_config())
    if has_state(layer):
        copy_state(layer, clone)
        refill(clone)
    return clone


def load_pending(op) -> None:
    """Give every layer copied without a shape (here or inside a wrapper) its state, now that it is built."""
    import keras

    if not isinstance(op, keras.layers.Layer):
        return
    for sub in op._flatten_layers():
        src = getattr(sub, "_qstrat_pending_state", None)
        if src is not None:
            del sub._qstrat_pending_state
            copy_state(src.layer, sub)
            refill(sub)


def copier() -> Callable[[Node], object]:
    """An ``op_for`` that gives each layer one copy (see `copy_layer`); Keras inputs and plain ops stay."""
    copies: dict[int, object] = {}

    def op_for(node: Node):
        if type(node.op).__name__ == "InputLayer":
            return node.op
        if id(node.op) not in copies:
            copies[id(node.op)] = copy_layer(node.op)
        return copies[id(node.op)]

    return op_for


def needed(graph: Graph, outputs, known=()) -> set[str]:
    """The nodes that compute ``outputs`` from the graph's inputs, or from the tensors ``known`` where given."""
    known = set(known)
    need, stack = set(), [r for r in outputs if r not in known]
    while stack:
        ref = stack.pop()
        if ref.node not in need:
            need.add(ref.node)
            stack.extend(r for r in graph.node(ref.node).inputs if r not in known)
    return need


def replay(graph: Graph, op_for: Callable[[Node], object], inputs, outputs, on_call=None) -> list:
    """The tensors ``outputs`` of ``graph`` computed from ``inputs``: one tensor per ``graph.inputs``, or
    ``{TensorRef: tensor}`` for any tensors of the graph. Every node they need calls ``op_for(node)`` with the
    node's recorded arguments, in order.

    On Keras inputs this builds a model's graph (`rebuild`); on backend tensors
    inside a traced function it is the computation itself, with no Keras model
    built around it. ``on_call(op)`` runs after each call.
    """
    if not isinstance(inputs, dict):
        inputs = dict(zip(graph.inputs, inputs, strict=True))
    tensors: dict = {(r.node, r.index): t for r, t in inputs.items()}
    need = needed(graph, outputs, inputs)
    for node in graph.nodes:
        if node.name not in need:
            continue
        op = op_for(node)
        outs = call_node(node, op, [tensors[(r.node, r.index)] for r in node.inputs])
        if on_call is not None:
            on_call(op)
        for i, t in enumerate(outs):
            tensors[(node.name, i)] = t
    return [tensors[(r.node, r.index)] for r in outputs]


def call_node(node: Node, op, inputs: list) -> list:
    """``op`` called as ``node`` was, on ``inputs`` (one per ``node.inputs``); its outputs as a list."""
    if node.arguments is not None:
        args, kwargs = node.arguments.fill_in({id(t): n for t, n in zip(node.in_tensors, inputs, strict=True)})
        if "mask" in kwargs and getattr(op, "_call_has_mask_arg", True) is False:
            # Keras passes ``mask`` to a layer whose call takes it (a QuantizeWrapper's does); a layer standing
            # in for it without one (the frozen copy's wrapped layer) gets its mask from its input as Keras does.
            del kwargs["mask"]
        out = op(*args, **kwargs)
    else:
        out = op(inputs[0] if len(inputs) == 1 else inputs)
    return list(out) if isinstance(out, (list, tuple)) else [out]


def run_graph(graph: Graph, inputs: list, outputs, symbolic: bool) -> list:
    """``graph``'s tensors ``outputs`` from ``inputs``: by its own layers on backend tensors (a traced probe
    only reads them), by copies of them on Keras inputs (a call there is recorded in the layer)."""
    if symbolic:
        return replay(graph, copier(), inputs, outputs, on_call=load_pending)
    return replay(graph, lambda node: node.op, inputs, outputs)


def input_tensors(graph: Graph) -> list:
    """New Keras inputs like the graph's (shape, dtype, name), in its order."""
    import keras

    specs = [graph.node(r.node).op.output for r in graph.inputs]
    return [
        keras.Input(batch_shape=t.shape, dtype=t.dtype, name=graph.node(r.node).op.name)
        for r, t in zip(graph.inputs, specs, strict=True)
    ]


def rebuild(
    graph: Graph,
    op_for: Callable[[Node], object] | None = None,
    copy_layers: bool = True,
    name=None,
    outputs: list[TensorRef] | None = None,
):
    """Build a Keras model from ``graph``.

    Args:
        op_for: maps a node to the operation to call (default: its own op, or a
            copy of it when ``copy_layers``).
        copy_layers: give the model fresh copies of the layers.
        outputs: tensors to output instead of the graph's outputs (a probe).
    """
    op_for = op_for or (copier() if copy_layers else (lambda node: node.op))
    inputs = input_tensors(graph)
    outs = replay(graph, op_for, inputs, graph.outputs if outputs is None else outputs, on_call=load_pending)
    nested_in = inputs if len(inputs) > 1 else inputs[0]
    nested_out = outs if len(outs) > 1 else outs[0]
    if graph.structure is not None and outputs is None:  # the model's own dicts and tuples, keys and order
        import keras

        skeleton_in, skeleton_out = graph.structure
        assert sorted(keras.tree.flatten(skeleton_out)) == list(range(len(outs))), "the outputs changed in number"
        nested_in = keras.tree.map_structure(lambda i: inputs[i], skeleton_in)
        nested_out = graph.nested_outputs(outs)
    with warnings.catch_warnings():
        # Inputs keyed other than by their names: Keras warned the user when the float model was built.
        warnings.filterwarnings("ignore", message="When providing `inputs` as a dict")
        return functional_model(nested_in, nested_out, name=name or graph.name, layers=len(graph.nodes))


@contextlib.contextmanager
def float32_policy() -> Iterator[None]:
    """Keras' global dtype policy at float32 for the body of a public entry point, then as it was.

    Every layer qstrat makes (quantizers, wrappers, the layers a pass writes) gets the global policy unless
    told otherwise: under ``mixed_float16`` a bias at position 23 would not fit its float16 grid (NaN), and
    under ``float64`` the layers would not take each other's tensors. A ``with`` block, not a decorator: it
    adds no frame between the user's call and qstrat's warnings, which name the user's line.
    """
    import keras

    before = keras.config.dtype_policy()
    if before.name == "float32":
        yield
        return
    keras.config.set_dtype_policy("float32")
    try:
        yield
    finally:
        keras.config.set_dtype_policy(before)


# Frames Keras and its callers use besides one per layer, with room to spare.
_FRAME_MARGIN = 1000


@contextlib.contextmanager
def recursion_room(layers: int) -> Iterator[None]:
    """Room on the Python stack for Keras to walk a graph of ``layers`` layers.

    Keras maps a functional graph (when it builds a model, and when it loads
    one) with a recursive walk: one Python frame per layer on the longest path.
    A quantized model is deeper than its float model (a FakeQuant after most
    layers), so a float model of ~700 layers in a chain can give a quantized
    one that passes Python's default limit of 1000. The limit is raised for
    the walk and put back after.
    """
    before = sys.getrecursionlimit()
    need = 2 * layers + _FRAME_MARGIN
    if need > before:
        sys.setrecursionlimit(need)
    try:
        yield
    finally:
        sys.setrecursionlimit(before)


def functional_model(inputs, outputs, name: str, layers: int | None = None):
    """``keras.Model(inputs, outputs)``, with room for deep graphs (``layers``: a bound on its depth)."""
    import keras

    if layers is None:
        layers = _count_operations(outputs)
    with recursion_room(layers):
        return keras.Model(inputs, outputs, name=name)


def _count_operations(outputs) -> int:
    """How many operations lead to ``outputs`` (an iterative walk of their Keras history)."""
    import keras

    seen: set[int] = set()
    stack = list(keras.tree.flatten(outputs))
    while stack:
        history = getattr(stack.pop(), "_keras_history", None)
        if history is None or id(history.operation) in seen:
            continue
        seen.add(id(history.operation))
        node = history.operation._inbound_nodes[history.node_index]
        stack.extend(keras.tree.flatten(node.input_tensors))
    return len(seen)
