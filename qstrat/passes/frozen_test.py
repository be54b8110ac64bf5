"""Frozen: the quantized model with its weights fake-quantized once gives the same outputs, bit for bit."""

import keras
import numpy as np
import pytest
from keras import ops

import qstrat
from qstrat.layers import FakeQuant, QuantizeWrapper
from qstrat.passes.frozen import Frozen

pytestmark = pytest.mark.portable
L = keras.layers


@pytest.mark.parametrize("strategy", ["pof2s", "fs", "tqt"])
def test_frozen_copy_gives_the_quantized_outputs_and_follows_changes(strategy):
    i = keras.Input((8, 8, 3))
    x = L.Conv2D(6, 3, padding="same", name="c1")(i)
    x = L.ReLU(name="r1")(L.BatchNormalization(name="bn1")(x))
    x = L.DepthwiseConv2D(3, padding="same", name="dw")(x)
    model = keras.Model(i, L.Dense(3, name="d")(L.GlobalAveragePooling2D(name="gap")(x)))
    data = np.random.default_rng(0).uniform(0, 4, size=(40, 8, 8, 3)).astype("float32")
    qmodel = qstrat.Quantizer(model, strategy).quantize_model(data, verbose=0, include_bias_corr=False, weight_bit=4)
    qmodel.get_layer("quant_c1").enabled["kernel"].assign(0.0)  # one quantizer off: the copy must follow
    [fq] = [layer for layer in qmodel.layers if isinstance(layer, FakeQuant) and layer.target.startswith("dw")]
    fq.enabled.assign(0.0)
    frozen = Frozen(qmodel)
    for layer in qmodel.layers:  # the weights, bit for bit (fs quantizes some with the framework's kernel)
        for attr in getattr(layer, "quantizers", {}) if isinstance(layer, QuantizeWrapper) else {}:
            np.testing.assert_array_equal(
                ops.convert_to_numpy(getattr(frozen.layer(layer), attr)),
                ops.convert_to_numpy(layer.quantized_weight(attr)),
            )
    np.testing.assert_array_equal(ops.convert_to_numpy(frozen.model(data)), ops.convert_to_numpy(qmodel(data)))
    assert not any(isinstance(layer, QuantizeWrapper) for layer in frozen.model.layers)

    # A weight changed in the quantized model reaches the copy with sync, and only then.
    dense = qmodel.get_layer("quant_d")
    dense.layer.kernel.assign(-dense.layer.kernel.numpy())
    before = ops.convert_to_numpy(frozen.model(data))
    assert not np.array_equal(before, ops.convert_to_numpy(qmodel(data)))
    frozen.sync(dense)
    np.testing.assert_array_equal(ops.convert_to_numpy(frozen.model(data)), ops.convert_to_numpy(qmodel(data)))

    # Syncing named weights copies those alone.
    dense.layer.bias.assign(dense.layer.bias.numpy() + 0.5)
    dense.layer.kernel.assign(-dense.layer.kernel.numpy())
    frozen.sync(dense, ["bias"])
    got = frozen.layer(dense)
    bias = dense.quantized_weight("bias") if "bias" in dense.quantizers else dense.layer.bias
    np.testing.assert_array_equal(ops.convert_to_numpy(got.bias), ops.convert_to_numpy(bias))
    assert not np.array_equal(ops.convert_to_numpy(got.kernel), ops.convert_to_numpy(dense.quantized_weight("kernel")))


@pytest.mark.parametrize("strategy", ["pof2s", "fs", "tqt"])
def test_weights_quantized_once_are_the_wrappers_bit_for_bit_small_or_large(strategy):
    from qstrat.passes.frozen import SMALL, quantized_once

    i = keras.Input((SMALL // 64 + 1,))
    x = L.Dense(64, name="big")(i)  # a kernel over SMALL values: the quantizer's own kernel
    model = keras.Model(i, L.Dense(5, name="small")(x))  # the rest: NumPy twins, where exact
    rng = np.random.default_rng(1)
    for layer in model.layers[1:]:
        layer.kernel.assign(rng.normal(size=layer.kernel.shape) * rng.lognormal(0, 1, size=layer.kernel.shape[-1]))
        layer.bias.assign(rng.normal(size=layer.bias.shape))
    data = rng.normal(size=(16, i.shape[1])).astype("float32")
    qmodel = qstrat.Quantizer(model, strategy).quantize_model(data, verbose=0, include_bias_corr=False)
    sizes = []
    for name in ("quant_big", "quant_small"):
        wrapper = qmodel.get_layer(name)
        for attr in wrapper.quantizers:
            sizes.append(int(np.prod(getattr(wrapper.layer, attr).shape)))
            np.testing.assert_array_equal(
                quantized_once(wrapper, attr), ops.convert_to_numpy(wrapper.quantized_weight(attr))
            )
    assert max(sizes) > SMALL >= min(sizes)
