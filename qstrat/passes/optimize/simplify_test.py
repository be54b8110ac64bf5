"""The clean-up passes: float equivalence (ReLU6 -> ReLU: its stated difference) and what changed."""

import keras
import numpy as np
import pytest
from keras import ops

from qstrat.graph import capture
from qstrat.passes.optimize import simplify
from qstrat.passes.optimize.conftest import rand, types

pytestmark = pytest.mark.portable
L = keras.layers


def test_remove_dropout(run_pass):
    i = keras.Input((6, 6, 2))
    x = L.Dropout(0.5)(L.Conv2D(4, 3)(i))
    x = L.SpatialDropout2D(0.3)(x)
    x = L.GaussianNoise(1.0)(L.GaussianDropout(0.2)(x))
    model = keras.Model(i, L.Dropout(0.1, name="last")(x))
    new, report, rel = run_pass(simplify.remove_dropout, model, rand(3, 6, 6, 2))
    assert rel == 0.0 and types(new) == ["InputLayer", "Conv2D"]
    assert len(report.of("remove_dropout", "changed")) == 5


def test_remove_unused_layers_of_an_inlined_submodel(run_pass):
    j = keras.Input((5,))
    used, unused = L.Dense(3, name="used")(j), L.Dense(2, name="dead")(L.ReLU(name="dead_relu")(j))
    inner = keras.Model(j, [used, unused], name="inner")
    i = keras.Input((5,))
    model = keras.Model(i, L.Dense(2, name="head")(inner(i)[0]))
    new, report, rel = run_pass(simplify.remove_unused_layers, model, rand(4, 5))
    assert rel == 0.0
    assert {e.node for e in report.of("remove_unused_layers")} == {"dead", "dead_relu"}
    assert "dead" not in [layer.name for layer in new.layers]


def test_separate_conv_act(run_pass):
    i = keras.Input((8, 8, 3))
    shared = L.Conv2D(3, 3, padding="same", activation="relu", name="shared")
    x = shared(shared(i))
    x = L.DepthwiseConv2D(3, activation="relu6", name="dw")(x)
    x = L.Flatten()(x)
    model = keras.Model(i, L.Dense(4, activation="sigmoid", name="fc")(x))
    new, report, rel = run_pass(simplify.separate_conv_act, model, rand(3, 8, 8, 3))
    assert rel <= 1e-6
    acts = {layer.name: layer.get_config()["activation"] for layer in new.layers if isinstance(layer, L.Activation)}
    assert acts == {"shared_relu": "relu", "shared_relu_1": "relu", "dw_relu6": "relu6", "fc_sigmoid": "sigmoid"}
    for name in ("shared", "dw", "fc"):
        assert new.get_layer(name).get_config()["activation"] == "linear"
    assert len(report.of("separate_conv_act")) == 4


@pytest.mark.parametrize("use_bias", [True, False])
def test_separable_conv_split(use_bias, run_pass):
    i = keras.Input((9, 9, 3))
    sep = L.SeparableConv2D(
        5,
        3,
        strides=2,
        depth_multiplier=2,
        activation="relu",
        use_bias=use_bias,
        name="sep",
        bias_initializer="random_normal",
    )
    model = keras.Model(i, sep(i))
    new, report, rel = run_pass(simplify.separable_conv, model, rand(2, 9, 9, 3))
    assert rel <= 1e-5
    dw, pw = new.get_layer("sep_depthwise"), new.get_layer("sep_pointwise")
    assert isinstance(dw, L.DepthwiseConv2D) and not dw.use_bias and dw.depth_multiplier == 2
    assert dw.strides == (2, 2)
    assert isinstance(pw, L.Conv2D) and pw.kernel_size == (1, 1) and pw.use_bias == use_bias
    assert pw.get_config()["activation"] == "relu"
    assert report.of("separable_conv")[0].detail == "split into sep_depthwise + sep_pointwise"


def test_relu6_to_relu_changes_only_what_is_above_6():
    i = keras.Input((40,))
    a = L.ReLU(max_value=6.0, name="r6")(i)
    b = L.Activation("relu6", name="a6")(i)
    c = L.Dense(40, activation="relu6", name="d6", kernel_initializer="identity")(i)
    model = keras.Model(i, [a, b, c])
    from qstrat.graph import rebuild
    from qstrat.passes.optimize import OptimizeReport

    report = OptimizeReport()
    new = rebuild(simplify.convert_relu6_to_relu(capture(model), {}, report))
    x = np.linspace(-10, 10, 40, dtype="float32")[None]
    before = [ops.convert_to_numpy(t) for t in model(x)]
    after = [ops.convert_to_numpy(t) for t in new(x)]
    for y0, y1 in zip(before, after, strict=True):
        np.testing.assert_allclose(y0, np.clip(x, 0, 6), atol=1e-6)
        np.testing.assert_allclose(y1 - y0, np.maximum(x - 6, 0), atol=1e-6)  # the stated difference
    assert len(report.of("convert_relu6_to_relu")) == 3
    assert new.get_layer("r6").max_value is None and new.get_layer("d6").get_config()["activation"] == "relu"


def test_keras_ops_become_layers(run_pass):
    a, b = keras.Input((8, 8, 3)), keras.Input((8, 8, 3))
    x = ops.multiply(ops.subtract(ops.add(a, b), b), a)
    x = ops.concatenate([x, a], axis=-1)
    x = ops.sigmoid(ops.relu6(ops.relu(x)))
    t = ops.pad(ops.transpose(x, (0, 2, 1, 3)), ((0, 0), (1, 1), (2, 0), (0, 0)))
    m = ops.reshape(ops.mean(x, axis=(1, 2), keepdims=True), (-1, 6))
    c = ops.add(a, 2.0)  # a constant operand: stays an operation
    model = keras.Model([a, b], [m, t, c])
    xs = [rand(2, 8, 8, 3), rand(2, 8, 8, 3, seed=1)]
    new, report, rel = run_pass(simplify.convert_tf_op_to_keras, model, xs)
    assert rel <= 1e-6
    expected = {
        "Add",
        "Subtract",
        "Multiply",
        "Concatenate",
        "ReLU",
        "Activation",
        "Permute",
        "ZeroPadding2D",
        "GlobalAveragePooling2D",
        "Reshape",
    }
    assert expected <= set(types(new))
    assert len(report.of("convert_tf_op_to_keras", "changed")) == 11
    (skip,) = report.of("convert_tf_op_to_keras", "skipped")
    assert "constant operand" in skip.detail
    remaining = [n for n in capture(new).nodes if type(n.op).__module__.startswith("keras.src.ops")]
    assert [type(n.op).__name__ for n in remaining] == ["Add"]


def test_ops_that_move_the_batch_axis_stay(run_pass):
    i = keras.Input((4, 6))
    model = keras.Model(i, ops.reshape(ops.transpose(i, (1, 0, 2)), (-1, 6)))
    new, report, rel = run_pass(simplify.convert_tf_op_to_keras, model, rand(3, 4, 6))
    assert rel == 0.0 and not report.of("convert_tf_op_to_keras", "changed")
    assert any("batch axis" in e.detail for e in report.events)


def test_new_layers_are_channels_last_whatever_the_global_format(run_pass):
    i = keras.Input((6, 5, 3))
    model = keras.Model(i, [ops.mean(i, axis=(1, 2)), ops.pad(i, ((0, 0), (1, 1), (0, 0), (0, 0)))])
    old = keras.config.image_data_format()
    keras.config.set_image_data_format("channels_first")
    try:
        new, report, rel = run_pass(simplify.convert_tf_op_to_keras, model, rand(2, 6, 5, 3))
    finally:
        keras.config.set_image_data_format(old)
    assert rel <= 1e-6 and len(report.of("convert_tf_op_to_keras", "changed")) == 2


def test_a_single_tensor_concatenate_stays_an_operation(run_pass):
    i = keras.Input((4,))
    model = keras.Model(i, ops.concatenate([i], axis=-1))
    new, report, rel = run_pass(simplify.convert_tf_op_to_keras, model, rand(2, 4))
    assert rel == 0.0 and "single tensor" in report.of("convert_tf_op_to_keras", "skipped")[0].detail


def test_the_activity_regularizer_moves_with_the_activation_and_the_regularizers_with_the_separable_halves(run_pass):
    """What regularizes the float model regularizes the split one, on the same tensors and weights (QAT trains it)."""
    l1, l2 = keras.regularizers.L1, keras.regularizers.L2
    i = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, activation="relu", activity_regularizer=l1(0.1), name="c")(i)
    sep = L.SeparableConv2D(
        5,
        3,
        activation="relu",
        depthwise_regularizer=l2(0.3),
        pointwise_regularizer=l2(0.2),
        bias_regularizer=l1(0.5),
        activity_regularizer=l1(0.05),
        depthwise_constraint=keras.constraints.NonNeg(),
        name="sep",
    )
    model = keras.Model(i, sep(x))
    data = rand(3, 8, 8, 3)
    new, _, rel = run_pass(simplify.separate_conv_act, model, data)
    assert rel <= 1e-6
    assert new.get_layer("c").activity_regularizer is None
    assert (
        new.get_layer("c_relu").activity_regularizer.get_config() == l1(0.1).get_config()
    )  # on the activation's output
    split, _, rel = run_pass(simplify.separable_conv, model, data)
    assert rel <= 1e-5
    dw, pw = split.get_layer("sep_depthwise"), split.get_layer("sep_pointwise")
    assert dw.activity_regularizer is None and dw.depthwise_regularizer.get_config() == l2(0.3).get_config()
    assert isinstance(dw.depthwise_constraint, keras.constraints.NonNeg)
    assert (
        pw.kernel_regularizer.get_config() == l2(0.2).get_config()
        and pw.bias_regularizer.get_config() == l1(0.5).get_config()
    )
    assert pw.activity_regularizer.get_config() == l1(0.05).get_config()
    for m in (model, new, split):  # two outputs' activities, two kernels, the bias: none lost, none twice
        m(data)
        assert len(m.losses) == 5
