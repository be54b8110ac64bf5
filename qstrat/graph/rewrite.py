"""Editing a `Graph` without mutating it: an `Editor` collects changes, `.graph()` returns the result.

Optimize passes use it to replace a node's operation, bypass a node (its
consumers read its input instead), insert new nodes after an existing one and
drop nodes. Node order stays topological: inserted nodes go right after their
anchor, and a replacement takes its original's place.

Nodes made here have no recorded call (``arguments=None``) and are replayed as
``op(x)`` or ``op([x1, x2, ...])``; their ``in_tensors`` are symbolic tensors
that only carry the input shapes.
"""

from __future__ import annotations

from dataclasses import replace

from qstrat.graph.ir import Graph, Node, TensorRef, unique_name


def symbolic(shape, dtype="float32"):
    """A symbolic tensor that only records a shape (``in_tensors`` of a new node)."""
    import keras

    return keras.KerasTensor(tuple(shape), dtype=dtype)


def layer_from_config(cls, config: dict, fill_zeros: bool = False):
    """``cls.from_config(config)`` (`unfilled` with ``fill_zeros``). A config Keras cannot make a layer from
    (an activation that is a plain, unregistered function) is the user's model's, said plainly: an
    `UnsupportedModelError` naming the layer, the cause and the fix."""
    from qstrat.graph.capture import UnsupportedModelError

    try:
        return unfilled(cls, config) if fill_zeros else cls.from_config(config)
    except Exception as exc:  # noqa: BLE001 - any failure here is the layer's config
        raise UnsupportedModelError(
            f"cannot make layer '{config.get('name')}' ({cls.__name__}) from its config: {type(exc).__name__}: "
            f"{exc}. qstrat rebuilds every layer with from_config(get_config()): register custom functions and "
            "classes with @keras.saving.register_keras_serializable() (or pass them in Quantizer's custom_objects, "
            "by the name the config gives), and make the layer's get_config() return every __init__ argument."
        ) from None


def built_layer(cls, config: dict, input_shape=None, weights=None):
    """A layer made from ``config`` (`layer_from_config`); built for ``input_shape`` and loaded with ``weights``
    when given."""
    layer = layer_from_config(cls, config, fill_zeros=weights is not None)
    if weights is None:
        return layer
    layer.build(tuple(input_shape))
    layer.set_weights([w for w in weights])
    refill(layer)
    return layer


class _Held:
    """A plain holder (Keras does not track what it holds)."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


def unfilled(cls, config: dict):
    """``cls.from_config(config)``, but its variables start at zero when it is built.

    For a layer whose every value is set right after it is built: drawing
    random initial values costs seconds on a large model. `refill` puts the
    config's own initializers back (so the layer's config is unchanged). A
    layer that refuses zero initializers is made from its config as it is.
    """
    keys = [k for k, v in config.items() if k.endswith("_initializer") and v is not None]
    if not keys:
        return cls.from_config(config)
    try:
        layer = cls.from_config({**config, **dict.fromkeys(keys, "zeros")})
    except Exception:  # noqa: BLE001 - the layer's own config below
        return cls.from_config(config)
    layer._qstrat_initializers = _Held({k: config[k] for k in keys})
    return layer


def refill(layer) -> None:
    """Give a layer made by `unfilled` its config's initializers back (once it holds its values)."""
    import keras

    held = getattr(layer, "_qstrat_initializers", None)
    if held is None:
        return
    del layer._qstrat_initializers
    for key, value in held.value.items():
        # A recurrent layer's initializers are read-only views of its cell's: set them there.
        for owner in (layer, getattr(layer, "cell", None)):
            if owner is None or not hasattr(owner, key):
                continue
            try:
                setattr(owner, key, keras.initializers.get(value))
                break
            except AttributeError:
                continue


class Editor:
    """A mutable working copy of a graph's node list; the input graph is never changed."""

    def __init__(self, graph: Graph):
        self.nodes: list[Node] = list(graph.nodes)
        self.inputs = graph.inputs
        self.outputs: list[TensorRef] = list(graph.outputs)
        self.name = graph.name
        self.structure = graph.structure
        self._names = {n.name for n in graph.nodes} | {n.layer_name for n in graph.nodes}

    # ---- reading -----------------------------------------------------------------------------

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def walk(self):
        """The nodes in order, each as it is now (edits made while walking are seen)."""
        for name in [n.name for n in self.nodes]:
            if any(n.name == name for n in self.nodes):
                yield self.node(name)

    def consumers(self, name: str) -> list[Node]:
        """Nodes that read any output of node ``name``."""
        return [n for n in self.nodes if any(r.node == name for r in n.inputs)]

    def sole_consumer(self, name: str) -> Node | None:
        """The only node reading ``name`` (reading it once), unless ``name`` is also a model output."""
        if any(r.node == name for r in self.outputs):
            return None
        users = self.consumers(name)
        if len(users) != 1 or sum(r.node == name for r in users[0].inputs) != 1:
            return None
        return users[0]

    def calls(self, op) -> list[Node]:
        """Every node calling ``op`` (more than one for a shared layer)."""
        return [n for n in self.nodes if n.op is op]

    def unique(self, name: str) -> str:
        """``name``, or ``name_1``, ``name_2``, ... if a node or layer has it already."""
        return unique_name(name, self._names)

    # ---- editing -----------------------------------------------------------------------------

    def replace(self, name: str, new: Node) -> None:
        """Put ``new`` where node ``name`` is; uses of ``name`` are renamed to ``new.name``."""
        i = self._index(name)
        self.nodes[i] = new
        self._names.add(new.name)
        if new.name != name:
            for k in range(new.num_outputs):
                self.redirect(TensorRef(name, k), TensorRef(new.name, k))

    def insert_after(self, anchor: str, *new: Node) -> None:
        i = self._index(anchor)
        self.nodes[i + 1 : i + 1] = list(new)
        self._names.update(n.name for n in new)

    def redirect(self, old: TensorRef, new: TensorRef, skip: set[str] | frozenset = frozenset()) -> None:
        """Every reader of ``old`` (nodes and model outputs) reads ``new`` instead, except nodes in ``skip``."""
        for i, n in enumerate(self.nodes):
            if n.name not in skip and old in n.inputs:
                self.nodes[i] = replace(n, inputs=tuple(new if r == old else r for r in n.inputs))
        self.outputs = [new if r == old else r for r in self.outputs]

    def bypass(self, name: str) -> None:
        """Drop a one-input node; its readers read its input."""
        node = self.node(name)
        self.redirect(TensorRef(name, 0), node.inputs[0])
        self.remove(name)

    def remove(self, name: str) -> None:
        self.nodes.pop(self._index(name))

    def graph(self) -> Graph:
        return Graph(tuple(self.nodes), self.inputs, tuple(self.outputs), self.name, self.structure)

    def _index(self, name: str) -> int:
        for i, n in enumerate(self.nodes):
            if n.name == name:
                return i
        raise KeyError(name)


def new_node(name: str, op, inputs, input_shapes, num_outputs: int = 1, meta: dict | None = None) -> Node:
    """A node made by a pass, replayed as ``op(x)`` (or ``op([...])`` with several inputs)."""
    return Node(
        name,
        op,
        tuple(inputs),
        None,
        tuple(symbolic(s) for s in input_shapes),
        num_outputs,
        dict(meta or {}),
    )
