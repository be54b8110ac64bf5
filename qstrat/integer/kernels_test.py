"""Integer kernels against a direct float64 reference (loops over output positions) and Keras in float64.

Every input and weight here is a small integer, so float64 sums are exact and
equality is exact.
"""

import itertools

import numpy as np
import pytest
from keras import layers as L
from keras import ops

from qstrat.errors import UnsupportedError
from qstrat.integer import kernels as K


def ints(rng, shape, lo=-8, hi=8):
    return rng.integers(lo, hi, shape).astype(np.int64)


def reference_conv(x, w, strides, padding, dilation, groups=1):
    """Direct definition: out[n, o..., co] = sum x[n, o * s + k * d - pad, ci] * w[k, ci, co] (float64)."""
    nd = w.ndim - 2
    x, w = x.astype(np.float64), w.astype(np.float64)
    pads, out_shape = [], []
    for n, k, s, d in zip(x.shape[1:-1], w.shape[:nd], strides, dilation, strict=True):
        k_eff = (k - 1) * d + 1
        if padding == "valid":
            before, length = 0, (n - k_eff) // s + 1
        elif padding == "causal":
            before, length = k_eff - 1, (n - 1) // s + 1
        else:
            length = -(-n // s)
            before = max((length - 1) * s + k_eff - n, 0) // 2
        pads.append(before)
        out_shape.append(length)
    cg, og = w.shape[-2], w.shape[-1] // groups
    out = np.zeros((x.shape[0], *out_shape, w.shape[-1]))
    for o in itertools.product(*(range(n) for n in out_shape)):
        for k in itertools.product(*(range(n) for n in w.shape[:nd])):
            at = [oi * s + ki * d - p for oi, ki, s, d, p in zip(o, k, strides, dilation, pads, strict=True)]
            if any(a < 0 or a >= n for a, n in zip(at, x.shape[1:-1], strict=True)):
                continue
            for g in range(groups):
                xs = x[(slice(None), *at, slice(g * cg, (g + 1) * cg))]
                out[(slice(None), *o, slice(g * og, (g + 1) * og))] += (
                    xs @ w[(*k, slice(None), slice(g * og, (g + 1) * og))]
                )
    return out


CONV_CASES = [
    # (input spatial, kernel, strides, padding, dilation, groups)
    ((9,), (3,), (1,), "valid", (1,), 1),
    ((9,), (3,), (2,), "same", (1,), 1),
    ((10,), (3,), (1,), "causal", (2,), 1),
    ((7, 8), (3, 3), (1, 1), "same", (1, 1), 1),
    ((7, 8), (3, 2), (2, 3), "same", (1, 1), 2),
    ((9, 9), (3, 3), (1, 1), "valid", (2, 2), 1),
    ((8, 8), (2, 2), (2, 2), "valid", (1, 1), 1),
    ((5, 6, 4), (2, 3, 2), (1, 2, 1), "same", (1, 1, 1), 1),
]


@pytest.mark.portable
@pytest.mark.parametrize("spatial,kernel,strides,padding,dilation,groups", CONV_CASES)
def test_conv_equals_the_direct_definition(spatial, kernel, strides, padding, dilation, groups):
    rng = np.random.default_rng(0)
    x = ints(rng, (2, *spatial, 4), -128, 128)
    w = ints(rng, (*kernel, 4 // groups, 6), -128, 128)
    got = K.conv(x, w, strides, padding, dilation, groups)
    assert got.dtype == np.int64
    assert np.array_equal(got, reference_conv(x, w, strides, padding, dilation, groups))


@pytest.mark.portable
@pytest.mark.parametrize("spatial,kernel,strides,padding,dilation,groups", CONV_CASES[:7])
@pytest.mark.parametrize("multiplier", [1, 3])
def test_depthwise_conv_equals_a_grouped_conv(spatial, kernel, strides, padding, dilation, groups, multiplier):
    """Depthwise = a conv with one group per channel, output channel c * M + m."""
    rng = np.random.default_rng(1)
    x = ints(rng, (2, *spatial, 4))
    w = ints(rng, (*kernel, 4, multiplier))
    grouped = w.reshape(*kernel, 1, 4 * multiplier)  # group c holds columns c * M .. c * M + M - 1
    want = reference_conv(x, grouped, strides, padding, dilation, groups=4)
    assert np.array_equal(K.depthwise_conv(x, w, strides, padding, dilation), want)


TRANSPOSE_CASES = [
    ((5,), (3,), (2,), "same", (1,), None),
    ((5,), (3,), (2,), "valid", (1,), None),
    ((5,), (2,), (3,), "valid", (1,), None),
    ((4, 5), (3, 3), (2, 2), "same", (1, 1), None),
    ((4, 5), (3, 2), (2, 3), "valid", (1, 1), (1, 2)),
    ((4, 4), (3, 3), (1, 1), "same", (2, 2), None),
    ((3, 4, 3), (2, 3, 2), (2, 1, 2), "same", (1, 1, 1), None),
]


@pytest.mark.portable
@pytest.mark.parametrize("spatial,kernel,strides,padding,dilation,output_padding", TRANSPOSE_CASES)
def test_conv_transpose_is_the_adjoint_of_conv(spatial, kernel, strides, padding, dilation, output_padding):
    """<conv(y, w), x> == <y, conv_transpose(x, w)> for every y: TensorFlow's definition of the transpose."""
    rng = np.random.default_rng(2)
    x = ints(rng, (2, *spatial, 3))
    w = ints(rng, (*kernel, 5, 3))
    t = K.conv_transpose(x, w, strides, padding, dilation, output_padding)
    for n, k, s, d, p, got in zip(
        spatial, kernel, strides, dilation, output_padding or (None,) * len(spatial), t.shape[1:-1], strict=True
    ):
        assert got == K.conv_transpose_length(n, k, s, padding, d, p)
    for _ in range(3):
        y = ints(rng, t.shape)
        forward = K.conv(y, w, strides, padding, dilation)
        if forward.shape != x.shape:  # output_padding: the forward conv reads the extra rows too
            forward = forward[tuple(slice(0, n) for n in x.shape)]
        assert int(np.sum(forward * x)) == int(np.sum(y * t))


def _keras64(layer, x, weights=()):
    layer.build(x.shape)
    if weights:
        layer.set_weights([np.asarray(a, np.float64) for a in weights])
    return ops.convert_to_numpy(layer(ops.convert_to_tensor(x.astype(np.float64))))


@pytest.mark.portable
@pytest.mark.parametrize(
    "make,kernel_shape,call",
    [
        (lambda: L.Conv1D(5, 3, strides=2, padding="same", use_bias=False, dtype="float64"), (3, 4, 5), "conv"),
        (lambda: L.Conv1D(5, 3, padding="causal", dilation_rate=2, use_bias=False, dtype="float64"), (3, 4, 5), "conv"),
        (lambda: L.Conv2D(6, 3, strides=2, padding="same", use_bias=False, dtype="float64"), (3, 3, 4, 6), "conv"),
        (lambda: L.Conv2D(6, (2, 3), dilation_rate=2, use_bias=False, dtype="float64"), (2, 3, 4, 6), "conv"),
        (lambda: L.Conv3D(2, 2, padding="same", use_bias=False, dtype="float64"), (2, 2, 2, 4, 2), "conv"),
        (
            lambda: L.DepthwiseConv2D(
                3, depth_multiplier=2, strides=2, padding="same", use_bias=False, dtype="float64"
            ),
            (3, 3, 4, 2),
            "depthwise",
        ),
        (lambda: L.DepthwiseConv1D(3, padding="valid", use_bias=False, dtype="float64"), (3, 4, 1), "depthwise"),
        (
            lambda: L.Conv2DTranspose(3, 3, strides=2, padding="same", use_bias=False, dtype="float64"),
            (3, 3, 3, 4),
            "transpose",
        ),
        (
            lambda: L.Conv2DTranspose(3, 2, strides=2, output_padding=1, use_bias=False, dtype="float64"),
            (2, 2, 3, 4),
            "transpose",
        ),
        (
            lambda: L.Conv1DTranspose(3, 3, strides=2, padding="valid", use_bias=False, dtype="float64"),
            (3, 3, 4),
            "transpose",
        ),
    ],
)
def test_kernels_equal_keras_in_float64(make, kernel_shape, call):
    rng = np.random.default_rng(3)
    nd = len(kernel_shape) - 2
    x = ints(rng, (2, *((6,) * nd), 4))
    w = ints(rng, kernel_shape)
    layer = make()
    want = _keras64(layer, x, [w])
    fn = {"conv": K.conv, "depthwise": K.depthwise_conv, "transpose": K.conv_transpose}[call]
    kwargs = {"output_padding": layer.output_padding} if call == "transpose" else {}
    got = fn(x, w, layer.strides, layer.padding, layer.dilation_rate, **kwargs)
    assert np.array_equal(got, want)


@pytest.mark.portable
def test_dense_equals_matmul():
    rng = np.random.default_rng(4)
    x, w = ints(rng, (3, 5, 7), -128, 128), ints(rng, (7, 4), -128, 128)
    assert np.array_equal(K.dense(x, w), x.astype(np.float64) @ w.astype(np.float64))


POOL_SPATIAL = (7, 6)
POOL_CASES = [((2, 2), None), ((3, 3), (2, 2)), ((3, 2), (1, 2))]


def _uneven(pool, strides, padding) -> bool:
    """True when a 'same' window pads more after than before along some axis of POOL_SPATIAL."""
    strides = strides or pool
    pads = [K.padding_amounts(n, k, s, padding) for n, k, s in zip(POOL_SPATIAL, pool, strides, strict=True)]
    return any(before != after for before, after in pads)


# Keras' torch backend can average a 'same' window with uneven padding differently at the borders
# from TensorFlow and JAX (3x3, stride 2 on 7x6, one pad after the columns only, does); the integer kernels
# follow TensorFlow, so those cases run on TensorFlow and JAX only (not marked portable).
@pytest.mark.parametrize(
    "pool,strides,padding",
    [
        pytest.param(pool, strides, padding, marks=[] if _uneven(pool, strides, padding) else [pytest.mark.portable])
        for (pool, strides), padding in itertools.product(POOL_CASES, ["valid", "same"])
    ],
)
def test_pooling_equals_keras(pool, strides, padding):
    """Max ignores 'same' pads; the average divides by the elements each window reads (Keras' rule).

    The inputs are multiples of 36, so every average (over 1, 2, 3, 4, 6 or 9) is an integer: exact on
    every backend, whether it divides or multiplies by a rounded 1 / count (JAX).
    """
    rng = np.random.default_rng(5)
    x = ints(rng, (2, *POOL_SPATIAL, 3), -100, 100) * 36
    want_max = _keras64(L.MaxPooling2D(pool, strides, padding, dtype="float64"), x)
    assert np.array_equal(K.max_pool(x, pool, strides, padding), want_max)
    want_avg = _keras64(L.AveragePooling2D(pool, strides, padding, dtype="float64"), x)
    sums = K.sum_pool(x, pool, strides, padding)
    count = K.window_count(x.shape[1:-1], pool, strides, padding)
    assert np.array_equal(sums / count, want_avg)
    assert (np.ndim(count) == 0) == (padding == "valid")


@pytest.mark.portable
def test_one_dimensional_pooling_equals_keras():
    rng = np.random.default_rng(6)
    x = ints(rng, (2, 9, 3), -100, 100) * 6  # averages over 2 or 3: integers
    assert np.array_equal(
        K.max_pool(x, 2, None, "same"), _keras64(L.MaxPooling1D(2, padding="same", dtype="float64"), x)
    )
    count = K.window_count((9,), 3, 2, "same")
    want = _keras64(L.AveragePooling1D(3, 2, padding="same", dtype="float64"), x)
    assert np.array_equal(K.sum_pool(x, 3, 2, "same") / count, want)


@pytest.mark.portable
def test_resampling_and_padding_equal_keras():
    rng = np.random.default_rng(7)
    x = ints(rng, (2, 3, 4, 2))
    assert np.array_equal(K.upsample(x, (2, 3)), _keras64(L.UpSampling2D((2, 3), dtype="float64"), x))
    pads = ((1, 0), (2, 1))
    assert np.array_equal(K.zero_pad(x, pads), _keras64(L.ZeroPadding2D(pads, dtype="float64"), x))
    crops = ((1, 1), (0, 2))
    assert np.array_equal(K.crop(x, crops), _keras64(L.Cropping2D(crops, dtype="float64"), x))
    assert K.zero_pad(x, pads, fill=1)[:, 0].tolist() == np.ones((2, 7, 2)).tolist()


@pytest.mark.portable
def test_a_window_larger_than_the_input_is_refused():
    with pytest.raises(UnsupportedError, match="does not fit"):
        K.conv(np.zeros((1, 2, 1), np.int64), np.zeros((3, 1, 1), np.int64))
    with pytest.raises(UnsupportedError, match="input channels"):
        K.conv(np.zeros((1, 4, 2), np.int64), np.zeros((3, 1, 1), np.int64))
