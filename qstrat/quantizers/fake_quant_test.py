"""keras.ops kernels against their NumPy twins, on every backend."""

import itertools

import keras
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from keras import ops

from qstrat.quantizers import fake_quant as fq
from qstrat.quantizers import float_formats
from qstrat.quantizers import reference as ref
from qstrat.quantizers.grid import RoundMode, int_grid

pytestmark = pytest.mark.portable

ROUND_MODES = list(RoundMode)


def np_(t):
    return ops.convert_to_numpy(t)


def grad_of(fn, *args):
    """Gradients of sum(fn(*args) * w) w.r.t. every argument, on any backend."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        vs = [tf.Variable(a) for a in args]
        with tf.GradientTape() as tape:
            out = fn(*vs)
        return out, tape.gradient(out, vs)
    if backend == "torch":
        import torch

        ts = [torch.tensor(a, requires_grad=True) for a in args]
        out = fn(*ts)
        grads = torch.autograd.grad(out, ts, allow_unused=True)
        return out, grads
    import jax

    out = fn(*args)
    grads = jax.grad(lambda *a: fn(*a), argnums=tuple(range(len(args))))(*args)
    return out, grads


def test_pow2_is_exact_for_every_position():
    k = np.arange(-126, 127, dtype=np.float32)
    assert np.array_equal(np_(fq.pow2(ops.convert_to_tensor(k))), np.ldexp(np.float32(1), k.astype(int)))


@pytest.mark.parametrize("mode", ROUND_MODES)
def test_round_modes_at_ties_and_between(mode):
    ties = np.arange(-6.5, 7.0, 1.0, dtype=np.float32)
    near = np.concatenate([ties - 1e-3, ties + 1e-3, [0.49999997, -0.49999997, 2.5000002, -2.5000002]]).astype(
        np.float32
    )
    # The largest float32 ties (2^23 - 0.5) and integers past 2^23, where the tie fix must not move anything.
    far = np.array([4194304.5, -4194304.5, 8388607.5, -8388607.5, 8388609.0, -16777218.0], np.float32)
    # Small negatives, where u - floor(u) = 1 + u is rounded: the decision must still be exact.
    far = np.concatenate([far, np.array([-1e-9, -1e-30, -0.25, -0.50000006, -0.99999994, -0.5], np.float32)])
    u = np.concatenate([ties, near, far])
    got = np_(fq.round_ops(ops.convert_to_tensor(u), mode))
    assert np.array_equal(got, ref.round_np(u, mode).astype(np.float32))


def test_round_mode_tie_rules_are_what_their_names_say():
    u = np.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5], np.float32)
    expect = {
        RoundMode.HALF_TO_EVEN: [-2, -2, 0, 0, 2, 2],
        RoundMode.HALF_UP: [-2, -1, 0, 1, 2, 3],
        RoundMode.HALF_TO_ZERO: [-2, -1, 0, 0, 1, 2],
        RoundMode.HALF_AWAY_FROM_ZERO: [-3, -2, -1, 1, 2, 3],
        RoundMode.FLOOR: [-3, -2, -1, 0, 1, 2],
    }
    for mode, want in expect.items():
        assert np.array_equal(np_(fq.round_ops(ops.convert_to_tensor(u), mode)), np.array(want, np.float32)), mode


GRIDS = [
    (8, False, False),
    (8, False, True),
    (8, True, False),
    (1, False, False),
    (1, True, False),
    (2, False, True),
    (4, False, False),
    (16, False, False),
    (16, True, False),
]


def _edge_values(grid, step):
    """Grid edges qmin*step, qmax*step, half a step beyond them, exact ties and interior points."""
    ks = (
        np.arange(grid.qmin - 2, grid.qmax + 3)
        if grid.levels <= 64
        else np.r_[np.arange(grid.qmin - 2, grid.qmin + 5), np.arange(-4, 5), np.arange(grid.qmax - 4, grid.qmax + 3)]
    )
    vals = np.concatenate([ks, ks + 0.5, ks - 0.5, ks + 0.25, ks - 0.49]) * step
    return vals.astype(np.float32)


@pytest.mark.parametrize("bits,unsigned,narrow", GRIDS)
@pytest.mark.parametrize("mode", ROUND_MODES)
def test_pof2_matches_twin_on_edges_and_ties(bits, unsigned, narrow, mode):
    grid = int_grid(bits, unsigned, narrow)
    for pos in (-3, 0, 4, 7):
        step = 2.0**-pos
        x = _edge_values(grid, step)
        got = np_(fq.pof2_fake_quant(ops.convert_to_tensor(x), float(pos), grid.qmin, grid.qmax, mode))
        want = ref.pof2_fake_quant_np(x, pos, grid, mode)
        assert np.array_equal(got, want), (pos, x[got != want], got[got != want], want[got != want])


@pytest.mark.parametrize("mode", ROUND_MODES)
def test_affine_matches_twin_with_float_scale_and_zero_point(mode):
    rng = np.random.default_rng(1)
    x = (rng.normal(size=4000) * 3).astype(np.float32)
    grid = int_grid(8, unsigned=True)
    for scale, zp in [(0.0213, 37.0), (0.1, 0.0), (1.0 / 3.0, 255.0), (0.00731, 128.0)]:
        s = np.float32(scale)
        ties = ((np.arange(-40, 40) + 0.5) * s).astype(np.float32)  # ties up to float rounding of x*(1/s)
        xs = np.concatenate([x, ties])
        got = np_(fq.affine_fake_quant(ops.convert_to_tensor(xs), s, zp, grid.qmin, grid.qmax, mode))
        want = ref.affine_fake_quant_np(xs, s, zp, grid, mode)
        assert np.array_equal(got, want)


@pytest.mark.parametrize("axis", [0, 1, -1, 3])
def test_per_channel_matches_twin_on_every_axis(axis):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, 4, 5, 6)).astype(np.float32) * 4
    c = x.shape[axis]
    pos = np.arange(c, dtype=np.float32) - 1
    scale = (0.01 + 0.05 * np.arange(c)).astype(np.float32)
    zp = np.arange(c, dtype=np.float32) * 3 - 4
    grid = int_grid(6)
    got = np_(fq.pof2_fake_quant(ops.convert_to_tensor(x), pos, grid.qmin, grid.qmax, "HALF_UP", axis))
    assert np.array_equal(got, ref.pof2_fake_quant_np(x, pos, grid, "HALF_UP", axis % 4))
    got = np_(fq.affine_fake_quant(ops.convert_to_tensor(x), scale, zp, grid.qmin, grid.qmax, "HALF_TO_EVEN", axis))
    assert np.array_equal(got, ref.affine_fake_quant_np(x, scale, zp, grid, "HALF_TO_EVEN", axis % 4))


@pytest.mark.parametrize("mode", [RoundMode.HALF_UP, RoundMode.HALF_TO_EVEN])
def test_forward_only_kernels_with_constant_state_give_the_twins_bits(mode):
    # Inside forward_only, NumPy state becomes graph constants (scales computed in NumPy): same bits.
    grid = int_grid(8)
    rng = np.random.default_rng(3)
    x = (rng.normal(size=(5, 7, 4)) * 8).astype(np.float32)
    for pos in (np.float32(3), np.array([-2, 0, 5, 126], np.float32)):
        xs = x if pos.ndim == 0 else x * np.ldexp(np.float32(1), -pos.astype(np.int32))
        axis = None if pos.ndim == 0 else -1
        with fq.forward_only():
            got = np_(fq.pof2_fake_quant(ops.convert_to_tensor(xs), pos, grid.qmin, grid.qmax, mode, axis))
        assert np.array_equal(got, ref.pof2_fake_quant_np(xs, pos, grid, mode, None if axis is None else 2)), pos
    for pos in (np.float32(127), np.float32(-127)):  # 2^-127 is subnormal: these keep the kernel's own ops
        with fq.forward_only():
            got = np_(fq.pof2_fake_quant(ops.convert_to_tensor(x), pos, grid.qmin, grid.qmax, mode))
        want = np_(fq.pof2_fake_quant(ops.convert_to_tensor(x), ops.convert_to_tensor(pos), grid.qmin, grid.qmax, mode))
        assert np.array_equal(got, want)
    zp = np.array([0, 3, -7, 12], np.float32)
    with fq.forward_only():
        got = np_(fq.pof2_fake_quant(ops.convert_to_tensor(x), np.float32(4), grid.qmin, grid.qmax, mode, None, zp[1]))
    assert np.array_equal(got, ref.pof2_fake_quant_np(x, 4.0, grid, mode, None, zp[1]))
    scale = np.array([0.0213, 0.1, 1 / 3, 0.00731], np.float32)
    ties = (np.arange(-40, 40)[:, None] + 0.5) * scale  # ties up to the float rounding of x * (1 / s)
    xs = np.concatenate([x.reshape(-1, 4), ties.astype(np.float32)])
    with fq.forward_only():
        got = np_(fq.affine_fake_quant(ops.convert_to_tensor(xs), scale, zp, grid.qmin, grid.qmax, mode, -1))
    assert np.array_equal(got, ref.affine_fake_quant_np(xs, scale, zp, grid, mode, 1))


@given(
    bits=st.integers(1, 16),
    unsigned=st.booleans(),
    narrow=st.booleans(),
    pos=st.integers(-4, 12),
    mode=st.sampled_from(ROUND_MODES),
    seed=st.integers(0, 2**16),
)
def test_pof2_properties(bits, unsigned, narrow, pos, mode, seed):
    if unsigned:
        narrow = False
    if narrow and bits == 1:
        narrow = False
    grid = int_grid(bits, unsigned, narrow)
    step = 2.0**-pos
    rng = np.random.default_rng(seed)
    x = (rng.uniform(grid.qmin - 3, grid.qmax + 3, size=257) * step).astype(np.float32)
    y = np_(fq.pof2_fake_quant(ops.convert_to_tensor(x), float(pos), grid.qmin, grid.qmax, mode))
    # On the grid.
    k = y / step
    assert np.array_equal(k, np.round(k)) and k.min() >= grid.qmin and k.max() <= grid.qmax
    # Idempotent.
    yy = np_(fq.pof2_fake_quant(ops.convert_to_tensor(y), float(pos), grid.qmin, grid.qmax, mode))
    assert np.array_equal(y, yy)
    # Within half a step inside the range (a whole step for FLOOR).
    inside = (x >= grid.qmin * step) & (x <= grid.qmax * step)
    bound = step if mode == RoundMode.FLOOR else step / 2
    assert np.all(np.abs(x - y)[inside] <= bound)
    # Equal to the twin.
    assert np.array_equal(y, ref.pof2_fake_quant_np(x, pos, grid, mode))


@given(
    scale=st.floats(1e-4, 10.0), zp=st.integers(-8, 8), seed=st.integers(0, 2**16), mode=st.sampled_from(ROUND_MODES)
)
def test_affine_properties(scale, zp, seed, mode):
    grid = int_grid(5)
    s = np.float32(scale)
    rng = np.random.default_rng(seed)
    x = (rng.uniform(-30, 30, size=257) * s).astype(np.float32)
    y = np_(fq.affine_fake_quant(ops.convert_to_tensor(x), s, float(zp), grid.qmin, grid.qmax, mode))
    yy = np_(fq.affine_fake_quant(ops.convert_to_tensor(y), s, float(zp), grid.qmin, grid.qmax, mode))
    if mode == RoundMode.FLOOR:
        # q * s can land a hair below the grid point when s is not a power of two, and FLOOR
        # then drops it one level: re-quantizing moves by at most one step, never more.
        assert np.all(np.abs(yy - y) <= float(s) * 1.0001)
    else:
        assert np.array_equal(y, yy)
    assert np.array_equal(y, ref.affine_fake_quant_np(x, s, zp, grid, mode))
    lo, hi = (grid.qmin - zp) * float(s), (grid.qmax - zp) * float(s)
    assert y.min() >= lo * (1 + 1e-6) - 1e-12 and y.max() <= hi * (1 + 1e-6) + 1e-12


def test_clipped_straight_through_gradient():
    grid = int_grid(4)  # [-8, 7]
    x = np.array([-9.0, -8.6, -8.4, -3.2, 0.0, 6.9, 7.4, 7.6, 12.0], np.float32)

    def f(t):
        return ops.sum(
            fq.pof2_fake_quant(t, 0.0, grid.qmin, grid.qmax, "HALF_TO_EVEN") * ops.arange(1, 10, dtype="float32")
        )

    _, (g,) = grad_of(f, x)
    want = ref.ste_mask_np(x, 1.0, 0.0, grid, "HALF_TO_EVEN") * np.arange(1, 10)
    assert np.array_equal(np_(g), want.astype(np.float32))
    assert np.array_equal(want > 0, [False, False, True, True, True, True, True, False, False])


@pytest.mark.parametrize("unsigned", [False, True])
@pytest.mark.parametrize("mode", [RoundMode.HALF_TO_EVEN, RoundMode.HALF_UP])
def test_tqt_gradient_matches_twin(unsigned, mode):
    bits = 4
    grid = int_grid(bits, unsigned)
    rng = np.random.default_rng(3)
    x = rng.normal(size=200).astype(np.float32) * 2
    w = rng.normal(size=200).astype(np.float32)
    log_th = np.float32(0.6)

    def f(t, lt):
        return ops.sum(fq.tqt_fake_quant(t, lt, bits, grid.qmin, grid.qmax, mode, unsigned) * ops.convert_to_tensor(w))

    out, (gx, gl) = grad_of(f, x, log_th)
    dx, dl = ref.tqt_grad_np(x, log_th, w, bits, grid, mode, unsigned)
    y = ref.tqt_fake_quant_np(x, log_th, bits, grid, mode, unsigned)
    assert np.isclose(float(np_(out)), float(np.sum(y * w)), rtol=1e-5)
    assert np.allclose(np_(gx), dx, atol=0)
    assert np.isclose(float(np_(gl)), dl, rtol=1e-4, atol=1e-5)


def test_tqt_gradient_equals_finite_differences_of_its_straight_through_surrogate():
    """Jain et al.'s gradient is the exact derivative of the function with round and ceil
    replaced by their straight-through linearisation at the point (value kept, slope 1).
    Central differences of that surrogate, in float64, must match the kernel's gradient."""
    bits, mode = 8, RoundMode.HALF_TO_EVEN
    grid = int_grid(bits)
    rng = np.random.default_rng(4)
    x64 = rng.standard_t(3, size=500) * 0.7
    x = x64.astype(np.float32)
    w = rng.normal(size=500)
    lt0 = 0.3  # threshold 2^0.3 ~ 1.23: many values clip

    c0 = np.ceil(lt0)
    step0 = 2.0 ** (c0 - (bits - 1))
    u0 = x64 / step0
    n0 = ref.round_np(u0, mode)
    inside = (n0 >= grid.qmin) & (n0 <= grid.qmax)
    qc = np.clip(n0, grid.qmin, grid.qmax)

    def surrogate(xv, lt):
        step = 2.0 ** (c0 + (lt - lt0) - (bits - 1))
        u = xv / step
        n = n0 + (u - u0)
        q = np.where(inside, n, qc)
        return np.sum(q * step * w)

    h = 1e-6
    fd_lt = (surrogate(x64, lt0 + h) - surrogate(x64, lt0 - h)) / (2 * h)
    fd_x = np.array([(surrogate(x64 + h * e, lt0) - surrogate(x64 - h * e, lt0)) / (2 * h) for e in np.eye(500)[:40]])

    def f(t, lt):
        return ops.sum(
            fq.tqt_fake_quant(t, lt, bits, grid.qmin, grid.qmax, mode, False)
            * ops.convert_to_tensor(w.astype(np.float32))
        )

    _, (gx, gl) = grad_of(f, x, np.float32(lt0))
    assert np.isclose(float(np_(gl)), fd_lt, rtol=2e-3)
    assert np.allclose(np_(gx)[:40], fd_x, atol=1e-4)
    assert inside.sum() > 10 and (~inside).sum() > 10  # both branches exercised


def test_float_formats_match_twins():
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.normal(size=1000) * 10, [7e4, -7e4, 65504, 65519, 65520, 1e-8, 3.4e38, -3.4e38, 0.0]])
    x = x.astype(np.float32)
    assert np.array_equal(np_(float_formats.fp16_fake_quant(ops.convert_to_tensor(x))), ref.fp16_np(x))
    assert np.array_equal(np_(float_formats.bf16_fake_quant(ops.convert_to_tensor(x))), ref.bf16_np(x))
    assert np.all(np.isfinite(ref.fp16_np(x))) and np.all(np.isfinite(ref.bf16_np(x)))


@pytest.mark.parametrize("shape,axis", [((4, 20), -1), ((3, 5, 17), 1), ((2, 8), 0), ((6, 3, 3, 8), -1)])
@pytest.mark.parametrize("mode", [RoundMode.HALF_TO_EVEN, RoundMode.HALF_AWAY_FROM_ZERO])
def test_bfp16_matches_twin(shape, axis, mode):
    rng = np.random.default_rng(6)
    x = (rng.normal(size=shape) * np.exp(rng.normal(size=shape) * 3)).astype(np.float32)
    x.flat[::7] = 0.0
    x.flat[3] = 2.0**5  # an exact power of two as a block maximum
    got = np_(float_formats.bfp16_fake_quant(ops.convert_to_tensor(x), axis, mode))
    assert np.array_equal(got, ref.bfp16_np(x, axis, mode))


def test_framework_quantizer_agrees_with_half_up_kernel():
    from qstrat.quantizers import FSQuantizer

    rng = np.random.default_rng(7)
    x = rng.normal(size=(64, 16)).astype(np.float32) * 3
    for narrow, unsigned, symmetry, axis in itertools.product([False, True], [False, True], [False, True], [-1, 0]):
        if narrow and unsigned:
            continue
        kw = dict(
            bit_width=8,
            narrow_range=narrow,
            unsigned=unsigned,
            symmetry=symmetry,
            round_mode="HALF_UP",
            channel_axis=axis,
        )
        ours = FSQuantizer(use_framework_quantizer=False, **kw)
        fw = FSQuantizer(use_framework_quantizer=True, **kw)
        xs = np.abs(x) if unsigned else x
        state = ours.state_from_tensor(xs)
        a, b = np_(ours(ops.convert_to_tensor(xs), state)), np_(fw(ops.convert_to_tensor(xs), state))
        step = state["scale"].reshape((1, -1) if axis == -1 else (-1, 1))
        # The framework op rounds (x - min) / scale and dequantizes from min, we use x / scale and
        # (q - zp) * scale: the same grid levels, with float-rounding differences in the last bits,
        # and only a value right at a tie may pick the neighbouring level.
        levels_apart = np.abs(a - b) / step
        assert np.all(levels_apart <= 1.0001)
        assert np.mean(levels_apart < 1e-3) > 0.999
