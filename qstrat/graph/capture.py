"""Keras model -> `Graph`: Sequential and Functional models, nested models inlined.

Covers multi-input and multi-output models, layers called more than once
(one node per call), nested functional or Sequential sub-models (their nodes
are spliced in, so every layer is visible to the passes) and keras.ops
operations written inside a functional model (they are nodes like layers).
Subclassed models have no graph to read: they get an error that says what to do.

This reads Keras' recorded call graph (``_nodes_by_depth``, node arguments),
which is private API; tests pin the behaviour on every backend.
"""

from __future__ import annotations

from qstrat.errors import QstratError
from qstrat.graph.ir import Graph, Node, TensorRef, unique_name


class UnsupportedModelError(QstratError, TypeError):
    """The model cannot be captured as a graph (a subclassed model, say)."""


def _functional(model):
    """The Functional behind a model, or None (Sequential keeps one in ``_functional``)."""
    import keras

    if type(model).__name__ == "Sequential" or isinstance(model, keras.Sequential):
        inner = getattr(model, "_functional", None)
        if inner is None:
            raise UnsupportedModelError(
                f"the Sequential model '{model.name}' has no input shape yet, so it has no graph. "
                "Start it with keras.Input(shape=...) or call model.build(input_shape) first."
            )
        return inner
    from keras.src.models.functional import Functional

    if isinstance(model, Functional) and type(model).call is Functional.call:
        return model
    return None


def _check_model(model) -> None:
    import keras

    if not isinstance(model, keras.Model):
        raise UnsupportedModelError(f"expected a keras.Model, got {type(model).__name__}.")
    if _functional(model) is None:
        raise UnsupportedModelError(
            f"'{model.name}' is a subclassed model ({type(model).__name__} overrides call()), so qstrat cannot "
            "see its layers. Rebuild it as a functional model, e.g.\n"
            "    inputs = keras.Input(shape=...)\n"
            "    outputs = <the same layers, called in call()'s order>(inputs)\n"
            "    model = keras.Model(inputs, outputs)\n"
            "and copy the weights over with model.set_weights(old.get_weights())."
        )


class _Capture:
    def __init__(self):
        self.nodes: list[Node] = []
        self.names: set[str] = set()

    def unique(self, name: str) -> str:
        return unique_name(name, self.names, sep="@")

    def run(self, model, feed: dict[int, TensorRef] | None) -> list[TensorRef]:
        """Add the nodes of ``model``; ``feed`` maps its input tensors to outer refs (nested)."""
        fn = _functional(model)
        refs: dict[int, TensorRef] = dict(feed or {})
        for depth in sorted(fn._nodes_by_depth, reverse=True):
            for knode in fn._nodes_by_depth[depth]:
                op = knode.operation
                if type(op).__name__ == "InputLayer":
                    tensor = knode.outputs[0]
                    if id(tensor) in refs:
                        continue  # a nested model's input: fed from outside
                    name = self.unique(op.name)
                    self.nodes.append(
                        Node(name, op, (), meta={"dtypes": (str(tensor.dtype),), "shapes": (tuple(tensor.shape),)})
                    )
                    refs[id(tensor)] = TensorRef(name, 0)
                    continue
                ins = list(knode.input_tensors)
                missing = [t for t in ins if id(t) not in refs]
                if missing:
                    raise UnsupportedModelError(
                        f"'{op.name}' reads a tensor that is not computed from the model inputs."
                    )
                in_refs = [refs[id(t)] for t in ins]
                import keras

                if isinstance(op, keras.Model):
                    _check_model(op)
                    inner_fn = _functional(op)
                    fed = _fed_inputs(op, inner_fn, knode, refs)
                    inner_feed = {id(t): r for t, r in zip(inner_fn.inputs, fed, strict=True)}
                    inner_out = self.run(op, inner_feed)
                    for t, r in zip(knode.outputs, inner_out, strict=True):
                        refs[id(t)] = r
                    continue
                name = self.unique(op.name)
                meta = {
                    "dtypes": tuple(str(t.dtype) for t in knode.outputs),
                    "shapes": tuple(tuple(t.shape) for t in knode.outputs),
                }
                self.nodes.append(Node(name, op, tuple(in_refs), knode.arguments, tuple(ins), len(knode.outputs), meta))
                for i, t in enumerate(knode.outputs):
                    refs[id(t)] = TensorRef(name, i)
        return [refs[id(t)] for t in fn.outputs]


def capture(model) -> Graph:
    """Read a Sequential or Functional Keras model into a `Graph` (the model is not changed).

    Example:
        >>> g = capture(model)
        >>> [n.name for n in g.nodes]
        ['input_layer', 'conv1', 'relu', ...]
    """
    _check_model(model)
    cap = _Capture()
    outputs = cap.run(model, None)
    inputs = tuple(TensorRef(n.name, 0) for n in cap.nodes if type(n.op).__name__ == "InputLayer")
    fn = _functional(model)
    order = [t._keras_history.operation.name for t in fn.inputs]
    inputs = tuple(sorted(inputs, key=lambda r: order.index(r.node) if r.node in order else len(order)))
    return Graph(tuple(cap.nodes), inputs, tuple(outputs), model.name, _structure(fn, inputs, len(outputs)))


def _plain(struct) -> bool:
    """One tensor, or a flat list of them: what `rebuild` makes without a recorded structure."""
    return not isinstance(struct, (dict, tuple, list)) or (
        isinstance(struct, list) and not any(isinstance(s, (dict, tuple, list)) for s in struct)
    )


def _structure(fn, inputs: tuple[TensorRef, ...], outputs: int):
    """``fn``'s nesting of its inputs and outputs as `Graph.structure`, or None where both are plain."""
    import keras

    ins, outs = getattr(fn, "_inputs_struct", None), getattr(fn, "_outputs_struct", None)
    if ins is None or outs is None or (_plain(ins) and _plain(outs)):
        return None
    order = [r.node for r in inputs]
    skeleton_in = keras.tree.map_structure(lambda t: order.index(t._keras_history.operation.name), ins)
    return skeleton_in, keras.tree.pack_sequence_as(outs, list(range(outputs)))


def _fed_inputs(model, inner_fn, knode, refs) -> list:
    """What a nested model's call feeds each of its inputs, in their order, matched as Keras matches them (a dict
    by input name, extra keys left out); refused where Keras would also squeeze, expand or cast what it reads."""
    import keras

    args = getattr(knode.arguments, "args", None) or ()
    given = args[0] if args else None
    if isinstance(given, dict):
        names = [t.name for t in inner_fn.inputs]
        absent = [n for n in names if n not in given]
        if absent:
            raise UnsupportedModelError(
                f"nested model '{model.name}' is called with a dict without the key(s) {', '.join(absent)}: "
                f"its inputs are {', '.join(names)}. Call it with a dict keyed by its input names, or a list."
            )
        tensors = [given[n] for n in names]
    else:
        tensors = list(knode.input_tensors)
    if len(tensors) != len(inner_fn.inputs):
        raise UnsupportedModelError(
            f"nested model '{model.name}' is called with {len(tensors)} tensor(s) for its {len(inner_fn.inputs)} "
            "input(s). Call it with exactly one tensor per input."
        )
    for outer, inner in zip(tensors, inner_fn.inputs, strict=True):
        if len(outer.shape) != len(inner.shape) or keras.backend.standardize_dtype(
            outer.dtype
        ) != keras.backend.standardize_dtype(inner.dtype):
            raise UnsupportedModelError(
                f"nested model '{model.name}': input '{_layer_name(inner)}' is {inner.dtype} of rank {len(inner.shape)}, "
                f"and the call feeds it {outer.dtype} of rank {len(outer.shape)}; Keras squeezes, expands or "
                "casts it on the way in, which qstrat does not replay. Reshape or cast it in the outer model "
                "before the call (keras.layers.Reshape, keras.ops.cast)."
            )
    return [refs[id(t)] for t in tensors]


def _layer_name(tensor) -> str:
    """The name of the InputLayer that makes ``tensor`` (what the user named it), else the tensor's."""
    history = getattr(tensor, "_keras_history", None)
    return getattr(getattr(history, "operation", None), "name", None) or tensor.name
