"""Real folding: the deployable copy computes what the QAT model computes in inference, bit for bit.

`real_fold` replaces every `FoldedConvBN` by its conv with the moving
statistics folded in; the fold layer computes the same float32 products in
inference, so the outputs must be equal (np.array_equal). The QAT model is not
changed, and the copy shares no variable with it.
"""

import warnings

import keras
import numpy as np
import pytest
from keras import layers as L

import qstrat
from qstrat.layers import FoldedConvBN, QuantizeWrapper
from qstrat.passes.refine.real_fold import has_fake_folds, real_fold

pytestmark = pytest.mark.portable


def model():
    keras.utils.set_random_seed(4)
    i = keras.Input((8, 8, 2))
    x = L.ReLU(name="r1")(L.BatchNormalization(name="bn1")(L.Conv2D(4, 3, name="c1")(i)))
    x = L.ReLU(name="r2")(L.BatchNormalization(name="bn2")(L.DepthwiseConv2D(3, name="dw")(x)))
    x = L.Flatten(name="flat")(x)
    return keras.Model(i, L.BatchNormalization(name="bn3")(L.Dense(3, name="fc")(x)))


@pytest.mark.parametrize("strategy", ["pof2s", "tqt", "fs"])
def test_real_fold_keeps_the_outputs_and_leaves_the_qat_model_alone(strategy):
    x = np.random.default_rng(0).normal(size=(64, 8, 8, 2)).astype("float32")
    # fs keeps BatchNormalization whole unless fold_conv_bn is set.
    folding = {"fold_conv_bn": True} if strategy == "fs" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qat = qstrat.Quantizer(model(), strategy).get_qat_model(
            init_quant=True, calib_dataset=x, train_with_bn=True, verbose=0, **folding
        )
    qat.compile(keras.optimizers.SGD(0.01), "mse")
    qat.fit(x, np.zeros((64, 3), "float32"), batch_size=16, epochs=1, verbose=0)  # moving statistics move
    before = [np.array(v) for v in qat.weights]
    assert has_fake_folds(qat)
    deployed = real_fold(qat)
    assert not has_fake_folds(deployed)
    wrapped = {w.layer.name: type(w.layer).__name__ for w in deployed.layers if isinstance(w, QuantizeWrapper)}
    assert wrapped == {"c1": "Conv2D", "dw": "DepthwiseConv2D", "fc": "Dense"}
    # Called eagerly both run the same float32 kernels: equal. Through predict's compiled graph the
    # runtime may fuse the conv's bias add, which only a float output (fs quantizes no activation) shows:
    # there the difference stays within a few float32 roundings of the output.
    y_qat = keras.ops.convert_to_numpy(qat(x, training=False))
    assert np.array_equal(y_qat, keras.ops.convert_to_numpy(deployed(x, training=False)))
    p_qat = keras.ops.convert_to_numpy(qat.predict(x, verbose=0))
    p_dep = keras.ops.convert_to_numpy(deployed.predict(x, verbose=0))
    if strategy == "fs":
        assert np.max(np.abs(p_qat - p_dep)) <= 4 * np.finfo(np.float32).eps * np.max(np.abs(p_qat))
    else:
        assert np.array_equal(p_qat, p_dep)
    assert all(np.array_equal(b, np.array(v)) for b, v in zip(before, qat.weights, strict=True))
    assert not {id(v) for v in qat.weights} & {id(v) for v in deployed.weights}
    # The folded weights are the fold layer's own.
    for w in qat.layers:
        if isinstance(w, QuantizeWrapper) and isinstance(w.layer, FoldedConvBN):
            kernel, bias = w.layer.folded_weights()
            conv = next(
                d.layer for d in deployed.layers if isinstance(d, QuantizeWrapper) and d.layer.name == w.layer.name
            )
            assert np.array_equal(np.asarray(conv.kernel), kernel) and np.array_equal(np.asarray(conv.bias), bias)
