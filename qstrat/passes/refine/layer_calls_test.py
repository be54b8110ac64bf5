"""Which layers share a compiled function in bias correction's walk on JAX (`LayerCalls._key`).

Two layers may share one only if they compute alike: the compiled function
maps the second layer's variable values onto the first one's variables by
position and runs the first one's call. Layers that could compute otherwise
get keys of their own. (`bias_correction_test.py` checks the shared walk's
corrections against the eager walk's, bit for bit.)
"""

import keras
import numpy as np
import pytest

from qstrat.graph import capture
from qstrat.layers import QuantizeWrapper
from qstrat.passes.refine.layer_calls import LayerCalls

pytestmark = pytest.mark.portable
L = keras.layers
POF2 = {"type": "Pof2SQuantizer", "params": {"bit_width": 8, "method": "Min_MSE", "round_mode": "HALF_UP"}}


def _keys(model) -> dict:
    graph = capture(model)
    return {n.name: LayerCalls._key(n, n.op) for n in graph.nodes if n.type_name != "InputLayer"}


def _conv(name, order=("kernel", "bias"), **kw):
    return QuantizeWrapper(L.Conv2D(4, 3, padding="same", name=name, **kw), {a: POF2 for a in order})


def test_alike_wrapped_convs_share_a_key_and_others_do_not():
    i = keras.Input((6, 6, 4))
    x = _conv("a")(i)
    x = _conv("b")(x)  # as a, but for the name
    x = _conv("c", order=("bias", "kernel"))(x)  # its variables in another order
    x = _conv("d", activation="relu")(x)  # another config
    x = QuantizeWrapper(L.Conv2D(4, 3, padding="same", name="e"), {"kernel": POF2})(x)  # no bias quantizer
    keys = _keys(keras.Model(i, x))
    assert keys["quant_a"] == keys["quant_b"]
    assert isinstance(keys["quant_a"], tuple)
    others = [keys[f"quant_{n}"] for n in "acde"]
    assert len(set(others)) == 4


def test_layers_outside_the_conv_and_dense_classes_keep_keys_of_their_own():
    """An adapted Normalization computes from statistics that are neither config nor variables."""
    n1, n2 = L.Normalization(name="n1"), L.Normalization(name="n2")
    n1.adapt(np.arange(12, dtype="float32").reshape(6, 2))
    n2.adapt(np.arange(12, dtype="float32").reshape(6, 2) * 3)
    i = keras.Input((2,))
    keys = _keys(keras.Model(i, [n1(i), n2(i)]))
    assert keys["n1"] == id(n1) and keys["n2"] == id(n2)
