"""`Graph` -> Keras model, replaying every node's recorded call on new tensors.

``copy_layers=True`` gives the new model its own layers (built from each
layer's config, with its weights copied), so nothing done to the new model
can touch the user's float model. Layers shared by several nodes stay
shared: one copy each.
"""

from __future__ import annotations

from collections.abc import Callable

from qstrat.graph.ir import Graph, Node, TensorRef


def copy_layer(layer, input_shape=None):
    """A new layer with the same config and weights.

    With ``input_shape`` the copy is built and loaded at once; without it, its
    weights (listed in the same order) go in right after its first call in
    `rebuild`, which builds it.
    """
    import keras

    if not isinstance(layer, keras.layers.Layer):
        return layer  # a keras.ops operation holds no state
    clone = layer.__class__.from_config(layer.get_config())
    if layer.weights:
        if input_shape is not None:
            clone.build(input_shape)
            clone.set_weights(layer.get_weights())
        else:
            clone._qstrat_pending_weights = layer.get_weights()
    return clone


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
    import keras

    copies: dict[int, object] = {}

    def default_op(node: Node):
        if not copy_layers or type(node.op).__name__ == "InputLayer":
            return node.op
        if id(node.op) not in copies:
            copies[id(node.op)] = copy_layer(node.op)
        return copies[id(node.op)]

    op_for = op_for or default_op
    tensors: dict = {}
    model_inputs = []
    for node in graph.nodes:
        if type(node.op).__name__ == "InputLayer" and not node.inputs:
            spec = node.op.output
            t = keras.Input(batch_shape=spec.shape, dtype=spec.dtype, name=node.op.name)
            tensors[(node.name, 0)] = t
            continue
        op = op_for(node)
        new_in = [tensors[(r.node, r.index)] for r in node.inputs]
        if node.arguments is not None:
            args, kwargs = node.arguments.fill_in({id(t): n for t, n in zip(node.in_tensors, new_in, strict=True)})
            out = op(*args, **kwargs)
        else:
            out = op(new_in[0] if len(new_in) == 1 else new_in)
        pending = getattr(op, "_qstrat_pending_weights", None)
        if pending is not None:
            op.set_weights(pending)
            del op._qstrat_pending_weights
        outs = list(out) if isinstance(out, (list, tuple)) else [out]
        for i, t in enumerate(outs):
            tensors[(node.name, i)] = t
    inputs_by_name = {r.node: tensors[(r.node, 0)] for r in graph.inputs}
    model_inputs = [inputs_by_name[r.node] for r in graph.inputs]
    outputs = [tensors[(r.node, r.index)] for r in (graph.outputs if outputs is None else outputs)]
    return keras.Model(
        model_inputs if len(model_inputs) > 1 else model_inputs[0],
        outputs if len(outputs) > 1 else outputs[0],
        name=name or graph.name,
    )
