"""Capture and rebuild: every supported model shape round-trips to identical outputs."""

import keras
import numpy as np
import pytest
from keras import ops

from qstrat.graph import UnsupportedModelError, capture, rebuild

pytestmark = pytest.mark.portable


def np_(t):
    return [ops.convert_to_numpy(x) for x in t] if isinstance(t, (list, tuple)) else ops.convert_to_numpy(t)


def same_outputs(a, b, xs):
    ya, yb = np_(a(xs)), np_(b(xs))
    ya, yb = (ya, yb) if isinstance(ya, list) else ([ya], [yb])
    return all(np.array_equal(p, q) for p, q in zip(ya, yb, strict=True))


def snapshot(model):
    return [w.copy() for w in model.get_weights()], model.get_config()


def rand(*shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def test_sequential():
    m = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, activation="relu"), keras.layers.Dense(2)])
    g = capture(m)
    assert [n.type_name for n in g.nodes] == ["InputLayer", "Dense", "Dense"]
    assert same_outputs(m, rebuild(g), rand(3, 8))


def test_multi_input_multi_output_shared_layer_and_ops():
    a, b = keras.Input((6,), name="a"), keras.Input((6,), name="b")
    shared = keras.layers.Dense(6, name="shared")
    x, y = shared(a), shared(b)
    z = keras.layers.Add(name="add")([x, y])
    w = ops.relu(ops.multiply(z, 2.0))
    m = keras.Model([a, b], [w, x])
    before = snapshot(m)
    g = capture(m)
    names = [n.name for n in g.nodes]
    assert "shared" in names and "shared@1" in names  # one node per call
    assert g.node("shared").op is g.node("shared@1").op
    assert [r.node for r in g.inputs] == ["a", "b"]
    # keras.ops are nodes too (Keras numbers op names process-wide: "multiply", "multiply_3", ...)
    assert {"multiply", "relu"} <= {n.rsplit("_", 1)[0] if n.rsplit("_", 1)[-1].isdigit() else n for n in names}
    r = rebuild(g)
    xs = [rand(2, 6), rand(2, 6, seed=1)]
    assert same_outputs(m, r, xs)
    # The rebuilt model has its own weights: changing them leaves the original alone.
    r.get_layer("shared").kernel.assign(np.zeros((6, 6), "float32"))
    after = snapshot(m)
    assert all(np.array_equal(p, q) for p, q in zip(before[0], after[0], strict=True)) and before[1] == after[1]
    assert len([v for v in r.weights if "shared" in v.path]) == 2  # still shared once: kernel and bias


def test_nested_models_are_inlined():
    ii = keras.Input((5,))
    inner = keras.Model(ii, keras.layers.Dense(5, activation="tanh", name="inner_dense")(ii), name="inner")
    seq = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3, name="seq_dense")], name="seq")
    i = keras.Input((5,))
    m = keras.Model(i, seq(inner(i)))
    g = capture(m)
    assert [n.type_name for n in g.nodes] == ["InputLayer", "Dense", "Dense"]
    assert [n.name for n in g.nodes][1:] == ["inner_dense", "seq_dense"]
    assert same_outputs(m, rebuild(g), rand(4, 5))


def test_a_nested_model_called_with_a_dict_gets_each_input_by_name():
    """inner([b, a]) computes b - a; called with {"a": xa, "b": xb, "c": xc} (the dict's flat order is a, b, c,
    and Keras leaves out c), it must compute xb - xa."""
    ia, ib = keras.Input((4,), name="a"), keras.Input((4,), name="b")
    inner = keras.Model([ib, ia], keras.layers.Subtract()([ib, ia]), name="inner")
    xs = [keras.Input((4,), name=n) for n in ("xa", "xb", "xc")]
    m = keras.Model(xs, inner({"a": xs[0], "b": xs[1], "c": xs[2]}))
    data = [rand(3, 4, seed=k) for k in range(3)]
    out = np_(rebuild(capture(m))(data))
    assert np.array_equal(out, data[1] - data[0]) and np.array_equal(out, np_(m(data)))


@pytest.mark.parametrize("outer", [(4, 1), "int"])
def test_a_nested_model_whose_call_keras_squeezes_or_casts_is_refused(outer):
    ii = keras.Input((4,), dtype="int32" if outer == "int" else "float32", name="feats")
    inner = keras.Model(ii, keras.layers.Dense(2)(keras.ops.cast(ii, "float32")), name="inner")
    i = keras.Input((4,) if outer == "int" else outer)
    m = keras.Model(i, inner(i))
    with pytest.raises(UnsupportedModelError, match=r"nested model 'inner': input 'feats' is .*Reshape or cast"):
        capture(m)


def test_conv_model_round_trip():
    i = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", name="c")(i)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU(name="r")(x)
    y = keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(x)
    x = keras.layers.Concatenate(name="cat")([x, y])
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    m = keras.Model(i, keras.layers.Dense(3, name="head")(x))
    assert same_outputs(m, rebuild(capture(m)), rand(2, 12, 12, 3))


def test_subclassed_model_gets_a_clear_error():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.d = keras.layers.Dense(2)

        def call(self, x):
            return self.d(x)

    net = Net()
    net(rand(1, 3))
    with pytest.raises(UnsupportedModelError, match="subclassed model.*Rebuild it as a functional model"):
        capture(net)
    with pytest.raises(UnsupportedModelError, match="has no input shape yet"):
        capture(keras.Sequential([keras.layers.Dense(2)]))
    with pytest.raises(UnsupportedModelError, match="expected a keras.Model"):
        capture(keras.layers.Dense(2))


def test_graph_views_match_strategy_patterns_per_call():
    from qstrat.graph.ir import views
    from qstrat.strategy import load_strategy, resolve_views

    a, b = keras.Input((6,), name="a"), keras.Input((6,), name="b")
    shared = keras.layers.Dense(6, name="shared")
    m = keras.Model([a, b], keras.layers.Add(name="add")([shared(a), shared(b)]))
    r = resolve_views(load_strategy("pof2s", ignore_layers=["add"]), views(capture(m)))
    assert [t.target_name for t in r["shared@1"].targets] == ["kernel", "bias", "output"]
    assert not r["add"].quantized
