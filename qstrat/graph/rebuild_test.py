"""Copying layers: the copy holds the source's values and the source's config, initializers included."""

import keras
import numpy as np
import pytest
from keras import ops

from qstrat.graph import capture, rebuild
from qstrat.graph.rebuild import copy_layer
from qstrat.graph.rewrite import built_layer

pytestmark = pytest.mark.portable
L = keras.layers


def _same_values(a, b):
    assert len(a.weights) == len(b.weights) > 0
    for u, v in zip(a.weights, b.weights, strict=True):
        np.testing.assert_array_equal(ops.convert_to_numpy(u), ops.convert_to_numpy(v))


def test_copies_keep_values_and_config_built_now_or_at_their_first_call():
    conv = L.Conv2D(4, 3, kernel_initializer=keras.initializers.HeNormal(seed=3), bias_initializer="ones", name="c")
    bn = L.BatchNormalization(gamma_initializer=keras.initializers.Constant(2.0), name="bn")
    i = keras.Input((6, 6, 2))
    model = keras.Model(i, bn(conv(i)))
    bn.moving_mean.assign(np.arange(4, dtype="float32"))

    now = copy_layer(conv, input_shape=(None, 6, 6, 2))
    _same_values(conv, now)
    assert now.get_config() == conv.get_config()

    copy = rebuild(capture(model))  # copies built by their first call
    for src in (conv, bn):
        dst = copy.get_layer(src.name)
        assert dst is not src
        _same_values(src, dst)
        assert dst.get_config() == src.get_config()


def test_a_layer_built_from_a_config_with_its_values_keeps_the_config():
    config = L.Dense(3, kernel_initializer=keras.initializers.GlorotNormal(seed=1), name="d").get_config()
    weights = [np.full((5, 3), 0.5, "float32"), np.arange(3, dtype="float32")]
    layer = built_layer(L.Dense, config, (None, 5), weights)
    np.testing.assert_array_equal(ops.convert_to_numpy(layer.kernel), weights[0])
    np.testing.assert_array_equal(ops.convert_to_numpy(layer.bias), weights[1])
    assert layer.get_config() == config


class _Picky(L.Layer):
    """A layer that accepts only its own initializer."""

    def __init__(self, w_initializer="ones", **kwargs):
        super().__init__(**kwargs)
        if w_initializer != "ones":
            raise ValueError("only 'ones'")
        self.w_initializer = w_initializer

    def build(self, input_shape):
        self.w = self.add_weight(shape=(input_shape[-1],), initializer=self.w_initializer)

    def call(self, x):
        return x * self.w

    def get_config(self):
        return {**super().get_config(), "w_initializer": self.w_initializer}


def test_a_layer_that_refuses_zero_initializers_is_copied_from_its_own_config():
    layer = _Picky(name="p")
    layer.build((None, 3))
    layer.w.assign([1.0, 2.0, 3.0])
    copy = copy_layer(layer, input_shape=(None, 3))
    _same_values(layer, copy)
    assert copy.get_config() == layer.get_config()


def test_replaying_a_graph_on_tensors_computes_the_model_and_leaves_its_layers_as_they_were():
    from qstrat.graph.rebuild import built_copy, run_graph

    a, b = keras.Input((6, 6, 2), name="a"), keras.Input((3,), name="b")
    x = L.GlobalAveragePooling2D(name="gap")(L.BatchNormalization(name="bn")(L.Conv2D(4, 3, name="c")(a)))
    unused = L.Dense(2, name="unused")(b)
    model = keras.Model([a, b], [L.Dense(2, name="d")(L.Concatenate(name="cat")([x, L.Dense(4, name="e")(b)])), unused])
    model.get_layer("bn").moving_mean.assign(np.arange(4, dtype="float32"))
    graph = capture(model)
    data = [np.random.default_rng(0).normal(size=(5, 6, 6, 2)).astype("float32"), np.ones((5, 3), "float32")]
    calls = {layer.name: len(layer._inbound_nodes) for layer in model.layers}

    out = run_graph(graph, [ops.convert_to_tensor(t) for t in data], [graph.outputs[0]], symbolic=False)
    np.testing.assert_array_equal(ops.convert_to_numpy(out[0]), ops.convert_to_numpy(model(data)[0]))
    assert {layer.name: len(layer._inbound_nodes) for layer in model.layers} == calls  # no call recorded
    copy = built_copy(model.get_layer("bn"))
    assert copy.built and copy is not model.get_layer("bn")
    _same_values(model.get_layer("bn"), copy)
