"""Bit widths 17 to 32 (the int32 bias): kernels, twins, range searches, the strategy rule, end to end.

Above 24 bits float32 does not hold every integer of the grid, so the spec
(reference.py) is the float32 nearest to the exact grid value. Here the twin
is checked against that spec computed with Python's exact integers and
fractions, and the keras.ops kernels against the twin, bit for bit.
"""

import contextlib
import json
import math
from fractions import Fraction

import keras
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from keras import ops

import qstrat
from qstrat.errors import ConfigError
from qstrat.layers import QuantizeWrapper
from qstrat.quantizers import FSQuantizer, MAFSQuantizer, Pof2SQuantizer, TQTQuantizer, percentile_kl, ranges
from qstrat.quantizers import fake_quant as fq
from qstrat.quantizers import reference as ref
from qstrat.quantizers.fake_quant_test import grad_of
from qstrat.quantizers.grid import RoundMode, float32_inside, int_grid
from qstrat.quantizers.stats import histogram_of_rows
from qstrat.strategy import load_strategy
from qstrat.strategy.match import NodeView
from qstrat.strategy.resolve import resolve_views

pytestmark = pytest.mark.portable

ROUND_MODES = list(RoundMode)
# (bits, unsigned, narrow): 24 bits is the last width float32 holds whole, the others are wider.
WIDE_GRIDS = [
    (24, False, False),
    (24, True, False),
    (25, False, False),
    (25, True, False),
    (26, False, True),
    (31, False, False),
    (31, True, False),
    (32, False, False),
    (32, False, True),
    (32, True, False),
]
REG = "quantize_registry_config"
F32 = np.float32


def np_(t):
    return ops.convert_to_numpy(t)


def bits_of(a):
    """The float32 bit patterns, for equality bit for bit; -0.0 reads as 0.0.

    The sign of a zero result is not part of the spec: R(-0.3) is -0.0 or 0.0 depending on how a
    round mode is written (the twin's and the kernels' HALF_TO_ZERO differ), and both are zero.
    """
    return np.ascontiguousarray(np.asarray(a, np.float32) + np.float32(0.0)).view(np.uint32)


# ---- the spec, with Python's exact integers --------------------------------------------------------


def exact_f32(t: int, s) -> float:
    """The float32 nearest to t * s (ties to even), for an integer t and a float32 s > 0."""
    if t == 0:
        return 0.0
    mant, e = math.frexp(float(s))
    m, k = int(mant * 2**24), e - 24  # s = m * 2^k exactly: a float32 has 24 significant bits
    n = abs(t) * m
    shift = max(n.bit_length() - 24, 0)
    q, r = n >> shift, n & ((1 << shift) - 1)
    if shift and (2 * r > (1 << shift) or (2 * r == (1 << shift) and q % 2)):
        q += 1
    return math.copysign(math.ldexp(q, shift + k), t)


def exact_round(u: Fraction, mode: RoundMode) -> int:
    if mode == RoundMode.HALF_TO_EVEN:
        return round(u)  # Python rounds a Fraction half to even
    if mode == RoundMode.HALF_UP:
        return math.floor(u + Fraction(1, 2))
    if mode == RoundMode.FLOOR:
        return math.floor(u)
    sign = 1 if u >= 0 else -1
    if mode == RoundMode.HALF_AWAY_FROM_ZERO:
        return sign * math.floor(abs(u) + Fraction(1, 2))
    return sign * math.ceil(abs(u) - Fraction(1, 2))  # HALF_TO_ZERO


def spec(x, s, zp: int, grid, mode) -> float:
    """round32((clip(R(u) + zp, qmin, qmax) - zp) * s), with u = x * (1 / s) in float32 (the convention)."""
    u = Fraction(float(F32(x) * (F32(1) / F32(s))))
    q = min(max(exact_round(u, mode) + zp, grid.qmin), grid.qmax)
    return exact_f32(q - zp, F32(s))


def wide_values(grid, s, zp: float) -> np.ndarray:
    """x in float32 whose u = x / s lies at the grid ends, past them, near 2^24 and 2^31, at ties and inside."""
    lo, hi = grid.qmin - zp, grid.qmax - zp
    levels = [lo - 300, lo - 1, lo, lo + 1, hi - 1, hi, hi + 1, hi + 300, 0, 1, -1, 2.5, -2.5, 7.5, 1000.5]
    for big in (2**23, 2**24, 2**25, 2**30, 2**31, 2**32):
        levels += [big - 2, big - 1.5, big - 1, big - 0.5, big, big + 1, big + 2, big + 256, -big, -big - 1, -big + 0.5]
    u = np.array(levels, np.float64)
    u = u[(u > lo - 2**20) & (u < hi + 2**20)]  # near the grid, on either side
    return (u * float(s)).astype(np.float32)


def zero_points(grid):
    """Integer zero points in float32, as the state holds them: the ends, zero, and values where float32 is coarse."""
    a, b = float32_inside(grid)
    quarter = grid.levels // 4  # odd offsets from it make qmin - zp or qmax - zp odd and wider than 2^24
    cands = [a, b, 0.0, grid.qmin + 2**24 + 2, (grid.qmin + grid.qmax) // 2 + 77, -quarter - 2, quarter + 1]
    return sorted({float(F32(z)) for z in cands if a <= float(F32(z)) <= b})


SCALES = [F32(2.0**-31), F32(1.5), F32(1 / 3), F32(0.0213), F32(7.3e-10)]


# ---- the twin is the spec ---------------------------------------------------------------------------


def test_round_product_is_the_float32_nearest_to_the_exact_product():
    rng = np.random.default_rng(0)
    # The grid ends, and ties: with s a power of two, 2^25 + 2 and 2^31 - 64 lie halfway between float32s.
    special = [2**31 - 1, -(2**31), 2**32 - 1, 2**25 - 1, 2**24 + 1, 2**25 + 2, 2**25 + 6, 2**31 - 64, 0, 1, -1]
    special_s = [1.0, 2.0**-20, 1.5, 1 / 3, 7.3e-10]
    t = np.concatenate([rng.integers(-(2**33), 2**33, 3000), np.repeat(special, len(special_s))])
    s = np.concatenate([np.exp(rng.uniform(-30, 30, 3000)), np.tile(special_s, len(special))]).astype(np.float32)
    got = ref.round_product(t.astype(np.float64), s)
    want = np.array([exact_f32(int(a), b) for a, b in zip(t, s, strict=True)], np.float32)
    assert np.array_equal(bits_of(got), bits_of(want))
    assert ref.round_product(2**31 - 1, F32(1.0)) == 2.0**31  # qmax rounds up, off the grid: the nearest float32


@pytest.mark.parametrize("bits,unsigned,narrow", [g for g in WIDE_GRIDS if g[0] in (25, 32)])
def test_twin_is_the_exact_spec(bits, unsigned, narrow):
    grid = int_grid(bits, unsigned, narrow)
    for s in SCALES:
        for zp in zero_points(grid):
            x = wide_values(grid, s, zp)
            for mode in ROUND_MODES:
                got = ref.affine_fake_quant_np(x, s, zp, grid, mode)
                want = np.array([spec(v, s, int(zp), grid, mode) for v in x], np.float32)
                assert np.array_equal(bits_of(got), bits_of(want)), (s, zp, mode, x[got != want])


# ---- the kernels are the twin ----------------------------------------------------------------------------


def channels(grid, scales, zps):
    """x of shape (n, C): channel c holds `wide_values` for scales[c] and zps[c] (repeated to length n)."""
    cols = [wide_values(grid, s, z) for s, z in zip(scales, zps, strict=True)]
    n = max(len(c) for c in cols)
    return np.stack([np.resize(c, n) for c in cols], axis=1)


@pytest.mark.parametrize("bits,unsigned,narrow", WIDE_GRIDS)
def test_pof2_kernel_matches_twin_bit_for_bit(bits, unsigned, narrow):
    grid = int_grid(bits, unsigned, narrow)
    # One channel per (position, zero point): the positions of a bias at this width, 0, and a negative one.
    pairs = [(p, z) for p in (bits - 1, 0, -3) for z in zero_points(grid)]
    pos = np.array([p for p, _ in pairs], np.float32)
    zps = np.array([z for _, z in pairs], np.float32)
    x = channels(grid, np.ldexp(F32(1), -pos.astype(np.int32)), zps)
    xs = channels(grid, np.ldexp(F32(1), -pos.astype(np.int32)), np.zeros_like(zps))
    for mode in ROUND_MODES:
        got = np_(fq.pof2_fake_quant(ops.convert_to_tensor(x), pos, grid.qmin, grid.qmax, mode, -1, zps))
        want = ref.pof2_fake_quant_np(x, pos, grid, mode, 1, zps)
        assert np.array_equal(bits_of(got), bits_of(want)), (mode, x[got != want])
        got = np_(fq.pof2_fake_quant(ops.convert_to_tensor(xs), pos, grid.qmin, grid.qmax, mode, -1))  # symmetric
        want = ref.pof2_fake_quant_np(xs, pos, grid, mode, 1)
        assert np.array_equal(bits_of(got), bits_of(want)), (mode, xs[got != want])


@pytest.mark.parametrize("bits,unsigned,narrow", WIDE_GRIDS)
def test_affine_kernel_matches_twin_bit_for_bit(bits, unsigned, narrow):
    grid = int_grid(bits, unsigned, narrow)
    pairs = [(s, z) for s in SCALES for z in zero_points(grid)]
    scales = np.array([s for s, _ in pairs], np.float32)
    zps = np.array([z for _, z in pairs], np.float32)
    x = channels(grid, scales, zps)
    for mode in ROUND_MODES:
        got = np_(fq.affine_fake_quant(ops.convert_to_tensor(x), scales, zps, grid.qmin, grid.qmax, mode, -1))
        want = ref.affine_fake_quant_np(x, scales, zps, grid, mode, 1)
        assert np.array_equal(bits_of(got), bits_of(want)), (mode, x[got != want])
        # Per tensor, too: a scalar scale and zero point.
        got = np_(fq.affine_fake_quant(ops.convert_to_tensor(x[:, 0]), scales[0], zps[0], grid.qmin, grid.qmax, mode))
        want = ref.affine_fake_quant_np(x[:, 0], scales[0], zps[0], grid, mode)
        assert np.array_equal(bits_of(got), bits_of(want)), mode


@pytest.mark.parametrize("bits", [31, 32])
def test_per_channel_and_forward_only_kernels_match_twin(bits):
    grid = int_grid(bits)
    zps = np.array(zero_points(grid)[:4], np.float32)
    scales = np.array([1.5, 1 / 3, 7.3e-10, 2.0**-30], np.float32)[: zps.size]
    x = channels(grid, scales, zps)  # channel c holds values at its own grid's ends
    for mode in (RoundMode.HALF_TO_EVEN, RoundMode.HALF_AWAY_FROM_ZERO):
        want = ref.affine_fake_quant_np(x, scales, zps, grid, mode, 1)
        got = np_(fq.affine_fake_quant(ops.convert_to_tensor(x), scales, zps, grid.qmin, grid.qmax, mode, -1))
        assert np.array_equal(bits_of(got), bits_of(want))
        with fq.forward_only():  # NumPy state: the bounds are computed in NumPy, the same bits
            got = np_(fq.affine_fake_quant(ops.convert_to_tensor(x), scales, zps, grid.qmin, grid.qmax, mode, -1))
        assert np.array_equal(bits_of(got), bits_of(want))
        pos = np.array([30, 0, 31, 5], np.float32)[: zps.size]
        xp = x * np.ldexp(F32(1), -pos.astype(np.int32)) / scales
        want = ref.pof2_fake_quant_np(xp, pos, grid, mode, 1, zps)
        for forward_only in (False, True):
            with fq.forward_only() if forward_only else contextlib.nullcontext():
                got = fq.pof2_fake_quant(ops.convert_to_tensor(xp), pos, grid.qmin, grid.qmax, mode, -1, zps)
            assert np.array_equal(bits_of(np_(got)), bits_of(want)), forward_only


def test_wide_kernels_keep_their_bits_when_compiled():
    """XLA (jit) and TensorFlow's graph optimizer must not reassociate the exact limb arithmetic."""
    grid = int_grid(32)
    zps = np.array(zero_points(grid)[:4], np.float32)
    s = np.full(zps.shape, 1 / 3, np.float32)
    x = channels(grid, s, zps)
    want = ref.affine_fake_quant_np(x, s, zps, grid, "HALF_UP", 1)

    def f(xt, st, zt):
        return fq.affine_fake_quant(xt, st, zt, grid.qmin, grid.qmax, "HALF_UP", -1)

    for run in _compiled(f):
        got = np_(run(ops.convert_to_tensor(x), ops.convert_to_tensor(s), ops.convert_to_tensor(zps)))
        assert np.array_equal(bits_of(got), bits_of(want))


def _compiled(f):
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return [tf.function(f), tf.function(f, jit_compile=True)]
    if backend == "jax":
        import jax

        return [jax.jit(f)]
    return [f]


@pytest.mark.parametrize("bits,unsigned,narrow", [(25, False, False), (32, False, False), (32, True, False)])
def test_straight_through_mask_is_exact_at_the_grid_ends(bits, unsigned, narrow):
    grid = int_grid(bits, unsigned, narrow)
    for zp in [None, *zero_points(grid)]:
        s = F32(2.0**-10)
        x = wide_values(grid, s, zp or 0.0)
        w = np.arange(1, x.size + 1, dtype=np.float32)
        want = ref.ste_mask_np(x, s, zp or 0.0, grid, "HALF_TO_EVEN") * w
        z = None if zp is None else F32(zp)

        def f(t, z=z, w=w):
            y = fq.pof2_fake_quant(t, F32(10), grid.qmin, grid.qmax, "HALF_TO_EVEN", None, z)
            return ops.sum(y * ops.convert_to_tensor(w))

        _, (g,) = grad_of(f, x)
        assert np.array_equal(np_(g), want), zp
        if zp is None:
            continue
        sa = F32(1 / 3)
        xa = wide_values(grid, sa, zp)
        wa = np.arange(1, xa.size + 1, dtype=np.float32)
        want = ref.ste_mask_np(xa, sa, zp, grid, "HALF_TO_EVEN") * wa

        def h(t, z=z, wa=wa, sa=sa):
            y = fq.affine_fake_quant(t, sa, z, grid.qmin, grid.qmax, "HALF_TO_EVEN")
            return ops.sum(y * ops.convert_to_tensor(wa))

        _, (g,) = grad_of(h, xa)
        assert np.array_equal(np_(g), want), zp


def test_tqt_mask_at_32_bits():
    # Threshold 1 (log_th 0): pos 31, so u = x * 2^31. 2^31 - 128 (the float32 below 2^31) is on the
    # grid, 2^31 is not: qmax = 2^31 - 1 itself rounds to 2^31 in float32.
    grid = int_grid(32)
    x = np.array([1 - 2.0**-24, 1.0, -1.0, -1 - 2.0**-23, 0.5], np.float32)

    def f(t, lt):
        return ops.sum(fq.tqt_fake_quant(t, lt, 32, grid.qmin, grid.qmax, "HALF_TO_EVEN", False))

    out, (g, _) = grad_of(f, x, F32(0.0))
    assert np.array_equal(np_(g), [1, 0, 1, 0, 1])
    y = ref.tqt_fake_quant_np(x, F32(0.0), 32, grid, "HALF_TO_EVEN")
    assert y[1] == 1.0 and np.isclose(float(np_(out)), float(np.sum(y.astype(np.float64))), rtol=1e-6)


# ---- properties ------------------------------------------------------------------------------------------


@given(
    bits=st.integers(17, 32),
    unsigned=st.booleans(),
    narrow=st.booleans(),
    pos=st.integers(-4, 40),
    mode=st.sampled_from(ROUND_MODES),
    seed=st.integers(0, 2**16),
)
def test_wide_pof2_properties(bits, unsigned, narrow, pos, mode, seed):
    narrow = narrow and not unsigned
    grid = int_grid(bits, unsigned, narrow)
    step = 2.0**-pos
    rng = np.random.default_rng(seed)
    u = np.concatenate([rng.uniform(grid.qmin - 3, grid.qmax + 3, 200), grid.qmax - rng.uniform(-400, 400, 57)])
    x = (u * step).astype(np.float32)
    y = np_(fq.pof2_fake_quant(ops.convert_to_tensor(x), float(pos), grid.qmin, grid.qmax, mode))
    # On the grid, up to float32: y / step is an integer between the float32s nearest the grid ends.
    k = y.astype(np.float64) / step
    assert np.array_equal(k, np.round(k)) and k.min() >= float(F32(grid.qmin)) and k.max() <= float(F32(grid.qmax))
    # Idempotent: round32 of a grid value re-quantizes to itself.
    yy = np_(fq.pof2_fake_quant(ops.convert_to_tensor(y), float(pos), grid.qmin, grid.qmax, mode))
    assert np.array_equal(y, yy)
    # Inside the range, within half a step (a whole one for FLOOR): x * 2^pos is exact, and where
    # |x * 2^pos| >= 2^23 it is an integer already, so y = x there.
    inside = (x.astype(np.float64) >= grid.qmin * step) & (x.astype(np.float64) <= grid.qmax * step)
    bound = step if mode == RoundMode.FLOOR else step / 2
    assert np.all(np.abs(x.astype(np.float64) - y)[inside] <= bound)
    assert np.array_equal(bits_of(y), bits_of(ref.pof2_fake_quant_np(x, pos, grid, mode)))


@given(
    bits=st.integers(17, 32),
    unsigned=st.booleans(),
    scale=st.floats(1e-12, 1e3),
    zp_frac=st.floats(0.0, 1.0),
    mode=st.sampled_from(ROUND_MODES),
    seed=st.integers(0, 2**16),
)
def test_wide_affine_matches_twin(bits, unsigned, scale, zp_frac, mode, seed):
    grid = int_grid(bits, unsigned)
    s = F32(scale)
    a, b = float32_inside(grid)
    zp = min(max(float(F32(round(a + zp_frac * (b - a)))), a), b)  # an integer float32 inside the grid
    rng = np.random.default_rng(seed)
    u = np.concatenate([rng.uniform(grid.qmin - 5, grid.qmax + 5, 200) - zp, wide_values(grid, F32(1), zp)])
    x = (u * float(s)).astype(np.float32)
    got = np_(fq.affine_fake_quant(ops.convert_to_tensor(x), s, F32(zp), grid.qmin, grid.qmax, mode))
    assert np.array_equal(bits_of(got), bits_of(ref.affine_fake_quant_np(x, s, zp, grid, mode)))


# ---- range searches and quantizers at 32 bits ---------------------------------------------------------------


def bias_like(seed=0):
    rng = np.random.default_rng(seed)
    b = (rng.standard_t(3, 64) * 0.2).astype(np.float32)
    b[:4] = [0.0, 3e-7, -1e-5, 1.9]
    return b


@pytest.mark.parametrize("method", ["No_OF", "Min_MSE", "Min_KL", "Percentile"])
def test_pof2_positions_at_32_bits(method):
    b = bias_like()
    grid = int_grid(32)
    fits = max(-float(b.min()) / -grid.qmin, float(b.max()) / grid.qmax)  # the smallest step holding b
    for epsilon in (1e-7, 1e-20):
        q = Pof2SQuantizer(bit_width=32, method=method, epsilon=epsilon, round_mode="HALF_AWAY_FROM_ZERO")
        state = q.state_from_tensor(b)
        pos = int(state["pos"])
        # The non-overflow position: the largest whose step holds b, and is no smaller than epsilon.
        p0 = int(ranges.nonoverflow_pos(b.min(), b.max(), grid, True, epsilon, (-52, 52)))
        assert 2.0**-p0 >= max(fits, epsilon) > 2.0 ** -(p0 + 1)
        assert p0 <= pos <= p0 + (4 if method == "Min_MSE" else 1)
        y = q.reference(b, state)
        assert np.array_equal(bits_of(np_(q(ops.convert_to_tensor(b), state))), bits_of(y))
        if 2.0**-pos >= fits:  # nothing clipped: within half a step (b * 2^pos is exact, see the property test)
            assert np.all(np.abs(y.astype(np.float64) - b) <= 2.0**-pos / 2)
        t = TQTQuantizer(bit_width=32, method=method, epsilon=epsilon)
        assert int(t.position(t.state_from_tensor(b))) == int(
            Pof2SQuantizer(**t.get_config()).state_from_tensor(b)["pos"]
        )
    # epsilon (the smallest step) bounds the position: 2^-23 >= 1e-7 > 2^-24.
    assert int(Pof2SQuantizer(bit_width=32, method="No_OF").state_from_tensor(b)["pos"]) == 23
    assert int(Pof2SQuantizer(bit_width=32, method="No_OF", epsilon=1e-20).state_from_tensor(b)["pos"]) == 30


def test_histogram_positions_at_32_bits():
    b = bias_like(1)
    hist = histogram_of_rows(b.reshape(1, -1)).channel(0)  # per tensor
    grid = int_grid(32)
    p0 = int(ranges.nonoverflow_pos(b.min(), b.max(), grid, True, 1e-20, (-52, 52)))
    for method in ("Min_MSE", "Min_KL", "Percentile", "No_OF"):
        q = Pof2SQuantizer(bit_width=32, method=method, epsilon=1e-20)
        pos = int(q.state_from_stats(hist)["pos"])
        assert p0 <= pos <= p0 + (4 if method == "Min_MSE" else 1), method
    for symmetric in (True, False):
        lo, hi = ranges.fs_mse_range_hist(hist, grid, symmetric, "HALF_TO_EVEN", 1e-20)
        # 32 bits leave no rounding error worth clipping for: the search keeps (nearly) the whole range.
        assert lo <= 0.99 * b.min() and hi >= 0.99 * b.max()
        lo, hi = percentile_kl.kl_range(hist, grid, symmetric)  # 2^31 levels: no KL candidates to try
        assert (lo, hi) == (float(b.min()), float(b.max()))


@pytest.mark.parametrize("cls", [FSQuantizer, MAFSQuantizer])
@pytest.mark.parametrize("symmetry", [True, False])
def test_float_scale_quantizers_at_32_bits(cls, symmetry):
    b = bias_like(2)
    for method in ("No_OF", "Min_MSE"):
        for per_channel in (False, True):
            q = cls(bit_width=32, method=method, symmetry=symmetry, per_channel=per_channel, epsilon=1e-20)
            state = q.state_from_tensor(b)
            zp = np.asarray(state["zero_point"], np.float64)
            assert np.array_equal(zp, np.round(zp)) and np.all((zp >= q.grid.qmin) & (zp <= q.grid.qmax))
            y = q.reference(b, state)
            assert np.array_equal(bits_of(np_(q(ops.convert_to_tensor(b), state))), bits_of(y))
            s = np.asarray(state["scale"], np.float64)
            # Half a step from rounding, half a step of zero point slack (asymmetric), and float32's own
            # resolution: three roundings of relative size 2^-24 (x * (1 / s), s into float32 state,
            # q * s) and a zero point moved to a float32 (at most 128 of 2^32 levels, 2^-25).
            bound = s * (0.5 if symmetry else 1.0) + np.abs(b) * 2.0**-22
            assert np.all(np.abs(y.astype(np.float64) - b) <= bound), (method, per_channel)


def test_asymmetric_zero_points_are_float32s_that_keep_the_range():
    # A step of 1e-7 (epsilon) for a range of 0.3: the zero point sits 3e6 levels above qmin, where
    # float32s are 128 apart. The nearest float32 could leave -0.3 outside the grid by 64 levels;
    # the one chosen keeps it.
    grid = int_grid(32)
    for lo in (-0.3, -0.2999999, -1e-3, -2.5):
        s, zp = ranges.asymmetric_scale_zp(lo, 0.0, grid, 1e-7)
        assert float(F32(zp)) == zp and (grid.qmin - zp) * s <= lo + s / 2
        x = np.array([lo, 0.0, lo / 2], np.float32)
        y = ref.affine_fake_quant_np(x, F32(s), zp, grid, "HALF_TO_EVEN")
        assert np.all(np.abs(y.astype(np.float64) - x) <= float(F32(s)) * (0.5 + 2.0**-20) + np.abs(x) * 2.0**-22)
    zp = ranges.pof2_zero_point(-0.3, 23, grid, False, 0.0)
    assert float(F32(zp)) == zp and (grid.qmin - zp) * 2.0**-23 <= -0.3 + 2.0**-24
    assert ranges.float32_zero_point(2**31 - 1, grid) == 2**31 - 128  # inside the grid, unlike the nearest 2^31
    assert ranges.float32_zero_point(12345, int_grid(24)) == 12345  # every zero point of 24 bits is a float32


def test_every_integer_quantizer_takes_32_bits_and_float_formats_keep_16():
    for cls in (Pof2SQuantizer, FSQuantizer, MAFSQuantizer, TQTQuantizer):
        for fmt in ("INT", "UINT"):
            q = cls(bit_width=32, data_format=fmt)
            assert q.grid == int_grid(32, unsigned=fmt == "UINT")
    with pytest.raises(ConfigError, match=r"bit_width: expected an integer in \[1, 32\], got 33"):
        Pof2SQuantizer(bit_width=33)
    with pytest.raises(ConfigError, match=r'data_format "BF16" stores 16 bits per value, got bit_width 32'):
        FSQuantizer(bit_width=32, data_format="BF16")
    with pytest.raises(ConfigError, match=r"framework quantizer needs bit_width 2 to 16, got 32"):
        FSQuantizer(bit_width=32, use_framework_quantizer=True, round_mode="HALF_UP")


# ---- the strategy rule: only bias targets above 16 bits -----------------------------------------------------


@pytest.mark.parametrize(
    "key,value,match",
    [
        (
            "weight_bit",
            32,
            r"^\$\.quantize_registry_config\.user_defined_quantize_config\.weight_bit: expected an integer in "
            r"\[1, 16\], got 32\. Only bias targets go up to 32 bits; weight targets take 1 to 16\.$",
        ),
        ("activation_bit", 17, r"activation_bit: .*\[1, 16\], got 17\. .*output \(activation\) targets take 1 to 16"),
        ("input_bit", 24, r"input_bit: .*\[1, 16\], got 24\. Only bias targets go up to 32 bits"),
        ("bias_bit", 33, r"bias_bit: expected an integer in \[1, 32\], got 33\.$"),
    ],
)
def test_bit_width_rule_for_handy_keys(key, value, match):
    with pytest.raises(ConfigError, match=match):
        load_strategy("pof2s", **{key: value})
    with pytest.raises(ConfigError, match=match):
        load_strategy("fs", {REG: {"user_defined_quantize_config": {key: value}}})


def test_bias_bit_32_loads():
    for base in ("pof2s", "fs", "tqt"):
        assert load_strategy(base, bias_bit=32).user["bias_bit"] == 32


def _pattern(*targets):
    return {"pattern_name": "p", "layer_type": "Dense", "quant_config": list(targets)}


def _target(name, ttype, bits=None, shared=None, qname=""):
    if shared:
        return {"target_name": name, "target_type": ttype, "shared_quantizer": shared}
    params = {} if bits is None else {"bit_width": bits}
    return {
        "target_name": name,
        "target_type": ttype,
        "quantizer_config": {"name": qname, "type": "Pof2SQuantizer", "params": params},
    }


def test_bit_width_rule_for_quantizer_configs_names_the_json_path():
    bad = {
        "base": "",
        REG: {"layer_quantize_config": [_pattern(_target("bias", "bias", 32), _target("kernel", "weight", 32))]},
    }
    with pytest.raises(ConfigError) as info:
        load_strategy("pof2s", bad)
    assert str(info.value) == (
        "$.quantize_registry_config.layer_quantize_config[0].quant_config[1].quantizer_config.params.bit_width: "
        "expected an integer in [1, 16], got 32. Only bias targets go up to 32 bits; weight targets take 1 to 16."
    )
    ok = {"base": "", REG: {"layer_quantize_config": [_pattern(_target("bias", "bias", 32))]}}
    assert load_strategy("pof2s", ok).patterns[0].quant_config[0].quantizer.params["bit_width"] == 32
    inputs = {
        REG: {"input_quantize_config": {"quantizer_config": {"type": "FSQuantizer", "params": {"bit_width": 20}}}}
    }
    with pytest.raises(ConfigError, match=r"input_quantize_config\.quantizer_config\.params\.bit_width: .*got 20"):
        load_strategy("fs", inputs)


def test_bit_width_rule_at_resolve_time_for_a_shared_quantizer():
    # Each target is fine when loaded; the kernel sharing the bias's 32-bit quantizer is not.
    shared = _pattern(_target("bias", "bias", 32, qname="b32"), _target("kernel", "weight", shared="b32"))
    s = load_strategy("pof2s", {"base": "", REG: {"layer_quantize_config": [shared]}})
    layer = keras.layers.Dense(3, name="d")
    layer.build((None, 4))
    with pytest.raises(
        ConfigError,
        match=r"^d\.kernel\.bit_width: expected an integer in \[1, 16\], got 32\. Only bias targets go up to 32 bits; "
        r"weight targets take 1 to 16\. Set by layer_quantize_config\[0\] \(p\)\.$",
    ):
        resolve_views(s, [NodeView("d", layer)])


# ---- end to end ----------------------------------------------------------------------------------------------


def tiny_model():
    rng = np.random.default_rng(0)
    i = keras.Input((8,))
    h = keras.layers.Dense(6, activation="relu", name="d1")(i)
    m = keras.Model(i, keras.layers.Dense(3, name="d2")(h))
    m.get_layer("d1").bias.assign((rng.normal(size=6) * 0.3).astype("float32"))
    m.get_layer("d2").bias.assign(np.array([0.05, -1e-4, 3e-6], "float32"))
    return m, rng.normal(size=(64, 8)).astype("float32")


def biases(qmodel):
    """{layer: (float bias, fake-quantized bias, quantizer, state as NumPy)} of every wrapped bias."""
    out = {}
    for layer in qmodel.layers:
        if isinstance(layer, QuantizeWrapper) and "bias" in layer.quantizers:
            state = {k: np_(v) for k, v in layer.state["bias"].items()}
            b = np_(layer.layer.bias)
            out[layer.layer.name] = (b, np_(layer.quantized_weight("bias")), layer.quantizers["bias"], state)
    return out


@pytest.mark.filterwarnings("ignore::qstrat.PendingKeyWarning")
def test_bias_bit_32_end_to_end_pof2s():
    model, x = tiny_model()
    qmodel = qstrat.Quantizer(model, "pof2s").quantize_model(x, verbose=0, bias_bit=32)
    info = qstrat.get_quantize_info(qmodel)
    found = biases(qmodel)
    assert set(found) == {"d1", "d2"}
    for name, (b, qb, q, state) in found.items():
        assert info[name]["bias"]["bit_width"] == 32 and info[name]["kernel"]["bit_width"] == 8
        pos = info[name]["bias"]["quantize_pos"]
        # Within half a step of the float bias: b * 2^pos is exact in float32 and, where it is 2^23
        # or more, an integer already, so nothing but the rounding to the step moves it.
        assert np.all(np.abs(qb.astype(np.float64) - b) <= 2.0**-pos / 2)
        assert np.array_equal(bits_of(qb), bits_of(q.reference(b, state)))
        # Finer than any 16-bit grid could hold these biases.
        assert pos > int(ranges.nonoverflow_pos(b.min(), b.max(), int_grid(16), True, 1e-7, (-52, 52)))


@pytest.mark.filterwarnings("ignore::qstrat.PendingKeyWarning")
def test_bias_bit_32_end_to_end_fs_from_a_strategy_file(tmp_path):
    # The built-in fs strategy has no bias quantizer; this one adds a symmetric per-tensor FS bias quantizer
    # for Dense layers, and bias_bit in the file makes it 32-bit.
    custom = {
        "base": "fs",
        REG: {
            "user_defined_quantize_config": {"bias_bit": 32},
            "layer_quantize_config": [
                {
                    "pattern_name": "dense_bias",
                    "layer_type": "Dense",
                    "quant_config": [
                        {
                            "target_name": "bias",
                            "target_type": "bias",
                            "quantizer_config": {
                                "type": "FSQuantizer",
                                "params": {"bit_width": 8, "symmetry": True, "per_channel": False, "epsilon": 1e-20},
                            },
                        }
                    ],
                }
            ],
        },
    }
    path = tmp_path / "fs_bias32.json"
    path.write_text(json.dumps(custom))
    model, x = tiny_model()
    # As a keyword on the built-in fs it is accepted, and has no bias quantizer to act on.
    plain = qstrat.get_quantize_info(qstrat.Quantizer(model, "fs").quantize_model(x, verbose=0, bias_bit=32))
    assert "bias" not in plain["d1"] and plain["d1"]["kernel"]["bit_width"] == 8
    qmodel = qstrat.Quantizer(model, "fs", str(path)).quantize_model(x, verbose=0)
    info = qstrat.get_quantize_info(qmodel)
    found = biases(qmodel)
    assert set(found) == {"d1", "d2"}  # the JSON's bias pattern reached both layers
    for name, (b, qb, q, state) in found.items():
        assert info[name]["bias"]["bit_width"] == 32 and q.params.bit_width == 32
        s = float(state["scale"])
        assert s <= np.abs(b).max() / (2**31 - 1) * (1 + 2.0**-23)  # the whole 32-bit grid spans the bias
        assert np.array_equal(bits_of(qb), bits_of(q.reference(b, state)))
        # Half a step from rounding, plus three float32 roundings of relative size 2^-24 (see above).
        assert np.all(np.abs(qb.astype(np.float64) - b) <= s / 2 + np.abs(b) * 2.0**-22)
