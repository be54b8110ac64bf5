"""`qstrat.quantizers.framework_op`: the whole-tensor version of TensorFlow's per-channel framework op, value for
value against the op itself, and used only where it was asked for.

The values tested are where a rounding could go either way: every grid point,
every midpoint between two (a tie of floor(u + 0.5)) and the float32s on
either side of it, the nudged range's ends and beyond, and random values,
for grids of 2 to 16 bits, narrow or not, with ranges holding zero or not
(a zero point nudged to the grid's end).
"""

import itertools

import keras
import numpy as np
import pytest
from keras import ops

from qstrat.quantizers import FSQuantizer
from qstrat.quantizers import fake_quant as fq
from qstrat.quantizers.framework_op import nudged, per_channel_fake_quant

pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="a TensorFlow kernel")


def hard_values(rng, lo, hi, bits, narrow, rows):
    """[rows, C] float32: per channel, grid points, ties and their neighbours, the ends, random values."""
    qmin, qmax = (1 if narrow else 0), 2**bits - 1
    nmin, nmax, scale, _, _ = nudged(lo, hi, qmin, qmax)
    k = rng.integers(-2, qmax - qmin + 3, size=(rows, lo.size)).astype(np.float32)
    points = (k * scale + nmin).astype(np.float32)
    ties = ((k + np.float32(0.5)) * scale + nmin).astype(np.float32)
    kinds = rng.integers(0, 6, size=points.shape)
    x = np.select(
        [kinds == 0, kinds == 1, kinds == 2, kinds == 3, kinds == 4],
        [points, ties, np.nextafter(ties, np.float32(np.inf)), np.nextafter(ties, np.float32(-np.inf)),
         np.where(rng.random(points.shape) < 0.5, nmin, nmax)],
        rng.uniform(lo - (hi - lo), hi + (hi - lo), size=points.shape),
    ).astype(np.float32)  # fmt: skip
    return x


@pytest.mark.parametrize(("bits", "narrow"), [(8, False), (8, True), (4, False), (2, False), (16, False)])
def test_whole_tensor_ops_give_the_framework_ops_values(bits, narrow):
    import tensorflow as tf

    rng = np.random.default_rng(bits + narrow)
    for trial in range(12):
        c = int(rng.integers(1, 300))
        a = rng.lognormal(0, 2, size=c).astype(np.float32)
        lo, hi = -a * rng.uniform(0, 1.5, c).astype(np.float32), a
        if trial % 3 == 1:  # ranges that exclude zero: the zero point is nudged to an end of the grid
            lo, hi = a * np.float32(0.25), a
        if trial % 3 == 2:
            lo, hi = -a, -a * np.float32(0.5)
        x = hard_values(rng, lo.astype(np.float32), hi.astype(np.float32), bits, narrow, 256)
        want = tf.quantization.fake_quant_with_min_max_vars_per_channel(
            x, lo, hi, num_bits=bits, narrow_range=narrow
        ).numpy()
        with fq.forward_only():
            got = per_channel_fake_quant(tf.constant(x), lo, hi, -1, bits, narrow)
        assert got is not None
        assert np.array_equal(got.numpy(), want), (trial, np.flatnonzero(got.numpy() != want)[:5])


@pytest.mark.parametrize("axis", [-1, -2, 0])
def test_fs_weights_get_the_same_values_forward_only(axis):
    rng = np.random.default_rng(3)
    w = (rng.normal(size=(3, 5, 24, 16)) * rng.lognormal(0, 1, size=16)).astype(np.float32)
    for symmetry, narrow in itertools.product([False, True], [False, True]):
        q = FSQuantizer(per_channel=True, channel_axis=axis, symmetry=symmetry, narrow_range=narrow,
                        round_mode="HALF_UP", use_framework_quantizer=True)  # fmt: skip
        state = q.state_from_tensor(w * np.float32(0.8))  # values beyond the range clip
        t = ops.convert_to_tensor(w)
        op = ops.convert_to_numpy(q(t, state))
        with fq.forward_only():
            fast = ops.convert_to_numpy(q(t, state))
        assert np.array_equal(fast, op)


def test_only_where_asked():
    import tensorflow as tf

    lo, hi = np.float32([-1.0, -2.0]), np.float32([1.0, 2.0])
    x = tf.constant(np.float32([[0.3, -0.7]]))
    assert per_channel_fake_quant(x, lo, hi, -1, 8, False) is None  # outside forward_only
    with fq.forward_only():
        assert per_channel_fake_quant(x, lo, hi, -1, 8, False) is not None
        # a channel the op sets to zero (min = max = 0) and a reversed range: the op's own business
        assert per_channel_fake_quant(x, np.float32([0.0, -2.0]), np.float32([0.0, 2.0]), -1, 8, False) is None
        assert per_channel_fake_quant(x, hi, lo, -1, 8, False) is None
        assert per_channel_fake_quant(tf.cast(x, "float16"), lo, hi, -1, 8, False) is None
        tiny = np.float32(1e-39)  # a subnormal range: TensorFlow would flush it to zero, NumPy would not
        assert per_channel_fake_quant(x, np.float32([-tiny, -2.0]), np.float32([tiny, 2.0]), -1, 8, False) is None
        traced = tf.function(lambda v: per_channel_fake_quant(v, lo, hi, -1, 8, False) is None)
        assert bool(traced(x))  # traced code keeps the op


def test_export_grid_nudges_a_tied_zero_point_as_the_op_does():
    import tensorflow as tf

    from qstrat.quantizers.affine import affine_of

    # FS state for the range [-2.5, 252.5]: scale 1, and a zero point qmin - lo / scale = 2.5 on the op's
    # unsigned grid, a tie the op rounds away from zero (to 3: its grid starts at -3), not to even (2).
    q = FSQuantizer(per_channel=False, symmetry=False, round_mode="HALF_UP", use_framework_quantizer=True)
    state = {"scale": np.float32(1.0), "zero_point": np.float32(-125.5)}
    scale, zp, _ = affine_of(q, state, "t")
    lowest = float((q.grid.qmin - zp) * scale)
    op = tf.quantization.fake_quant_with_min_max_vars(tf.constant([-10.0]), -2.5, 252.5, num_bits=8).numpy()
    assert lowest == float(op[0]) == -3.0
