"""`qstrat.quantizers.fused.fused_measurement`: TensorFlow's fused kernel against the exact one, value for value.

The fused kernel computes floor(u + 0.5) with u = x * 2^p in float32; the
exact kernel rounds HALF_UP. They may differ only where u + 0.5 is rounded
across an integer, which in float32 happens for u = 0.5 - 2^-25 alone. The
tests find that one difference, and no other, on every float32 whose u lies
in 0.25 <= |u| < 4 (the sum is exact for 0.5 <= |u| < 2^22 and cannot reach
an integer below 0.25), on grid edges and ties, and show
that the fused kernel is used only where it was asked for.
"""

import keras
import numpy as np
import pytest
from keras import ops

from qstrat.quantizers import fake_quant as fq
from qstrat.quantizers.fused import FUSED_MISMATCH, fused_measurement
from qstrat.quantizers.grid import RoundMode, int_grid

pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="a TensorFlow kernel")

GRIDS = [(8, False, False), (8, False, True), (8, True, False), (4, False, False), (16, False, False)]


def both(x, pos, grid, mode=RoundMode.HALF_UP):
    """(fused-context result, exact result) of the power-of-2 kernel on x."""
    t = ops.convert_to_tensor(x)
    exact = ops.convert_to_numpy(fq.pof2_fake_quant(t, np.float32(pos), grid.qmin, grid.qmax, mode))
    with fused_measurement():
        fused = ops.convert_to_numpy(fq.pof2_fake_quant(t, np.float32(pos), grid.qmin, grid.qmax, mode))
    return fused, exact


def binade_floats(lo_exp: int) -> np.ndarray:
    """Every float32 in [2^lo_exp, 2^(lo_exp + 1))."""
    first = np.array(2.0**lo_exp, np.float32).view(np.uint32)
    return np.arange(first, first + 2**23, dtype=np.uint32).view(np.float32)


@pytest.mark.parametrize("pos", [0, 5, -3])
def test_fused_kernel_differs_from_the_exact_one_at_one_input_only(pos):
    grid = int_grid(8)
    step = np.float32(2.0**-pos)
    mismatches = []
    for lo_exp in (-2, -1, 0, 1):  # |u| in [0.25, 4): every sum u + 0.5 that float32 rounds
        u = binade_floats(lo_exp)
        for sign in (1, -1):
            x = (sign * u * step).astype(np.float32)  # exact: a power-of-2 step
            fused, exact = both(x, pos, grid)
            bad = fused != exact
            mismatches += list(x[bad] / step)
            assert np.all(fused[bad] == step) and np.all(exact[bad] == 0)
    assert mismatches == [np.float32(FUSED_MISMATCH)]


@pytest.mark.parametrize("bits,unsigned,narrow", GRIDS)
def test_fused_kernel_equals_the_exact_one_on_edges_ties_and_random_values_but_that_input(bits, unsigned, narrow):
    grid = int_grid(bits, unsigned, narrow)
    rng = np.random.default_rng(bits)
    for pos in (-3, 0, 4, 12):
        step = 2.0**-pos
        ks = np.arange(grid.qmin - 3, grid.qmax + 4) if grid.levels <= 256 else rng.integers(-70000, 70000, 4000)
        ties = ((ks + 0.5) * step).astype(np.float32)
        x = np.concatenate(
            [
                ks * step,
                ties,
                np.nextafter(ties, np.float32(np.inf)),
                np.nextafter(ties, np.float32(-np.inf)),
                rng.normal(size=4000) * grid.qmax * step / 3,
                rng.normal(size=4000) * grid.qmax * step * 2,
            ]
        ).astype(np.float32)
        fused, exact = both(x, pos, grid)
        bad = fused != exact  # the one input u = 0.5 - 2^-25 sits just below the tie at 0.5
        assert np.all(x[bad] / np.float32(step) == np.float32(FUSED_MISMATCH)), (pos, x[bad])
        assert np.all(fused[bad] == np.float32(step)) and np.all(exact[bad] == 0)


def test_fused_kernel_only_where_asked():
    grid = int_grid(8)
    x = np.float32([FUSED_MISMATCH, 1.5, -2.5]) * np.float32(2.0**-3)
    t = ops.convert_to_tensor(x)
    # Outside the context, the exact kernel: u = 0.5 - 2^-25 rounds to 0.
    assert ops.convert_to_numpy(fq.pof2_fake_quant(t, np.float32(3), grid.qmin, grid.qmax, "HALF_UP"))[0] == 0
    # Inside, a grid the fused op has no rounding for, and a per-channel position: the exact kernel.
    for mode in (RoundMode.HALF_AWAY_FROM_ZERO, RoundMode.HALF_TO_EVEN):
        fused, exact = both(x, 3, grid, mode)
        assert np.array_equal(fused, exact)
    with fused_measurement():
        per_channel = fq.pof2_fake_quant(t, np.float32([3, 3, 3]), grid.qmin, grid.qmax, "HALF_UP", axis=0)
    assert ops.convert_to_numpy(per_channel)[0] == 0
    # Traced code keeps the exact kernel.
    import tensorflow as tf

    @tf.function
    def traced(v):
        with fused_measurement():
            return fq.pof2_fake_quant(v, np.float32(3), grid.qmin, grid.qmax, "HALF_UP")

    assert traced(t).numpy()[0] == 0
    # Inside and eligible: the fused kernel, with its one difference.
    fused, exact = both(x, 3, grid)
    assert fused[0] == np.float32(2.0**-3) and exact[0] == 0 and np.array_equal(fused[1:], exact[1:])
