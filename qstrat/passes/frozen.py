"""A copy of a quantized model whose weights are fake-quantized once, for passes that only run it.

A `QuantizeWrapper` fake-quantizes its weights on every call, which is most
of a quantized model's graph: a traced probe of it takes seconds longer to
trace than the float model's, and every batch pays for the weight ops again.
A pass that runs the model without changing its weights (bias correction
changes only biases, and BN means) can run `Frozen.model` instead: each
wrapper becomes a plain copy of its layer holding the wrapper's quantized
weights, each FakeQuant a `Fixed` layer with its quantizer's state as
constants, every other layer a copy of itself. The outputs are the quantized
model's, bit for bit: the same kernels see the same values. `sync` carries a
change made to the quantized model's weights over (the passes that run the
copy leave activation quantizers as they are).
"""

from __future__ import annotations

import keras
import numpy as np

from qstrat.graph import capture, rebuild
from qstrat.graph.ir import taken_names, unique_name
from qstrat.graph.rebuild import copy_layer
from qstrat.layers import FakeQuant, QuantizeWrapper
from qstrat.quantizers.fake_quant import forward_only


class Fixed(keras.layers.Layer):
    """A FakeQuant's forward computation with its state as constants: no variables, no gate, no gradient.

    A FakeQuant reads its state from variables, passes its input through a
    gate (so it can be turned off) and defines a gradient; a pass that only
    runs the model needs none of it, and each costs graph ops to trace and,
    for the gate, a full pass over the tensor per batch. A disabled FakeQuant
    becomes the identity, as it computes.
    """

    def __init__(self, fake_quant: FakeQuant, **kwargs):
        super().__init__(name=fake_quant.name, dtype=fake_quant.dtype_policy, **kwargs)
        self.quantizer = fake_quant.quantizer
        self.active = float(keras.ops.convert_to_numpy(fake_quant.enabled)) > 0.5
        self.values = {k: np.asarray(keras.ops.convert_to_numpy(v)) for k, v in fake_quant.state.items()}

    def call(self, inputs):
        if not self.active:
            return inputs
        with forward_only():
            return self.quantizer(inputs, self.values, training=False)

    def compute_output_shape(self, input_shape):
        return input_shape


class Frozen:
    """``Frozen(qmodel).model``: ``qmodel`` with its wrappers' weights fake-quantized once."""

    def __init__(self, qmodel):
        self._copies: dict[int, object] = {}
        self._wrappers: dict[int, QuantizeWrapper] = {}

        def op_for(node):
            op = node.op
            if id(op) not in self._copies:
                if isinstance(op, QuantizeWrapper):
                    self._copies[id(op)] = copy_layer(op.layer)
                    self._wrappers[id(op)] = op
                elif isinstance(op, FakeQuant):
                    self._copies[id(op)] = Fixed(op)
                else:
                    self._copies[id(op)] = copy_layer(op)
            return self._copies[id(op)]

        graph = capture(qmodel)
        name = unique_name(f"{qmodel.name}_frozen", taken_names(graph, qmodel))
        self.model = rebuild(graph, op_for=op_for, name=name)
        for wrapper in self._wrappers.values():
            self.sync(wrapper)

    def layer(self, layer):
        """The copy standing for ``layer`` of the quantized model (a wrapper: its plain layer)."""
        return self._copies[id(layer)]

    def sync(self, layer, attrs=None) -> None:
        """Copy ``layer``'s current values over: a wrapper's quantized weights (those named in ``attrs``, or
        all), any other layer's weights."""
        copy = self._copies[id(layer)]
        if isinstance(layer, QuantizeWrapper):
            for attr in layer.quantizers if attrs is None else attrs:
                if attr in layer.quantizers:
                    getattr(copy, attr).assign(keras.ops.convert_to_numpy(layer.quantized_weight(attr)))
                else:
                    getattr(copy, attr).assign(keras.ops.convert_to_numpy(getattr(layer.layer, attr)))
            return
        for src, dst in zip(layer.weights, copy.weights, strict=True):
            dst.assign(keras.ops.convert_to_numpy(src))
