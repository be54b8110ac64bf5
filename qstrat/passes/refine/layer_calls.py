"""Run a graph's nodes one layer at a time, eagerly, as bias correction's walk does; on JAX each layer compiled.

On JAX an eager call compiles every operation apart (hundreds of compiles
for a MobileNetV2). There `LayerCalls` runs each layer that holds variables
as one compiled function, with its variables passed in, so a layer whose
variables change (a corrected bias) needs no new compile, and layers that
compute alike (the same class and config but for the name, and the same
variable names, shapes and dtypes: `LayerCalls._key`) share one.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import keras

from qstrat.graph.ir import Node
from qstrat.graph.rebuild import call_node
from qstrat.layers import FakeQuant, QuantizeWrapper

L = keras.layers
# The layers whose computation their config and variables fully give: the layers bias correction corrects.
SHARED = (
    L.Conv1D,
    L.Conv2D,
    L.Conv3D,
    L.DepthwiseConv1D,
    L.DepthwiseConv2D,
    L.Conv1DTranspose,
    L.Conv2DTranspose,
    L.Conv3DTranspose,
    L.Dense,
)


class LayerCalls:
    """Calls each node's layer on its inputs. On JAX an eager call compiles every operation apart (hundreds
    of compiles for a MobileNetV2); there each layer runs as one compiled function, with its variables
    passed in, so a corrected bias needs no new compile, and layers that compute alike share theirs
    (`_key`). (Every layer here is traceable: calibration has already run the model in a traced function.)"""

    def __init__(self):
        self.jax = keras.backend.backend() == "jax"
        self.compiled: dict[object, Callable] = {}

    @staticmethod
    def _key(node: Node, op) -> object:
        """What a compiled function is kept under: what the layer computes, whatever its name.

        - a FakeQuant: its quantizer and state shapes;
        - a QuantizeWrapper of a Keras conv or dense layer (`SHARED`), or such a layer: its class and config
          without names (nor the wrapper's shared-state keys and recorded corrections, which compute nothing),
          in their order, its variables' names, shapes and dtypes, in their order (the compiled function maps
          another layer's variables onto the first one's by position), and its call's arguments, each tensor
          by which of the layer's inputs it is, everything else only if a plain Python constant;
        - any other layer: itself. Another Keras layer may compute from more than its config and variables
          (an adapted Normalization keeps its statistics as plain tensors), and a custom one may too.
        """
        if isinstance(op, FakeQuant):
            return (json.dumps(op.quantizer_spec, sort_keys=True), tuple(tuple(v.shape) for v in op.variables))
        inner = op.layer if isinstance(op, QuantizeWrapper) else op
        call = _call_key(node)
        if type(inner) not in SHARED or call is None:
            return id(op)
        config = {k: v for k, v in op.get_config().items() if k not in ("name", "shared_states", "corrections")}
        if "layer" in config:  # the wrapped layer's, without its name
            config["layer"] = {**config["layer"], "config": {**config["layer"].get("config", {}), "name": None}}
        return (
            type(op).__name__,
            json.dumps(config, default=repr),
            tuple((v.name, tuple(v.shape), str(v.dtype)) for v in op.variables),
            call,
        )

    def __call__(self, node: Node, args: list) -> list:
        op = node.op
        if not self.jax or not isinstance(op, keras.layers.Layer) or not op.variables:
            return call_node(node, op, args)
        import jax

        key = self._key(node, op)
        fn = self.compiled.get(key)
        if fn is None:
            variables = list(op.variables)

            def run(values, xs):
                with keras.StatelessScope(state_mapping=list(zip(variables, values, strict=True))):
                    return call_node(node, op, xs)

            fn = self.compiled[key] = jax.jit(run)
        return fn([v.value for v in op.variables], args)


def _call_key(node: Node) -> str | None:
    """The node's call arguments, each tensor as which of its inputs it is (the first place it appears), every
    other argument as its repr if a plain Python constant; None if some argument is anything else."""
    if node.arguments is None:
        return ""
    which: dict[int, int] = {}
    for t in node.in_tensors:
        which.setdefault(id(t), len(which))
    plain = []

    def leaf(a):
        if id(a) in which:
            return f"<input {which[id(a)]}>"
        plain.append(a is None or type(a) in (bool, int, float, str))
        return repr(a)

    try:
        call = keras.tree.map_structure(leaf, (node.arguments.args, node.arguments.kwargs))
    except (TypeError, ValueError):  # arguments keras.tree cannot walk
        return None
    return repr(call) if all(plain) else None
