"""Range methods against brute force and independent NumPy computations."""

import numpy as np
import pytest

from qstrat.quantizers import ranges
from qstrat.quantizers.grid import RoundMode, int_grid
from qstrat.quantizers.reference import affine_fake_quant_np, pof2_fake_quant_np
from qstrat.quantizers.stats import histogram_of_rows

pytestmark = pytest.mark.portable
G8 = int_grid(8)


def test_floor_neg_log2_is_exact_at_and_around_powers_of_two():
    for k in range(-60, 61):
        v = 2.0**k
        assert ranges.floor_neg_log2(v) == -k
        assert ranges.floor_neg_log2(np.nextafter(v, np.inf)) == -k - 1
        assert ranges.floor_neg_log2(np.nextafter(v, 0)) == -k


@pytest.mark.parametrize(
    "bits,unsigned,narrow",
    [(8, False, False), (8, True, False), (4, False, True), (16, False, False), (1, False, False), (1, True, False)],
)
def test_nonoverflow_position_is_the_largest_that_holds_the_range(bits, unsigned, narrow):
    grid = int_grid(bits, unsigned, narrow)
    rng = np.random.default_rng(0)
    for _ in range(200):
        lo, hi = -abs(rng.normal()) * 10 ** rng.uniform(-3, 3), abs(rng.normal()) * 10 ** rng.uniform(-3, 3)
        if unsigned:
            lo = 0.0
        pos = int(ranges.nonoverflow_pos(lo, hi, grid, True, 1e-30, (-126, 126)))
        step = 2.0**-pos
        assert grid.qmax * step >= hi or grid.qmax == 0
        assert grid.qmin * step <= lo
        finer = step / 2  # one position more would overflow on one side
        assert grid.qmax * finer < hi or grid.qmin * finer > lo


def test_nonoverflow_matches_the_reference_formula_for_int8():
    rng = np.random.default_rng(1)
    for _ in range(500):
        m, mx = -abs(rng.normal()) * 7, abs(rng.normal()) * 7
        want = int(np.floor(-np.log2(max(abs(m) / 128, mx / 127))))
        assert int(ranges.nonoverflow_pos(m, mx, G8, True, 2.0**-52, (-52, 52))) == want


def test_epsilon_and_bounds_guard_an_all_zero_tensor():
    assert int(ranges.nonoverflow_pos(0.0, 0.0, G8, True, 1e-7, (-52, 52))) == 23
    assert int(ranges.nonoverflow_pos(0.0, 0.0, G8, True, 1e-7, (-52, 12))) == 12


def _uniform_in_bins(hist, m=400):
    """Values spread evenly (midpoints of m sub-cells) inside every bin of a histogram."""
    w = float(hist.width)
    n = hist.bins_per_side
    xs, ws = [], []
    for i in np.nonzero(hist.counts)[0]:
        a = (i - n) * w
        xs.append(a + (np.arange(m) + 0.5) / m * w)
        ws.append(np.full(m, hist.counts[i] / m))
    return np.concatenate(xs), np.concatenate(ws)


@pytest.mark.parametrize("mode", [RoundMode.HALF_TO_EVEN, RoundMode.HALF_UP, RoundMode.FLOOR])
def test_expected_error_is_the_integral_over_evenly_filled_bins(mode):
    rng = np.random.default_rng(2)
    data = rng.standard_t(4, size=20000).astype(np.float32)
    hist = histogram_of_rows(data.reshape(1, -1), bins_per_side=256).channel(0)
    # Replace the exact extremes by bin edges so the evenly-filled picture is the whole story.
    hist = type(hist)(
        hist.counts, hist.exponent, np.float64(-(2.0**hist.exponent)), np.float64(2.0**hist.exponent), hist.count
    )
    xs, ws = _uniform_in_bins(hist)
    for bits, scale, zp in [(8, 0.02, 0), (8, 0.11, 5), (4, 0.3, -2), (8, 0.004, 0), (3, 1.7, 0)]:
        grid = int_grid(bits)
        got = float(ranges.expected_sq_error(hist, scale, zp, grid, mode))
        y = affine_fake_quant_np(xs.astype(np.float64), scale, zp, grid, mode)
        want = float(np.sum(ws * (xs - y) ** 2))
        assert got == pytest.approx(want, rel=2e-3), (bits, scale, zp)


def test_expected_error_is_close_to_the_real_error_on_smooth_data():
    rng = np.random.default_rng(3)
    x = rng.normal(size=200000).astype(np.float32)
    hist = histogram_of_rows(x.reshape(1, -1)).channel(0)
    for pos in (3, 5, 7, 9):
        step = 2.0**-pos
        real = float(np.sum((x - pof2_fake_quant_np(x, pos, G8, "HALF_TO_EVEN")).astype(np.float64) ** 2))
        est = float(ranges.expected_sq_error(hist, step, 0, G8, "HALF_TO_EVEN"))
        assert est == pytest.approx(real, rel=0.03)


def _brute_pof2_mse(row, p0):
    errs = []
    for pos in range(p0, p0 + 5):
        y = pof2_fake_quant_np(row, pos, G8, "HALF_TO_EVEN")
        errs.append(np.sum((row.astype(np.float64) - y) ** 2))
    return p0 + int(np.argmin(errs))


def test_pof2_min_mse_per_channel_is_brute_force_per_channel():
    rng = np.random.default_rng(4)
    rows = np.stack(
        [
            rng.normal(size=4000),  # no outliers: little clipping pays
            np.r_[rng.normal(size=3990) * 0.05, rng.normal(size=10) * 3],  # a few outliers: clip them
            rng.uniform(-1, 1, size=4000),
        ]
    ).astype(np.float32)
    lo, hi = rows.min(axis=1), rows.max(axis=1)
    got = ranges.pof2_mse_pos_tensor(rows, lo, hi, G8, True, "HALF_TO_EVEN", 1e-7, (-52, 52))
    p0 = ranges.nonoverflow_pos(lo, hi, G8, True, 1e-7, (-52, 52))
    want = [_brute_pof2_mse(r, int(p)) for r, p in zip(rows, p0, strict=True)]
    assert list(got) == want
    assert len(set((got - p0).tolist())) > 1  # a different offset per channel, unlike the reference tool


def test_pof2_min_mse_from_histogram_agrees_with_the_tensor():
    rng = np.random.default_rng(5)
    agree = 0
    for _ in range(20):
        x = (rng.standard_t(rng.uniform(2, 30), size=50000) * rng.uniform(0.01, 50)).astype(np.float32)
        row = x.reshape(1, -1)
        exact = int(ranges.pof2_mse_pos_tensor(row, row.min(1), row.max(1), G8, True, "HALF_UP", 1e-7, (-52, 52))[0])
        from_hist = ranges.pof2_mse_pos_hist(histogram_of_rows(row).channel(0), G8, True, "HALF_UP", 1e-7, (-52, 52))
        assert abs(exact - from_hist) <= 1
        agree += exact == from_hist
    assert agree >= 18


def _sse(x, lo, hi, grid, symmetric):
    if symmetric:
        s, zp = ranges.symmetric_scale(lo, hi, grid, 1e-12), 0.0
    else:
        s, zp = ranges.asymmetric_scale_zp(lo, hi, grid, 1e-12)
    y = affine_fake_quant_np(x.astype(np.float64), s, zp, grid, "HALF_TO_EVEN")
    return float(np.sum((x - y) ** 2))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
def test_fs_min_mse_really_searches(symmetric, bits):
    grid = int_grid(bits)
    rng = np.random.default_rng(6)
    x = np.r_[rng.normal(size=50000) + 0.5, rng.normal(size=5) * 30].astype(np.float32)
    row = x.reshape(1, -1)
    lo, hi = ranges.fs_mse_range_tensor(row, row.min(1), row.max(1), grid, symmetric, "HALF_TO_EVEN", 1e-12)
    base = _sse(x, x.min(), x.max(), grid, symmetric)
    best = _sse(x, float(lo[0]), float(hi[0]), grid, symmetric)
    assert best <= base
    if bits == 4:  # coarse grid: clipping the outliers pays, and the search finds it
        assert best < 0.2 * base and float(hi[0]) < 0.5 * x.max()
    hlo, hhi = ranges.fs_mse_range_hist(histogram_of_rows(row).channel(0), grid, symmetric, "HALF_TO_EVEN", 1e-12)
    assert _sse(x, hlo, hhi, grid, symmetric) < 1.05 * best  # the histogram search is as good


def test_asymmetric_scale_and_zero_point_hold_the_range():
    grid = int_grid(8)
    s, zp = ranges.asymmetric_scale_zp(-1.0, 3.0, grid, 1e-12)
    assert s == pytest.approx(4.0 / 255) and float(zp) == np.rint(-128 + 1.0 / s)
    x = np.array([-1.0, 3.0], np.float32)
    y = affine_fake_quant_np(x, s, zp, grid, "HALF_TO_EVEN")
    assert np.allclose(y, x, atol=s)
