"""The XLA-fused TQT kernels (TensorFlow training) equal the unfused ones, values and gradients, bit for bit.

Same float32 operations in both, so np.array_equal, also inside a traced
tf.function as Keras' train step runs them, and on values built to sit on
rounding ties and past the grid ends.
"""

import keras
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qstrat.quantizers import fake_quant as fq
from qstrat.quantizers.grid import RoundMode, int_grid

pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="XLA fusion is TensorFlow's path")


def values(seed, n=4096):
    rng = np.random.default_rng(seed)
    x = rng.standard_t(3, size=n).astype(np.float32) * 2
    x[: n // 4] = np.round(x[: n // 4] * 32) / 32 + 1 / 64  # ties at the steps 2^-5 .. 2^-7 give
    return x.reshape(16, -1)


def run(x, lt, w, bits, mode, unsigned, fused, traced):
    import tensorflow as tf

    grid = int_grid(bits, unsigned)
    xv, lv = tf.Variable(x), tf.Variable(np.float32(lt))

    def step():
        with tf.GradientTape() as tape:
            y = fq.tqt_fake_quant(xv, lv, bits, grid.qmin, grid.qmax, mode, unsigned, fused=fused)
            loss = tf.reduce_sum(y * w)
        return (y, *tape.gradient(loss, [xv, lv]))

    out = tf.function(step)() if traced else step()
    return [np.asarray(t) for t in out]


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    bits=st.sampled_from([2, 4, 8, 16]),
    mode=st.sampled_from(list(RoundMode)),
    unsigned=st.booleans(),
    lt=st.floats(-3.0, 3.0, width=32),
    traced=st.booleans(),
)
def test_fused_equals_unfused(seed, bits, mode, unsigned, lt, traced):
    x = values(seed)
    if unsigned:
        x = np.abs(x)
    w = np.random.default_rng(seed + 1).normal(size=x.shape).astype(np.float32)
    plain = run(x, lt, w, bits, mode, unsigned, fused=False, traced=traced)
    fused = run(x, lt, w, bits, mode, unsigned, fused=True, traced=traced)
    for a, b, what in zip(plain, fused, ("value", "d/dx", "d/dlog_th"), strict=True):
        if what == "d/dlog_th":
            # One sum over the tensor: XLA may add in another order. float32 sums of n terms differ by at
            # most n * 2^-24 * sum|terms| (each addition rounds once).
            bound = x.size * 2.0**-24 * float(np.sum(np.abs(w * (np.abs(plain[0]) + np.abs(x))))) * np.log(2)
            assert abs(float(a) - float(b)) <= bound, what
        else:
            assert np.array_equal(a, b), what


def test_the_tqt_quantizer_fuses_only_in_training():
    from qstrat.quantizers import TQTQuantizer

    q = TQTQuantizer(bit_width=8)
    x = values(7)
    state = q.state_from_tensor(x)
    calls = []
    real = fq.tqt_fake_quant

    def spy(*args, **kwargs):
        calls.append(kwargs.get("fused"))
        return real(*args, **kwargs)

    fq.tqt_fake_quant = spy
    try:
        for training in (False, True):
            y = q(keras.ops.convert_to_tensor(x), state, training=training)
            assert np.array_equal(np.asarray(y), q.reference(x, state))
    finally:
        fq.tqt_fake_quant = real
    assert calls == [False, True]


@pytest.mark.parametrize("on", [True, False])
def test_a_fake_quant_layer_in_training_applies_its_flag_inside_the_fused_kernels(on):
    import tensorflow as tf

    from qstrat.layers import FakeQuant
    from qstrat.layers.fake_quant import _gate

    layer = FakeQuant({"type": "TQTQuantizer", "params": {"bit_width": 4}}, target="t")
    x = values(11)
    layer.build(x.shape)
    layer.enabled.assign(1.0 if on else 0.0)
    log_th = layer.state["log_th"]
    log_th.assign(np.float32(0.4))
    w = np.random.default_rng(12).normal(size=x.shape).astype(np.float32)
    grid = int_grid(4)
    xv = tf.Variable(x)

    def grads(fn):
        with tf.GradientTape() as tape:
            y = fn()
            loss = tf.reduce_sum(y * w)
        return [np.asarray(t) for t in (y, *tape.gradient(loss, [xv, log_th]))]

    fused = grads(lambda: layer(xv, training=True))
    plain = grads(
        lambda: _gate(
            layer.enabled,
            lambda: fq.tqt_fake_quant(xv, log_th, 4, grid.qmin, grid.qmax, RoundMode.HALF_TO_EVEN, False),
            xv,
            training=True,
        )
    )
    assert np.array_equal(fused[0], plain[0]) and np.array_equal(fused[1], plain[1])
    if on:
        bound = x.size * 2.0**-24 * float(np.sum(np.abs(w * (np.abs(plain[0]) + np.abs(x))))) * np.log(2)
        assert abs(float(fused[2]) - float(plain[2])) <= bound
    else:
        assert np.array_equal(fused[1], w)  # off: x itself, the gradient straight through
        assert float(fused[2]) == 0.0 and (plain[2] is None or float(plain[2]) == 0.0)
