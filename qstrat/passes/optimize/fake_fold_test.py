"""QAT fake folding: each fold layer computes, in inference, what the optimized (folded, equalized) conv computes.

A `FoldedConvBN` built from an optimized node must give back that node's
kernel and bias when folded with its moving statistics, to float32 rounding:
the kernel goes through a float64 division and a cast (one rounding), and the
fold multiplies it by gamma / sqrt(variance + epsilon) in float32 (a square
root, a division and a product: three more, plus the casts of gamma and the
variance), so |folded - optimized| <= 8 * 2^-24 * |optimized|. CLE's output
scales live in gamma, so the fold's batch statistics normalize the equalized
channels.
"""

import keras
import numpy as np
import pytest
from keras import layers as L

import qstrat
from qstrat.graph import capture
from qstrat.layers import FoldedConvBN, QuantizeWrapper
from qstrat.passes.optimize import optimize
from qstrat.passes.optimize.fake_fold import fold_layer

pytestmark = pytest.mark.portable

ROUNDING = 8 * 2.0**-24


def model(data_format="channels_last"):
    """Convs with BN; channels_first: on (3, 8, 9) images, so that no conv writes an axis as long as its channels."""
    keras.utils.set_random_seed(2)
    first = data_format == "channels_first"
    f, axis = {"data_format": data_format}, 1 if first else -1
    i = keras.Input((3, 8, 9) if first else (8, 8, 3))
    x = L.Conv2D(6, 3, padding="same", name="conv", **f)(i)
    x = L.BatchNormalization(axis=axis, name="bn")(x)
    x = L.ReLU(name="relu")(x)
    x = L.DepthwiseConv2D(3, depth_multiplier=2, padding="same", use_bias=False, name="dw", **f)(x)
    x = L.BatchNormalization(axis=axis, name="dw_bn")(x)
    x = L.ReLU(name="dw_relu")(x)
    x = L.Conv2DTranspose(4, 2, strides=2, name="up", **f)(x)
    x = L.BatchNormalization(axis=axis, name="up_bn")(x)
    x = L.GlobalAveragePooling2D(name="gap", **f)(x)
    x = L.Dense(5, name="fc")(x)
    x = L.BatchNormalization(name="fc_bn")(x)
    net = keras.Model(i, x)
    rng = np.random.default_rng(0)
    for layer in net.layers:
        if isinstance(layer, L.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights(
                [rng.uniform(0.5, 2, n), rng.uniform(-1, 1, n), rng.uniform(-1, 1, n), rng.uniform(0.5, 2, n)]
            )
    return net


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("cle", [False, True])
def test_fold_layers_give_back_the_optimized_weights(cle, data_format):
    net = model(data_format)
    cfg = {"fold_conv_bn": True, "include_cle": cle, "cle_steps": 4, "cle_balance_method": "max"}
    graph, _ = optimize(capture(net), cfg)
    folded = [n for n in graph.nodes if "folded_from" in n.meta]
    assert sorted(n.name for n in folded) == ["conv", "dw", "fc", "up"]
    scaled = False
    for node in folded:
        if node.type_name == "Conv2DTranspose":
            continue  # stays folded (FoldedConvBN trains Conv, Depthwise and Dense)
        fold = fold_layer(node, freeze_bn_delay=-1)
        assert isinstance(fold, FoldedConvBN) and fold.name == node.name
        kernel, bias = fold.folded_weights()
        want_k, want_b = np.asarray(node.op.kernel), np.asarray(node.op.bias)
        assert np.all(np.abs(kernel - want_k) <= ROUNDING * np.abs(want_k)), node.name
        assert np.all(np.abs(bias - want_b) <= ROUNDING * np.maximum(np.abs(want_b), np.abs(kernel).max())), node.name
        s = np.asarray(node.meta.get("cle_out_scale", 1.0))
        _, bn = node.meta["folded_from"]
        gamma = np.broadcast_to(np.asarray(bn.gamma, np.float64) * s, bn.gamma.shape).astype("float32")
        assert np.array_equal(np.asarray(fold.bn.gamma), gamma)
        scaled |= bool(np.any(s != 1.0))
    assert scaled == cle, "CLE's output scales move into gamma"


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_the_qat_model_fake_folds_what_it_can_and_says_what_it_cannot(data_format):
    net = model(data_format)
    x = np.random.default_rng(1).normal(size=(16, *net.input.shape[1:])).astype("float32")
    q = qstrat.Quantizer(net, "pof2s")
    qat = q.get_qat_model(init_quant=True, calib_dataset=x, train_with_bn=True, verbose=0)
    folds = {w.layer.name for w in qat.layers if isinstance(w, QuantizeWrapper) and isinstance(w.layer, FoldedConvBN)}
    assert folds == {"conv", "dw", "fc"}
    events = {(e.kind, e.node) for e in q.optimize_report.of("train_with_bn")}
    assert events == {("changed", "bn"), ("changed", "dw_bn"), ("changed", "fc_bn"), ("skipped", "up_bn")}
