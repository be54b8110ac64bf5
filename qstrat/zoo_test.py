"""The digits MobileNet, the function-preserving channel rescaling used by bench/cle.py, and shifted flips."""

import keras
import numpy as np
import pytest

from qstrat import zoo

CHAINS = [  # (BN whose output is rescaled, the conv that absorbs the inverse factors)
    ("stem_bn", "dw1"),
    ("dw1_bn", "pw1"),
    ("pw1_bn", "dw2"),
    ("dw2_bn", "pw2"),
    ("pw2_bn", "dw3"),
    ("dw3_bn", "pw3"),
]


@pytest.fixture(scope="module")
def mobilenet():
    return zoo.digits_mobilenet()


@pytest.fixture(scope="module")
def data():
    return zoo.digits_split()


def test_digits_mobilenet_is_a_plain_relu_mobilenet(mobilenet, data):
    types = {type(layer) for layer in mobilenet.layers}
    assert {keras.layers.DepthwiseConv2D, keras.layers.BatchNormalization, keras.layers.ReLU} <= types
    relus = [layer for layer in mobilenet.layers if isinstance(layer, keras.layers.ReLU)]
    assert len(relus) == 7 and all(r.get_config()["max_value"] is None for r in relus)
    assert [layer.name for layer in mobilenet.layers if isinstance(layer, keras.layers.DepthwiseConv2D)] == [
        "dw1",
        "dw2",
        "dw3",
    ]
    _, _, x_test, y_test = data
    acc = np.mean(np.argmax(mobilenet.predict(x_test, verbose=0), axis=-1) == y_test)
    assert acc >= 0.95, acc


def test_rescaling_preserves_the_function_and_spreads_channel_ranges(mobilenet, data):
    before = [w.copy() for w in mobilenet.get_weights()]
    rescaled = zoo.rescale_channels_through_relu(mobilenet, spread=100.0, seed=0)
    assert rescaled is not mobilenet
    assert all(np.array_equal(a, b) for a, b in zip(before, mobilenet.get_weights(), strict=True))  # untouched

    x = data[0][:200]
    ref = mobilenet.predict(x, verbose=0)
    out = rescaled.predict(x, verbose=0)
    assert np.max(np.abs(out - ref)) / np.max(np.abs(ref)) <= 1e-4

    names = [bn for bn, _ in CHAINS]
    probe = keras.Model(mobilenet.input, [mobilenet.get_layer(n).output for n in names])
    probe_r = keras.Model(rescaled.input, [rescaled.get_layer(n).output for n in names])
    for name, (bn, conv), a, b in zip(
        names, CHAINS, probe.predict(x, verbose=0), probe_r.predict(x, verbose=0), strict=True
    ):
        r = rescaled.get_layer(bn).get_weights()[0] / mobilenet.get_layer(bn).get_weights()[0]
        assert r.min() > 0 and r.max() / r.min() == pytest.approx(100.0, rel=1e-5), name
        k, k_r = mobilenet.get_layer(conv).get_weights()[0], rescaled.get_layer(conv).get_weights()[0]
        np.testing.assert_allclose(k_r * r.reshape(1, 1, -1, 1), k, rtol=1e-5, atol=1e-7)
        # The BN output ranges themselves are rescaled channel by channel, spread 100x.
        live = np.ptp(a.reshape(-1, a.shape[-1]), axis=0) > 1e-3
        ratio = np.ptp(b.reshape(-1, b.shape[-1]), axis=0)[live] / np.ptp(a.reshape(-1, a.shape[-1]), axis=0)[live]
        np.testing.assert_allclose(ratio, r[live], rtol=1e-3)
        assert ratio.max() / ratio.min() > 50, name


def test_rescaling_skips_layers_outside_a_bn_relu_conv_chain(mobilenet):
    rescaled = zoo.rescale_channels_through_relu(mobilenet)
    for name in ("stem", "pw3_bn", "logits"):  # before the first chain, ReLU into GAP, the head
        for a, b in zip(mobilenet.get_layer(name).get_weights(), rescaled.get_layer(name).get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.portable
def test_shifted_flips_are_whole_copies_flipped_or_not_and_shifted_by_at_most_four():
    images = np.random.default_rng(0).normal(size=(3, 5, 12, 1))
    out = zoo.shifted_flips(images, 8, seed=1)
    assert out.shape == (8, 5, 12, 1)
    for start in range(0, 8, 3):  # copies of all three images in turn, the last one cut short
        block = out[start : start + 3]
        candidates = [np.roll(b, s, axis=2) for b in (images, images[:, :, ::-1]) for s in range(-4, 5)]
        assert any(np.array_equal(block, c[: len(block)]) for c in candidates), start
    assert np.array_equal(zoo.shifted_flips(images, 8, seed=1), out)  # the seed fixes them
