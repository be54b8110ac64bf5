"""Each layer's integer form against the Keras layer on the same grid values (exact in float32 here)."""

import numpy as np
import pytest
from keras import layers as L
from keras import ops

from qstrat.errors import UnsupportedError
from qstrat.integer.layers import Context, integer_layer, keep_positions, quantizer_position
from qstrat.integer.tensors import IntTensor, to_float
from qstrat.layers import DPUAveragePooling2D, DPUGlobalAveragePooling2D, DPUHardSigmoid, QuantizeWrapper
from qstrat.quantizers import FSQuantizer, Pof2SQuantizer

pytestmark = pytest.mark.portable


def grid_tensor(shape, pos, seed=0, lo=-128, hi=128):
    return IntTensor(np.random.default_rng(seed).integers(lo, hi, shape), pos)


def keras_value(layer, *ts):
    xs = [ops.convert_to_tensor(to_float(t)) for t in ts]
    return ops.convert_to_numpy(layer(xs if len(xs) > 1 else xs[0])).astype(np.float64)


def int_value(layer, *ts):
    out = integer_layer(layer, list(ts), Context())
    assert out is not None
    return to_float(out, np.float64)


@pytest.mark.parametrize("pos", [-2, 0, 3, 7])
def test_hard_sigmoid(pos):
    t = IntTensor(np.arange(-128, 128).reshape(1, -1), pos)
    layer = DPUHardSigmoid()
    assert np.array_equal(int_value(layer, t), keras_value(layer, t))
    assert integer_layer(layer, [t], Context()).pos == max(pos, 0) + 14


@pytest.mark.parametrize(
    "layer",
    [
        L.ReLU(),
        L.ReLU(max_value=6.0),
        L.ReLU(max_value=2.5),
        L.Activation("relu6"),
        L.Activation("relu"),
        L.Activation("linear"),
        L.LeakyReLU(negative_slope=26 / 256),
    ],
    ids=lambda layer: layer.name,
)
@pytest.mark.parametrize("pos", [-3, 0, 5])
def test_activations(layer, pos):
    t = IntTensor(np.arange(-128, 128).reshape(2, -1), pos)
    assert np.array_equal(int_value(layer, t), keras_value(layer, t))


def test_leaky_relu_other_than_the_dpu_slope_is_refused():
    t = IntTensor(np.arange(-4, 4).reshape(1, -1), 2)
    with pytest.raises(UnsupportedError, match="leaky.*26/256.*convert_leaky_relu_to_dpu_version"):
        integer_layer(L.LeakyReLU(negative_slope=0.2, name="leaky"), [t], Context())


def test_layers_without_an_integer_form_return_none():
    t = IntTensor(np.arange(-4, 4).reshape(1, 2, 2, 2), 2)
    for layer in (L.Activation("softmax"), L.Activation("tanh"), L.UpSampling2D(2, interpolation="bilinear")):
        assert integer_layer(layer, [t], Context()) is None


def test_dpu_pooling():
    t = grid_tensor((2, 7, 7, 3), 4)
    for layer in (
        DPUAveragePooling2D(3, strides=2),
        DPUAveragePooling2D((2, 3), strides=1),
        DPUGlobalAveragePooling2D(),
    ):
        assert np.array_equal(int_value(layer, t), keras_value(layer, t))
    assert integer_layer(DPUAveragePooling2D(3), [t], Context()).pos == 4 + 6  # 3x3: times 7 / 2^6


@pytest.mark.parametrize(
    "layer",
    [
        L.AveragePooling2D(3, strides=2, padding="same"),
        L.AveragePooling2D(2),
        L.MaxPooling2D(3, strides=2, padding="same"),
        L.GlobalAveragePooling2D(),
        L.GlobalAveragePooling2D(keepdims=True),
        L.GlobalMaxPooling2D(),
    ],
    ids=lambda layer: layer.name,
)
def test_plain_pooling(layer):
    """An average is carried exactly (den the window count) and divided only when dequantized.

    The values are multiples of 36 * 35, so every average (over 1, 2, 3, 4, 6 or 9 values, or 35 for
    the global one) is an integer: exact in float32 on every backend, whether Keras divides or
    multiplies by a rounded 1 / count (JAX; see executor_test.PLAIN_AVERAGES).
    """
    t = grid_tensor((2, 5, 7, 3), 5, seed=1)
    t = IntTensor(t.values * 36 * 35, t.pos)
    assert np.array_equal(to_float(integer_layer(layer, [t], Context())), keras_value(layer, t).astype(np.float32))


@pytest.mark.parametrize(
    "layer",
    [L.Add(), L.Subtract(), L.Multiply(), L.Average(), L.Maximum(), L.Minimum(), L.Concatenate()],
    ids=lambda layer: layer.name,
)
def test_merging_at_different_positions(layer):
    a, b = grid_tensor((2, 3, 4), 5, seed=2), grid_tensor((2, 3, 4), np.array([2, 7, 4, 9]), seed=3)
    assert np.array_equal(int_value(layer, a, b), keras_value(layer, a, b))


def test_merging_averages_keeps_them_exact():
    """(a / 3 + b / 2) as one rational: 5/6 of a step, which float32 would round."""
    a = IntTensor(np.array([[1, 4]]), 0, den=3)
    b = IntTensor(np.array([[1, 1]]), 0, den=2)
    out = integer_layer(L.Add(), [a, b], Context())
    assert out.values.tolist() == [[5, 11]] and int(out.den) == 6


@pytest.mark.parametrize(
    "layer",
    [
        L.UpSampling2D((2, 1)),
        L.ZeroPadding2D(((1, 0), (0, 2))),
        L.Cropping2D(((1, 0), (0, 1))),
        L.Reshape((12, 2)),
        L.Flatten(),
        L.Permute((2, 1, 3)),
    ],
    ids=lambda layer: layer.name,
)
def test_layout(layer):
    t = grid_tensor((2, 3, 4, 2), np.array([3, 6]), seed=4)
    assert np.array_equal(int_value(layer, t), keras_value(layer, t))


def test_keep_positions_shifts_the_summed_axes_to_one_position():
    w = np.array([[1, 1], [1, 1], [1, 1]])
    pos = np.array([[2], [4], [3]])  # per input row: the rows are summed, so they must share a position
    ints, kept = keep_positions(w, pos, keep=(-1,))
    assert kept == 4 and ints.tolist() == [[4, 4], [1, 1], [2, 2]]
    ints, kept = keep_positions(w, np.array([[5, 6]]), keep=(-1,))
    assert kept.tolist() == [5, 6] and ints.tolist() == w.tolist()


def test_only_symmetric_power_of_2_quantizers_have_positions():
    with pytest.raises(UnsupportedError, match="conv.kernel: a FSQuantizer has float scales.*power-of-2"):
        quantizer_position(FSQuantizer(), {"scale": np.float32(0.1), "zero_point": np.float32(0)}, "conv.kernel")
    q = Pof2SQuantizer(symmetry=False)
    with pytest.raises(UnsupportedError, match="asymmetric"):
        quantizer_position(q, {"pos": np.float32(3), "zero_point": np.float32(2)}, "x")
    assert quantizer_position(Pof2SQuantizer(), {"pos": np.float32(3)}, "x") == 3


def _wrapped_conv(quantize_bias: bool):
    spec = {"type": "Pof2SQuantizer", "params": {"bit_width": 8, "round_mode": "HALF_AWAY_FROM_ZERO"}}
    conv = L.Conv2D(3, 3, padding="same", bias_initializer="random_normal")
    wrapper = QuantizeWrapper(conv, {"kernel": spec, **({"bias": spec} if quantize_bias else {})})
    wrapper.build((None, 5, 5, 2))
    for attr in wrapper.state:
        wrapper.state[attr]["pos"].assign(7.0)
    return wrapper


def test_a_wrapped_conv_and_its_bias():
    """Accumulator at input + weight position, bias aligned to it; a float bias makes the layer float."""
    t = grid_tensor((2, 5, 5, 2), 4, seed=5)
    wrapper = _wrapped_conv(True)
    out = integer_layer(wrapper, [t], Context())
    assert out.pos == 4 + 7
    assert np.array_equal(to_float(out, np.float64), keras_value(wrapper, t))
    assert integer_layer(_wrapped_conv(False), [t], Context()) is None


def test_overflowing_accumulators_are_recorded():
    t = IntTensor(np.full((1, 5, 5, 2), 2**22), 0)
    ctx = Context()
    wrapper = _wrapped_conv(True)
    wrapper.layer.kernel.assign(np.full((3, 3, 2, 3), 0.5, np.float32))
    integer_layer(wrapper, [t], ctx)
    assert ctx.overflow == [wrapper.layer.name]
