"""Integer tensors: exact rounding at ties for every round mode, per-channel positions, overflow guards."""

from fractions import Fraction

import numpy as np
import pytest

from qstrat.errors import UnsupportedError
from qstrat.integer.tensors import (
    IntTensor,
    align,
    as_pos,
    common_pos,
    from_grid,
    int32_overflow,
    requantize,
    rescale,
    round_ratio,
    shift_left,
    to_float,
    uniform,
)
from qstrat.quantizers.grid import RoundMode, int_grid
from qstrat.quantizers.reference import pof2_fake_quant_np, round_np

# Halves from -5/2 to 5/2 (every one a tie), then quarters and thirds on both sides (none a tie).
NUM = np.array([-5, -3, -1, 1, 3, 5, -7, -1, 1, 7, -5, -4, 4, 5])
DEN = np.array([2, 2, 2, 2, 2, 2, 4, 4, 4, 4, 3, 3, 3, 3])
EXPECTED = {
    "HALF_UP": [-2, -1, 0, 1, 2, 3, -2, 0, 0, 2, -2, -1, 1, 2],
    "HALF_AWAY_FROM_ZERO": [-3, -2, -1, 1, 2, 3, -2, 0, 0, 2, -2, -1, 1, 2],
    "HALF_TO_ZERO": [-2, -1, 0, 0, 1, 2, -2, 0, 0, 2, -2, -1, 1, 2],
    "HALF_TO_EVEN": [-2, -2, 0, 0, 2, 2, -2, 0, 0, 2, -2, -1, 1, 2],
    "FLOOR": [-3, -2, -1, 0, 1, 2, -2, -1, 0, 1, -2, -2, 1, 1],
}


@pytest.mark.parametrize("mode", list(EXPECTED))
def test_round_ratio_at_ties_and_beside_them(mode):
    assert round_ratio(NUM, DEN, mode).tolist() == EXPECTED[mode]


@pytest.mark.parametrize("mode", [m.value for m in RoundMode])
def test_round_ratio_equals_the_float_twin_on_dyadic_rationals(mode):
    """num / 2^k is exact in float64, so the NumPy twin's round_np is an independent reference."""
    rng = np.random.default_rng(0)
    num = rng.integers(-5000, 5000, 4000)
    den = 2 ** rng.integers(0, 8, 4000)
    assert np.array_equal(round_ratio(num, den, mode), round_np(num / den, mode).astype(np.int64))


def _fraction_round(q: Fraction, mode: str) -> int:
    floor = q.numerator // q.denominator
    rest = q - floor
    if mode == "FLOOR":
        return floor
    if rest != Fraction(1, 2):
        return floor + (rest > Fraction(1, 2))
    return {
        "HALF_UP": floor + 1,
        "HALF_AWAY_FROM_ZERO": floor + 1 if q > 0 else floor,
        "HALF_TO_ZERO": floor if q > 0 else floor + 1,
        "HALF_TO_EVEN": floor + (floor % 2),
    }[mode]


@pytest.mark.parametrize("mode", [m.value for m in RoundMode])
def test_round_ratio_equals_fractions_for_any_denominator(mode):
    rng = np.random.default_rng(1)
    den = rng.integers(1, 30, 3000)
    num = rng.integers(-300, 300, 3000) * rng.choice([1, 2, 3], 3000)
    expected = [_fraction_round(Fraction(int(n), int(d)), mode) for n, d in zip(num, den, strict=True)]
    assert round_ratio(num, den, mode).tolist() == expected


@pytest.mark.parametrize("mode", [m.value for m in RoundMode])
def test_requantize_equals_the_twin_with_per_channel_positions(mode):
    """An accumulator at per-channel positions, down to a per-tensor grid and to a per-channel one."""
    rng = np.random.default_rng(2)
    pos = np.array([9, 12, 7, 10])
    values = rng.integers(-(2**14), 2**14, (64, 4))
    values[:8] = (2 * rng.integers(-200, 200, (8, 4)) + 1) << (pos - 4 - 1)  # exact ties at position 4
    t = IntTensor(values, pos)
    exact = np.ldexp(values.astype(np.float64), -pos)
    grid = int_grid(8)
    for out_pos in (4, np.array([3, 8, 4, 13])):
        want = pof2_fake_quant_np(exact, out_pos, grid, mode, axis=-1)
        got = requantize(t, out_pos, grid, mode)
        assert np.array_equal(to_float(got, np.float64), want)
        assert got.values.min() >= grid.qmin and got.values.max() <= grid.qmax


def test_requantize_divides_by_den_exactly():
    """A window average of 3 (den 3) rounded half up: 7 / 3 -> 2, 4.5 / 3 = 1.5 -> 2, -4.5 / 3 -> -1."""
    t = IntTensor(np.array([7, 9, -9, 8]), pos=1, den=3)  # 3.5/3, 4.5/3, -4.5/3, 4/3
    assert requantize(t, 1, int_grid(8), "HALF_UP").values.tolist() == [2, 3, -3, 3]
    assert requantize(t, 0, int_grid(8), "HALF_UP").values.tolist() == [1, 2, -1, 1]
    assert requantize(t, 0, int_grid(8), "HALF_TO_EVEN").values.tolist() == [1, 2, -2, 1]


def test_requantize_to_a_coarser_grid_shifts_left_exactly():
    t = IntTensor(np.array([-3, 5, 127]), pos=2)
    assert requantize(t, 4, int_grid(8), "HALF_UP").values.tolist() == [-12, 20, 127]
    assert rescale(t, 5, "HALF_UP").tolist() == [-24, 40, 1016]


def test_positions():
    assert as_pos([3, 3, 3]) == 3 and isinstance(as_pos(np.float32(2.0)), int)
    assert as_pos([1, 2]).tolist() == [1, 2]
    with pytest.raises(UnsupportedError, match="integers"):
        as_pos(1.5)
    assert common_pos(3, np.array([2, 5])).tolist() == [3, 5]
    t = IntTensor(np.array([[1, 1]]), np.array([2, 4]))
    assert uniform(t).pos == 4 and uniform(t).values.tolist() == [[4, 1]]
    assert align(t, 5).values.tolist() == [[8, 2]]


def test_shift_left_refuses_to_overflow_int64():
    assert shift_left(np.array([3]), 60).tolist() == [3 << 60]
    with pytest.raises(UnsupportedError, match="int64"):
        shift_left(np.array([4]), 61)
    with pytest.raises(ValueError):
        shift_left(np.array([4]), -1)


def test_to_float_and_back():
    t = IntTensor(np.array([[3, -128]]), np.array([2, 7]))
    y = to_float(t)
    assert y.dtype == np.float32 and y.tolist() == [[0.75, -1.0]]
    assert from_grid(y, t.pos).tolist() == [[3, -128]]
    with pytest.raises(UnsupportedError, match="not on their grid"):
        from_grid(y, 1)
    assert to_float(IntTensor(np.array([1]), 0, den=3)).tolist() == [np.float32(1) / np.float32(3)]


def test_int32_overflow():
    assert not int32_overflow(np.array([2**31 - 1, -(2**31)]))
    assert int32_overflow(np.array([2**31]))
    assert int32_overflow(np.array([-(2**31) - 1]))
    assert not int32_overflow(np.array([], np.int64))
