"""A copy of a quantized model whose weights are fake-quantized once, for passes that only run it.

A `QuantizeWrapper` fake-quantizes its weights on every call, which is most
of a quantized model's graph: a traced probe of it takes seconds longer to
trace than the float model's, and every batch pays for the weight ops again.
A pass that runs the model without changing its weights (bias correction
changes only biases, and BN means) can run the frozen copy instead: each
wrapper becomes a plain copy of its layer holding the wrapper's quantized
weights, each FakeQuant a `Fixed` layer with its quantizer's state as
constants. The other layers are the quantized model's own in a traced probe
(`Frozen.outputs` on backend tensors: a traced call only reads them), or
copies of them in a Keras model (`Frozen.model`, and `Frozen.outputs` on
Keras inputs). The outputs are the quantized model's, bit for bit: the same
kernels see the same values. `sync` carries a change made to the quantized
model's weights over (the passes that run the copy leave activation
quantizers as they are).
"""

from __future__ import annotations

from functools import cached_property

import keras
import numpy as np

from qstrat.arrays import to_numpy
from qstrat.graph import capture
from qstrat.graph.ir import TensorRef, taken_names, unique_name
from qstrat.graph.rebuild import built_copy, copy_layer, functional_model, input_tensors, load_pending, replay
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
        self.active = float(_numpy(fake_quant.enabled)) > 0.5
        self.values = {k: _numpy(v) for k, v in fake_quant.state.items()}

    def call(self, inputs):
        if not self.active:
            return inputs
        with forward_only():
            return self.quantizer(inputs, self.values, training=False)

    def compute_output_shape(self, input_shape):
        return input_shape


def _numpy(v) -> np.ndarray:
    return to_numpy(v)


SMALL = 1 << 14  # values: a weight this small is quantized by its quantizer's NumPy twin, where exact


def quantized_once(wrapper: QuantizeWrapper, attr: str) -> np.ndarray:
    """``wrapper.quantized_weight(attr)`` as NumPy, bit for bit, computed as a `Fixed` layer computes.

    The state goes in as constants (`forward_only`): fewer eager ops than the
    wrapper's own path, which also builds its gate and custom gradient. A
    weight of at most `SMALL` values (a bias) goes through the quantizer's
    NumPy twin instead where that is exact (``exact_twin``).
    """
    w = _numpy(getattr(wrapper.layer, attr))
    if float(_numpy(wrapper.enabled[attr])) <= 0.5:
        return w
    values = {k: _numpy(v) for k, v in wrapper.state[attr].items()}
    q = wrapper.quantizers[attr]
    if w.size <= SMALL and w.dtype == np.float32 and q.exact_twin and not hasattr(wrapper.layer, "target_value"):
        return np.asarray(q.reference(w, values), np.float32)
    with forward_only():
        return _numpy(wrapper.quantizers[attr](keras.ops.convert_to_tensor(w), values, training=False))


class Frozen:
    """``qmodel`` with its wrappers' weights fake-quantized once."""

    def __init__(self, qmodel):
        self.qmodel = qmodel
        self.graph = capture(qmodel)
        self._copies: dict[int, object] = {}  # wrappers: a copy of their layer; FakeQuants: a Fixed
        self._symbolic: dict[int, object] = {}  # other layers: their copies, once a Keras model is made
        self._refs: dict[int, TensorRef] = {}
        for node in self.graph.nodes:
            op = node.op
            self._refs.setdefault(id(op), TensorRef(node.name, 0))
            if id(op) in self._copies:
                continue
            if isinstance(op, QuantizeWrapper):
                self._copies[id(op)] = built_copy(op.layer)
                self.sync(op)
            elif isinstance(op, FakeQuant):
                self._copies[id(op)] = Fixed(op)

    def ref(self, layer) -> TensorRef:
        """The output of ``layer`` (of the quantized model, called once) in `graph`."""
        return self._refs[id(layer)]

    def op_for(self, symbolic: bool):
        """What each node of `graph` calls (see `outputs`)."""

        def op_for(node):
            op = node.op
            if id(op) in self._copies:
                return self._copies[id(op)]
            if not symbolic or type(op).__name__ == "InputLayer":
                return op
            if id(op) not in self._symbolic:
                self._symbolic[id(op)] = copy_layer(op)
            return self._symbolic[id(op)]

        return op_for

    def outputs(self, inputs: list, refs: list[TensorRef], symbolic: bool) -> list:
        """The tensors ``refs`` of the frozen copy from ``inputs``: backend tensors in a traced probe
        (``symbolic`` False), or Keras inputs to make a model."""
        return replay(self.graph, self.op_for(symbolic), inputs, refs, on_call=load_pending if symbolic else None)

    @cached_property
    def model(self):
        """The frozen copy as a Keras model."""
        inputs = input_tensors(self.graph)
        outs = self.outputs(inputs, list(self.graph.outputs), symbolic=True)
        name = unique_name(f"{self.qmodel.name}_frozen", taken_names(self.graph, self.qmodel))
        return functional_model(inputs if len(inputs) > 1 else inputs[0], outs if len(outs) > 1 else outs[0], name)

    def layer(self, layer):
        """The layer standing for ``layer`` of the quantized model (a wrapper: the copy of its layer)."""
        return self._copies.get(id(layer), self._symbolic.get(id(layer), layer))

    def sync(self, layer, attrs=None) -> None:
        """Copy ``layer``'s current values over: a wrapper's quantized weights (those named in ``attrs``, or
        all), any other layer's weights (where a Keras model of the copy has its own copy of the layer)."""
        if isinstance(layer, QuantizeWrapper):
            copy = self._copies[id(layer)]
            for attr in layer.quantizers if attrs is None else attrs:
                if attr in layer.quantizers:
                    getattr(copy, attr).assign(quantized_once(layer, attr))
                else:
                    getattr(copy, attr).assign(to_numpy(getattr(layer.layer, attr)))
            return
        copy = self._symbolic.get(id(layer))
        if copy is not None:
            for src, dst in zip(layer.weights, copy.weights, strict=True):
                dst.assign(to_numpy(src))
