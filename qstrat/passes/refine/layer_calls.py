"""Run a graph's nodes one layer at a time, eagerly, as bias correction's walk does; on JAX each layer compiled.

On JAX an eager call compiles every operation apart (hundreds of compiles
for a MobileNetV2). There `LayerCalls` runs each layer that holds variables
as one compiled function, with its variables passed in, so a layer whose
variables change (a corrected bias) needs no new compile, and layers that
compute alike (the same class and config but for the name, and the same
variable shapes) share one.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import keras

from qstrat.graph.ir import Node
from qstrat.graph.rebuild import call_node
from qstrat.layers import FakeQuant, QuantizeWrapper


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
        - a QuantizeWrapper of a Keras layer, or a Keras layer: its class and config without names (nor the
          wrapper's shared-state keys and recorded corrections, which compute nothing), its variables'
          shapes and dtypes, and the call's arguments other than tensors;
        - any other layer (a custom one may compute from more than its config): itself.
        """
        if isinstance(op, FakeQuant):
            return (json.dumps(op.quantizer_spec, sort_keys=True), tuple(tuple(v.shape) for v in op.variables))
        inner = op.layer if isinstance(op, QuantizeWrapper) else op
        if not type(inner).__module__.startswith("keras.") or hasattr(inner, "call_with_quantizers"):
            return id(op)
        config = {k: v for k, v in op.get_config().items() if k not in ("name", "shared_states", "corrections")}
        if "layer" in config:  # the wrapped layer's, without its name
            config["layer"] = {**config["layer"], "config": {**config["layer"].get("config", {}), "name": None}}
        call = None
        if node.arguments is not None:
            tensors = {id(t) for t in node.in_tensors}
            try:
                call = keras.tree.map_structure(
                    lambda a: "<tensor>" if id(a) in tensors else repr(a), (node.arguments.args, node.arguments.kwargs)
                )
            except (TypeError, ValueError):  # arguments keras.tree cannot walk: this layer compiles on its own
                return id(op)
        return (
            type(op).__name__,
            json.dumps(config, sort_keys=True, default=repr),
            tuple((tuple(v.shape), str(v.dtype)) for v in op.variables),
            repr(call),
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
