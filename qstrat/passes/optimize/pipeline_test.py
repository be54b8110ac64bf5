"""The optimize stage as a whole: passes run in the strategy's order, and compose float-equivalently."""

import keras
import numpy as np
import pytest
from keras import ops

import qstrat
from qstrat.graph import capture, rebuild
from qstrat.passes.optimize import optimize
from qstrat.passes.optimize.conftest import rand, randomize_bn, types
from qstrat.strategy import load_strategy

pytestmark = pytest.mark.portable
L = keras.layers


def _model():
    i = keras.Input((12, 12, 3))
    x = L.Conv2D(8, 3, activation="relu6", name="stem")(i)
    x = L.SeparableConv2D(8, 3, padding="same", use_bias=False, name="sep")(x)
    x = L.BatchNormalization(name="sep_bn")(x)
    x = L.Dropout(0.3)(L.ReLU(name="relu")(x))
    x = ops.mean(x, axis=(1, 2))
    x = L.Dense(6, name="fc")(x)
    return randomize_bn(keras.Model(i, L.BatchNormalization(name="fc_bn")(x)))


def _strategy(order):
    keys = {k: True for k in order}
    return load_strategy("", {"optimize_pipeline_config": {**keys, "cle_steps": 4}})


def test_strategy_keeps_the_order_it_is_given():
    s = _strategy(["fold_conv_bn", "separable_conv"])
    assert [k for k, v in s.optimize.items() if v is True][:2] == ["fold_conv_bn", "separable_conv"]


def test_passes_run_in_the_strategy_order():
    model, x = _model(), rand(3, 12, 12, 3)
    split_first, rep1 = optimize(capture(model), _strategy(["separable_conv", "fold_conv_bn"]).optimize)
    fold_first, rep2 = optimize(capture(model), _strategy(["fold_conv_bn", "separable_conv"]).optimize)
    assert rep1.passes_run == ["separable_conv", "fold_conv_bn"] and rep2.passes_run == rep1.passes_run[::-1]
    # Split first: the pointwise half takes sep_bn. Fold first: sep_bn has no kernel to fold into.
    assert {e.node for e in rep1.of("fold_conv_bn", "changed")} == {"sep_bn", "fc_bn"}
    assert [e.node for e in rep2.of("fold_conv_bn", "skipped")] == ["sep_bn"]
    for g in (split_first, fold_first):
        y0, y1 = ops.convert_to_numpy(model(x)), ops.convert_to_numpy(rebuild(g)(x))
        assert np.abs(y0 - y1).max() <= 1e-5 * np.abs(y0).max()


def test_builtin_pof2s_pipeline_end_to_end():
    model, x = _model(), rand(3, 12, 12, 3)
    q = qstrat.Quantizer(model, "pof2s")
    opt = q.optimize_model()
    y0, y1 = ops.convert_to_numpy(model(x)), ops.convert_to_numpy(opt(x))
    assert np.abs(y0 - y1).max() <= 1e-5 * np.abs(y0).max()
    assert types(opt) == [
        "InputLayer",
        "Conv2D",
        "Activation",
        "DepthwiseConv2D",
        "Conv2D",
        "ReLU",
        "GlobalAveragePooling2D",
        "Dense",
    ]
    assert q.optimize_report.passes_run == [
        "remove_dropout",
        "remove_unused_layers",
        "convert_tf_op_to_keras",
        "separable_conv",
        "separate_conv_act",
        "fold_conv_bn",
        "convert_bn_to_dwconv",
        "include_cle",
    ]
    # stem -> relu6 -> depthwise is not equalized (ReLU6); sep_depthwise -> sep_pointwise is.
    assert [e.node for e in q.optimize_report.of("include_cle", "changed")] == ["sep_depthwise"]
    assert "stem_relu6" in [layer.name for layer in opt.layers]


def test_quantize_model_quantizes_the_optimized_graph():
    model = _model()
    qmodel = qstrat.Quantizer(model, "pof2s").quantize_model(rand(16, 12, 12, 3), verbose=0)
    info = qstrat.get_quantize_info(qmodel)
    assert "sep_bn" not in info and "fc_bn" not in info
    assert {"kernel", "bias"} <= set(info["sep_pointwise"]) and "kernel" in info["sep_depthwise"]


def test_user_layer_settings_follow_layers_the_passes_split():
    i = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, activation="relu", name="c")(i)
    x = L.SeparableConv2D(4, 3, name="sep")(x)
    model = keras.Model(i, L.Dense(2, name="d")(L.Flatten()(x)))
    custom = {
        "quantize_registry_config": {
            "user_defined_quantize_config": {"ignore_layers": ["c"], "layer_config": {"sep": "float32"}}
        }
    }
    q = qstrat.Quantizer(model, "pof2s", custom)
    q.quantize_model(rand(8, 8, 8, 3), verbose=0)
    rep = q.report.layers
    for name in ("c", "c_relu"):  # c_relu: the activation separated from c
        assert rep[name].status == "skipped" and "ignore_layers" in rep[name].reason, name
    for name in ("sep_depthwise", "sep_pointwise"):
        assert rep[name].status == "skipped" and "float32" in rep[name].reason, name
    assert rep["d"].status == "quantized"


def test_a_custom_strategy_over_a_builtin_keeps_the_builtin_order():
    s = load_strategy("pof2s", {"optimize_pipeline_config": {"include_cle": True, "fold_conv_bn": True}})
    keys = [k for k in s.optimize if k in ("separable_conv", "fold_conv_bn", "include_cle")]
    assert keys == ["separable_conv", "fold_conv_bn", "include_cle"]


def test_a_user_setting_for_a_folded_or_missing_layer_warns():
    model = _model()
    custom = {
        "quantize_registry_config": {
            "user_defined_quantize_config": {"ignore_layers": ["fc_bn"], "layer_config": {"stme": "float32"}}
        }
    }
    with pytest.warns(UserWarning) as record:
        qstrat.Quantizer(model, "pof2s", custom).quantize_model(rand(8, 12, 12, 3), verbose=0)
    text = "\n".join(str(w.message) for w in record)
    assert 'ignore_layers names "fc_bn"' in text and "folded into fc" in text
    assert 'layer_config names "stme"' in text and 'Did you mean "stem"?' in text
