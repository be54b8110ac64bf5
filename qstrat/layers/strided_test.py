"""1x1 strided convolutions at stride 1 on the pixels they read: the same outputs and gradients, and QAT trains them.

Tolerances: both ways sum the same cin products per output, perhaps in
another order, so they differ by at most 2 n u A (n = cin + 2 for the bias
and the activation, u = 2**-24, A the same sum of absolute values), as in
`qstrat.layers.conv_bn_test`. A wrong slicing moves outputs by a fraction of
A, far above that.
"""

import keras
import numpy as np
import pytest
from keras import ops

import qstrat
from qstrat.layers import FoldedConvBN, QuantizeWrapper, strided
from qstrat.layers.conv_bn_test import U, grads, np_

L = keras.layers
TQT = {"type": "TQTQuantizer", "params": {"bit_width": 8}}
CASES = {
    "conv1d_causal": (lambda: L.Conv1D(5, 1, strides=3, padding="causal", activation="relu", name="c"), (2, 10, 4)),
    "conv2d_same": (lambda: L.Conv2D(6, 1, strides=2, padding="same", activation="relu", name="c"), (2, 7, 9, 4)),
    "conv2d_groups": (lambda: L.Conv2D(6, 1, strides=(2, 3), groups=2, use_bias=False, name="c"), (2, 8, 7, 4)),
    "conv3d_valid": (lambda: L.Conv3D(3, 1, strides=(2, 1, 2), name="c"), (2, 5, 4, 5, 2)),
}


@pytest.mark.portable
def test_pointwise_strides_names_only_strided_1x1_channels_last_convs():
    assert strided.pointwise_strides(L.Conv2D(4, 1, strides=2)) == (2, 2)
    assert strided.pointwise_strides(L.Conv1D(4, 1, strides=3)) == (3,)
    assert strided.pointwise_strides(L.Conv2D(4, 1, strides=(1, 2))) == (1, 2)
    assert strided.pointwise_strides(L.Conv2D(4, 3, strides=2)) is None
    assert strided.pointwise_strides(L.Conv2D(4, 1)) is None
    assert strided.pointwise_strides(L.Conv2D(4, 1, strides=2, data_format="channels_first")) is None
    assert strided.pointwise_strides(L.DepthwiseConv2D(1, strides=2)) is None
    assert strided.pointwise_strides(L.Conv2DTranspose(4, 1, strides=2)) is None
    assert strided.pointwise_strides(L.Conv3D(4, 1, strides=(2, 1, 2))) == (2, 1, 2)

    class Own(L.Conv2D):  # a subclass may compute something else in its own call
        pass

    assert strided.pointwise_strides(Own(4, 1, strides=2)) is None


@pytest.fixture
def conv_calls(monkeypatch):
    """How many times `strided.conv` runs (the stride-1 path), counted."""
    calls = []
    real = strided.conv

    def counted(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(strided, "conv", counted)
    return calls


def _wrapped(case, seed=0):
    make, shape = CASES[case]
    rng = np.random.default_rng(seed)
    layer = make()
    layer.build(shape)
    layer.set_weights([rng.normal(0, 0.5, w.shape).astype("float32") for w in layer.get_weights()])
    targets = {"kernel": TQT, **({"bias": TQT} if layer.use_bias else {})}
    w = QuantizeWrapper(layer, targets)
    w.build(shape)
    for attr in targets:
        w.state[attr]["log_th"].assign(0.5)
    return w, rng.normal(0, 1, shape).astype("float32")


def _size(w, x, kernel):
    """Elementwise sum of |x| |W| (and |b|) over what each output adds up."""
    bias = np.abs(np_(w.layer.bias)) if w.layer.use_bias else 0.0
    plain = type(w.layer).from_config({**w.layer.get_config(), "use_bias": False, "activation": None})
    plain.build(x.shape)
    return np_(plain.stateless_call([np.abs(kernel).astype("float32")], [], np.abs(x))[0]) + bias


@pytest.mark.portable
@pytest.mark.parametrize("case", sorted(CASES))
def test_training_computes_what_inference_does(case, conv_calls):
    """Training takes the stride-1 path, inference the layer's own call: the same quantized weights, the same outputs."""
    w, x = _wrapped(case)
    train = np_(w(x, training=True))
    assert len(conv_calls) == 1
    infer = np_(w(x, training=False))
    assert len(conv_calls) == 1
    assert train.shape == infer.shape
    n = w.layer.kernel.shape[-2] + 2
    bound = 2 * n * U * _size(w, x, np_(w.quantized_weight("kernel")))
    assert np.all(np.abs(train - infer) <= bound)
    assert np.abs(infer).max() > 100 * bound.max()  # the check is not vacuous


@pytest.mark.portable
@pytest.mark.parametrize("case", sorted(CASES))
def test_gradients_are_the_layer_s_own(case):
    """With the quantizers bypassed, the gradients to the input and the kernel are those of the plain layer."""
    w, x = _wrapped(case, seed=1)
    for e in w.enabled.values():
        e.assign(0.0)
    r = np.random.default_rng(2).normal(size=np_(w(x)).shape).astype("float32")
    kernel = w.layer.kernel

    def wrapped_loss(xt, k):
        tv = [k if v is kernel else v.value for v in w.trainable_variables]
        ntv = [v.value for v in w.non_trainable_variables]
        return ops.sum(ops.multiply(w.stateless_call(tv, ntv, xt, training=True)[0], r))

    def plain_loss(xt, k):
        tv = [k if v is kernel else v.value for v in w.layer.trainable_variables]
        return ops.sum(ops.multiply(w.layer.stateless_call(tv, [], xt)[0], r))

    start = [x, np_(kernel).astype("float32")]
    got, want = grads(wrapped_loss, start), grads(plain_loss, start)
    # The same gradients on absolute values bound what each one sums: the input's over the output channels, the
    # kernel's over the batch and the output pixels.
    plain = type(w.layer).from_config({**w.layer.get_config(), "use_bias": False, "activation": None})
    plain.build(x.shape)
    sizes = grads(
        lambda xt, k: ops.sum(ops.multiply(plain.stateless_call([k], [], xt)[0], np.abs(r))), [np.abs(a) for a in start]
    )
    n = r.size // r.shape[-1] + r.shape[-1] + 16
    for g, ref, size in zip(got, want, sizes, strict=True):
        assert np.all(np.abs(g - ref) <= 2 * n * U * size)
        assert np.abs(ref).max() > 100 * (2 * n * U * size).max()


@pytest.mark.portable
def test_folded_conv_bn_trains_on_the_stride_1_path_and_infers_on_its_own(conv_calls):
    """FoldedConvBN in training: the stride-1 path for both of its convolutions (quantized, and float for the batch
    statistics); in inference the strided conv, so the fold stays bit for bit the deployed conv
    (`conv_bn_test.test_folded_weights_are_fold_bn_s_fold` on the 1x1 strided cases)."""
    conv = L.Conv2D(4, 1, strides=2, padding="same", name="c")
    fold = FoldedConvBN(conv, L.BatchNormalization(name="bn"))
    x = np.random.default_rng(0).normal(size=(2, 7, 7, 3)).astype("float32")
    fold(x, training=False)
    assert conv_calls == []
    fold(x, training=True)
    assert len(conv_calls) == 2


@pytest.mark.portable
@pytest.mark.parametrize("train_with_bn", [False, True], ids=["wrapped", "folded_bn"])
def test_qat_trains_a_model_with_the_shapes_that_crash_tensorflow_s_onednn(train_with_bn):
    """60x60 inputs with 8 channels into a 1x1 stride-2 conv: a plain Keras model with that layer aborts the process
    in ``fit`` on TensorFlow 2.21 with oneDNN on an AVX-512 CPU. The QAT model trains, and the conv's kernel moves."""
    i = keras.Input((62, 62, 1))
    h = L.Conv2D(8, 3, use_bias=False, name="stem")(i)
    h = L.Conv2D(16, 1, strides=2, padding="same", use_bias=False, name="shortcut")(h)
    h = L.BatchNormalization(name="bn")(h)
    h = L.GlobalAveragePooling2D()(L.ReLU()(h))
    model = keras.Model(i, L.Dense(3, name="head")(h))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 62, 62, 1)).astype("float32")
    y = rng.normal(size=(64, 3)).astype("float32")
    # Moving statistics of a trained model (the conv outputs' own), so batch and moving statistics start alike.
    z = np_(keras.Model(i, model.get_layer("shortcut").output)(x))
    bn = model.get_layer("bn")
    bn.moving_mean.assign(z.mean((0, 1, 2)))
    bn.moving_variance.assign(z.var((0, 1, 2)))
    q = qstrat.Quantizer(model, "tqt")
    qat = q.get_qat_model(init_quant=True, calib_dataset=x, train_with_bn=train_with_bn, verbose=0)
    layer = next(lay for lay in qat.layers if isinstance(lay, QuantizeWrapper) and lay.layer.name == "shortcut")
    before = np_(layer.layer.kernel).copy()
    qat.compile(keras.optimizers.Adam(1e-2), "mse")
    history = qat.fit(x, y, batch_size=32, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][-1])
    assert not np.array_equal(np_(layer.layer.kernel), before)
