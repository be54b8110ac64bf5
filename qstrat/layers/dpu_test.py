"""The DPU layers and constants: the avgpool multiplier rule, and bit-exact layers against NumPy twins."""

import math
from fractions import Fraction

import keras
import numpy as np
import pytest
from keras import ops
from keras.src.testing import TestCase

from qstrat.layers.dpu import (
    LEAKY_RELU_SLOPE,
    DPUAveragePooling2D,
    DPUGlobalAveragePooling2D,
    DPUHardSigmoid,
    avgpool_factor,
    avgpool_multiplier,
    is_dpu_leaky_slope,
)

pytestmark = pytest.mark.portable

# The DPU's hard-coded multipliers for square kernels (reference §6), written out again here.
TABLE = {3: (7, 6), 5: (10, 8), 6: (7, 8), 7: (21, 10), 14: (21, 12)}


def np_(t):
    return ops.convert_to_numpy(t)


def rule(kh, kw):
    """The rule by brute force, in exact fractions: the first n in [0, 7 + ceil(log2 K)) minimising |k/2^n - 1/K|."""
    size = kh * kw
    best = None
    for n in range(7 + math.ceil(math.log2(size))):
        k = math.floor(Fraction(2**n, size) + Fraction(1, 2))  # nearest integer (ties only when K is a power of 2)
        err = abs(Fraction(k, 2**n) - Fraction(1, size))
        if best is None or err < best[0]:
            best = (err, k, n)
    return best[1], best[2]


def dpu_multiplier(kh, kw):
    return TABLE[kh] if kh == kw and kh in TABLE else rule(kh, kw)


def grid(shape, p=4, lo=-64, hi=64, seed=0):
    """Random values k * 2^-p, k an integer in [lo, hi]: sums and DPU products of these are exact in float32."""
    k = np.random.default_rng(seed).integers(lo, hi + 1, size=shape)
    return (k * 2.0**-p).astype("float32")


def window_sums(x, pool, strides):
    """NHWC window sums of a valid pooling, in float64, one window at a time."""
    (ph, pw), (sh, sw) = pool, strides
    n, h, w, c = x.shape
    oh, ow = (h - ph) // sh + 1, (w - pw) // sw + 1
    out = np.zeros((n, oh, ow, c))
    for i in range(oh):
        for j in range(ow):
            out[:, i, j, :] = x[:, i * sh : i * sh + ph, j * sw : j * sw + pw, :].astype(np.float64).sum(axis=(1, 2))
    return out


def exact_f32(expected):
    """The float64 expectation, after checking that float32 holds it exactly (so equality is the right test)."""
    assert np.array_equal(expected.astype(np.float32).astype(np.float64), expected)
    return expected


# ---- avgpool_multiplier and avgpool_factor ------------------------------------------------------------


@pytest.mark.parametrize("side,expected", sorted(TABLE.items()))
def test_square_kernels_of_the_table_use_the_hardware_multiplier(side, expected):
    assert avgpool_multiplier(side, side) == expected


def test_the_table_wins_over_the_rule():
    assert rule(3, 3) == (57, 9)  # 57/512, finer than the hardware's 7/64
    assert avgpool_multiplier(3, 3) == (7, 6)
    # 3x3, 5x5 and 6x6 are coarser than the rule; 7x7 and 14x14 are what the rule gives.
    assert [rule(s, s) for s in (3, 5, 6, 7, 14)] == [(57, 9), (41, 10), (57, 11), (21, 10), (21, 12)]


def test_rule_examples():
    assert avgpool_multiplier(9, 9) == (101, 13)
    assert avgpool_multiplier(10, 10) == (41, 12)  # 82/8192 is as near, but n = 12 comes first
    assert avgpool_multiplier(3, 5) == (17, 8)  # 34/512 and 68/1024 tie with it
    assert avgpool_multiplier(2, 7) == (73, 10)
    assert avgpool_multiplier(7, 2) == (73, 10)
    assert avgpool_multiplier(1, 1) == (1, 0)


@pytest.mark.parametrize("kh,kw", [(1, 2), (2, 2), (4, 4), (2, 4), (4, 2), (8, 8), (1, 16), (16, 16), (128, 256 // 2)])
def test_powers_of_two_give_exactly_one_over_k(kh, kw):
    k, n = avgpool_multiplier(kh, kw)
    assert Fraction(k, 2**n) == Fraction(1, kh * kw)
    assert (k, n) == (1, int(math.log2(kh * kw)))
    assert avgpool_factor(kh, kw) == 1.0


def test_every_small_kernel_follows_the_table_or_the_rule():
    for kh in range(1, 21):
        for kw in range(1, 21):
            assert avgpool_multiplier(kh, kw) == dpu_multiplier(kh, kw), (kh, kw)


@pytest.mark.parametrize("kh,kw", [(3, 255), (255, 255), (200, 17), (14, 13), (13, 14)])
def test_large_and_rectangular_kernels_follow_the_rule(kh, kw):
    assert avgpool_multiplier(kh, kw) == dpu_multiplier(kh, kw)


@pytest.mark.parametrize("kh,kw", [(256, 1), (1, 256), (256, 256), (300, 3)])
def test_sides_above_255_have_no_multiplier(kh, kw):
    assert avgpool_multiplier(kh, kw) is None
    assert avgpool_factor(kh, kw) == 1.0


@pytest.mark.parametrize("kh,kw", [(0, 3), (3, 0), (-1, 2), (0, 0)])
def test_invalid_sizes_raise(kh, kw):
    with pytest.raises(ValueError, match="at least 1"):
        avgpool_multiplier(kh, kw)


def test_avgpool_factor():
    assert avgpool_factor(7, 7) == 49 * 21 / 1024
    assert avgpool_factor(3, 3) == 9 * 7 / 64
    assert avgpool_factor(5, 5) == 25 * 10 / 256
    assert avgpool_factor(6, 6) == 36 * 7 / 256
    assert avgpool_factor(14, 14) == 196 * 21 / 4096
    assert avgpool_factor(9, 9) == 81 * 101 / 8192
    assert avgpool_factor(10, 10) == 100 * 41 / 4096
    assert avgpool_factor(3, 5) == 15 * 17 / 256


def test_leaky_relu_constants():
    assert LEAKY_RELU_SLOPE == 0.1015625 == 26 / 256
    assert is_dpu_leaky_slope(0.1) and is_dpu_leaky_slope(np.float32(0.1))
    assert not is_dpu_leaky_slope(0.2) and not is_dpu_leaky_slope(0.3) and not is_dpu_leaky_slope(LEAKY_RELU_SLOPE)


# ---- DPUHardSigmoid ------------------------------------------------------------------------------------


def test_hard_sigmoid_is_relu6_of_x_plus_3_times_2731_over_2_14_exactly():
    x = np.arange(-10 * 16, 10 * 16 + 1, dtype=np.float64) / 16  # every k/16 in [-10, 10]: -3 and 3 included
    expected = exact_f32(np.clip(x + 3, 0, 6) * 2731 / 16384)
    y = np_(DPUHardSigmoid()(x.astype("float32")[None]))[0]
    assert y.dtype == np.float32
    assert np.array_equal(y.astype(np.float64), expected)
    at = dict(zip(x.tolist(), y.tolist(), strict=True))
    assert at[-3.0] == 0.0 and at[-10.0] == 0.0
    assert at[3.0] == at[10.0] == 6 * 2731 / 16384
    assert at[0.0] == 3 * 2731 / 16384 != 0.5  # the DPU's 1/6 is not 1/6


def test_hard_sigmoid_differs_from_sigmoid_and_from_keras_hard_sigmoid():
    x = np.linspace(-4, 4, 33, dtype="float32")[None]
    y = np_(DPUHardSigmoid()(x))
    assert np.abs(y - np_(ops.sigmoid(x))).max() > 0.01
    keras_hs = np.clip(x.astype(np.float64) + 3, 0, 6) / 6
    # The largest gap is at x >= 3: 6 * 2731/16384 - 1 = 2/16384.
    assert np.abs(y - keras_hs).max() == 2 / 16384


# ---- DPUAveragePooling2D -------------------------------------------------------------------------------

POOLS = [
    ((2, 2), None),
    ((3, 3), (1, 1)),
    ((3, 3), (2, 2)),
    ((5, 5), (1, 1)),
    ((7, 7), (1, 1)),
    ((3, 5), (1, 1)),
    ((2, 7), (2, 2)),
    ((4, 1), (3, 3)),
]
# Strides that differ along height and width.
UNEQUAL_STRIDES = [((2, 3), (1, 2)), ((2, 7), (2, 1)), ((4, 1), (4, 1))]


def check_pooling(pool, strides, seed=0):
    x = grid((2, 9, 11, 3), seed=seed)
    y = np_(DPUAveragePooling2D(pool_size=pool, strides=strides)(x))
    k, n = dpu_multiplier(*pool)
    expected = exact_f32(window_sums(x, pool, strides or pool) * k / 2**n)
    assert y.shape == expected.shape and np.array_equal(y.astype(np.float64), expected)


@pytest.mark.parametrize("pool,strides", POOLS)
def test_average_pooling_is_the_window_sum_times_k_over_2n_exactly(pool, strides):
    check_pooling(pool, strides)


@pytest.mark.parametrize("pool,strides", UNEQUAL_STRIDES)
def test_average_pooling_with_unequal_strides(pool, strides):
    assert keras.layers.AveragePooling2D(pool, strides)(grid((2, 9, 11, 3))).shape[1] == (9 - pool[0]) // strides[0] + 1
    check_pooling(pool, strides)


@pytest.mark.parametrize("pool,strides", [((3, 3), (1, 1)), ((2, 3), (2, 2))])
def test_average_pooling_channels_first(pool, strides):
    x = grid((2, 8, 10, 3), seed=1)
    layer = DPUAveragePooling2D(pool_size=pool, strides=strides, data_format="channels_first")
    y = np_(layer(np.transpose(x, (0, 3, 1, 2))))
    k, n = dpu_multiplier(*pool)
    expected = exact_f32(window_sums(x, pool, strides) * k / 2**n)
    assert np.array_equal(np.transpose(y, (0, 2, 3, 1)).astype(np.float64), expected)


def test_average_pooling_differs_from_the_true_average_where_the_multiplier_is_not_1_over_k():
    x = grid((1, 6, 6, 2), seed=2, lo=1, hi=64)
    dpu = np_(DPUAveragePooling2D(pool_size=3, strides=1)(x))
    mean = window_sums(x, (3, 3), (1, 1)) / 9
    assert np.array_equal(dpu.astype(np.float64), window_sums(x, (3, 3), (1, 1)) * 7 / 64)
    assert np.all(dpu < mean)  # 7/64 < 1/9 and every sum is positive


def test_average_pooling_refuses_same_padding():
    with pytest.raises(ValueError, match="padding 'valid' only"):
        DPUAveragePooling2D(pool_size=2, padding="same")


def test_average_pooling_without_multiplier_or_channels_raises_at_build():
    with pytest.raises(ValueError, match="no DPU multiplier"):
        DPUAveragePooling2D(pool_size=(1, 256)).build((None, 1, 300, 2))
    with pytest.raises(ValueError, match="known channel count"):
        DPUAveragePooling2D(pool_size=2).build((None, 4, 4, None))


# ---- DPUGlobalAveragePooling2D -------------------------------------------------------------------------


@pytest.mark.parametrize("keepdims", [False, True])
@pytest.mark.parametrize("hw", [(7, 7), (3, 3), (8, 8), (9, 9), (6, 4), (4, 6), (5, 3)])
def test_global_average_pooling_is_the_sum_times_k_over_2n_exactly(hw, keepdims):
    x = grid((2, *hw, 3), seed=3)
    y = np_(DPUGlobalAveragePooling2D(keepdims=keepdims)(x))
    k, n = dpu_multiplier(*hw)
    expected = exact_f32(x.astype(np.float64).sum(axis=(1, 2), keepdims=keepdims) * k / 2**n)
    assert y.shape == expected.shape and np.array_equal(y.astype(np.float64), expected)


def test_global_average_pooling_channels_first():
    x = grid((2, 3, 6, 4), seed=4)  # N, C, H, W: a 6x4 window, K = 24
    y = np_(DPUGlobalAveragePooling2D(data_format="channels_first")(x))
    expected = exact_f32(x.astype(np.float64).sum(axis=(2, 3)) * 85 / 2**11)
    assert rule(6, 4) == (85, 11)
    assert np.array_equal(y.astype(np.float64), expected)


def test_global_average_pooling_of_unknown_size_raises_at_build():
    with pytest.raises(ValueError, match="known height and width"):
        DPUGlobalAveragePooling2D().build((None, None, None, 3))
    with pytest.raises(ValueError, match="known height and width"):
        DPUGlobalAveragePooling2D()(keras.Input((None, 5, 3)))
    with pytest.raises(ValueError, match="no DPU multiplier"):
        DPUGlobalAveragePooling2D().build((None, 256, 1, 3))


# ---- Keras layer checks and saving ---------------------------------------------------------------------


class DPULayersTest(TestCase):
    def test_hard_sigmoid_layer(self):
        self.run_layer_test(
            DPUHardSigmoid,
            init_kwargs={},
            input_shape=(2, 5, 3),
            expected_output_shape=(2, 5, 3),
            expected_num_trainable_weights=0,
            expected_num_non_trainable_weights=0,
            run_mixed_precision_check=False,
        )

    def test_average_pooling_layer(self):
        self.run_layer_test(
            DPUAveragePooling2D,
            init_kwargs={"pool_size": (2, 3), "strides": (2, 2)},
            input_shape=(2, 6, 7, 3),
            expected_output_shape=(2, 3, 3, 3),
            expected_num_trainable_weights=0,
            expected_num_non_trainable_weights=0,
            run_mixed_precision_check=False,
        )

    def test_global_average_pooling_layer(self):
        self.run_layer_test(
            DPUGlobalAveragePooling2D,
            init_kwargs={"keepdims": True},
            input_shape=(2, 5, 6, 3),
            expected_output_shape=(2, 1, 1, 3),
            expected_num_trainable_weights=0,
            expected_num_non_trainable_weights=0,
            run_mixed_precision_check=False,
        )


def test_save_and_load_keep_outputs_and_configs(tmp_path):
    i = keras.Input((5, 5, 3))
    hs = DPUHardSigmoid(name="hs")(i)
    pool = DPUAveragePooling2D(pool_size=3, strides=2, name="pool")(hs)  # 5x5 -> 2x2
    gap = DPUGlobalAveragePooling2D(keepdims=True, name="gap")(pool)
    model = keras.Model(i, [pool, gap])
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    x = grid((2, 5, 5, 3), p=2, lo=-16, hi=16, seed=5)
    for a, b in zip(model(x), loaded(x), strict=True):
        assert np.array_equal(np_(a), np_(b))
    for name, cls in (("hs", DPUHardSigmoid), ("pool", DPUAveragePooling2D), ("gap", DPUGlobalAveragePooling2D)):
        assert type(loaded.get_layer(name)) is cls
        assert loaded.get_layer(name).get_config() == model.get_layer(name).get_config()
    # The loaded model computes the DPU math, not plain averages.
    hs_np = np.clip(x.astype(np.float64) + 3, 0, 6) * 2731 / 16384
    expected_pool = exact_f32(window_sums(hs_np, (3, 3), (2, 2)) * 7 / 64)
    expected_gap = exact_f32(expected_pool.sum(axis=(1, 2), keepdims=True) / 4)
    y_pool, y_gap = (np_(t).astype(np.float64) for t in loaded(x))
    assert np.array_equal(y_pool, expected_pool) and np.array_equal(y_gap, expected_gap)
