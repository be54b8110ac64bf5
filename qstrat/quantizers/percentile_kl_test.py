"""Percentile and Min_KL ranges against NumPy and the per-candidate KL definition."""

import numpy as np
import pytest

from qstrat.quantizers import percentile_kl
from qstrat.quantizers.grid import int_grid
from qstrat.quantizers.stats import histogram_of_rows

pytestmark = pytest.mark.portable
G8 = int_grid(8)


def test_percentile_matches_numpy_within_a_bin():
    rng = np.random.default_rng(7)
    x = rng.standard_t(3, size=100000).astype(np.float32)
    hist = histogram_of_rows(x.reshape(1, -1)).channel(0)
    w = float(hist.width)
    for p in (99.0, 99.9, 99.99):
        lo, hi = percentile_kl.percentile_range(hist, p, symmetric=True)
        want = np.percentile(np.abs(x), p)
        assert abs(hi - want) <= w and lo == pytest.approx(-hi)
        lo, hi = percentile_kl.percentile_range(hist, p, symmetric=False)
        # In the sparse tails, sample quantiles and the binned CDF differ by more than a bin in
        # value; in mass they agree to within the count of the bin the threshold falls in.
        tail = (100 - p) / 200 * x.size
        for thr, below in ((lo, np.sum(x < lo)), (hi, np.sum(x > hi))):
            bin_mass = hist.counts[int(np.floor(thr / w)) + hist.bins_per_side]
            assert abs(below - tail) <= bin_mass + 1
    lo, hi = percentile_kl.percentile_range(hist, 100.0, symmetric=False)
    assert (lo, hi) == (float(x.min()), float(x.max()))


def test_kl_clips_outliers_and_keeps_uniform_data():
    rng = np.random.default_rng(8)
    gauss = np.r_[rng.normal(size=100000), rng.uniform(-40, 40, size=30)].astype(np.float32)
    hist = histogram_of_rows(gauss.reshape(1, -1)).channel(0)
    lo, hi = percentile_kl.kl_range(hist, G8, symmetric=True)
    assert 2.0 < hi < 10.0 and lo == -hi
    uni = rng.uniform(-3, 3, size=100000).astype(np.float32)
    hist = histogram_of_rows(uni.reshape(1, -1)).channel(0)
    _, hi = percentile_kl.kl_range(hist, G8, symmetric=True)
    assert hi >= 0.9 * uni.max()


def test_kl_on_relu_output_uses_unsigned_levels():
    rng = np.random.default_rng(9)
    x = np.maximum(rng.normal(size=100000), 0).astype(np.float32)  # half exact zeros
    hist = histogram_of_rows(x.reshape(1, -1)).channel(0)
    lo, hi = percentile_kl.kl_range(hist, int_grid(8, unsigned=True), symmetric=True)
    assert lo == 0.0 and 2.0 < hi <= x.max()


def _kl_loop(h, nlevels):
    """The per-candidate definition of the TensorRT KL search, one candidate at a time."""
    out = []
    for i in range(nlevels, h.size + 1):
        ref = h[:i].copy()
        ref[-1] += h[i:].sum()
        groups = (np.arange(i) * nlevels) // i
        nonzero = h[:i] > 0
        mass = np.bincount(groups, weights=h[:i], minlength=nlevels)
        support = np.bincount(groups, weights=nonzero, minlength=nlevels)
        q = np.where(nonzero, mass[groups] / np.maximum(support[groups], 1), 0.0)
        pmask = ref > 0
        if np.any(pmask & (q <= 0)):
            out.append(np.inf)
            continue
        p_n, q_n = ref[pmask] / ref.sum(), q[pmask] / q.sum()
        out.append(float(np.sum(p_n * np.log(p_n / q_n))))
    return np.array(out)


@pytest.mark.parametrize("seed", range(6))
def test_vectorised_kl_equals_the_per_candidate_definition(seed):
    rng = np.random.default_rng(seed)
    h = np.abs(np.histogram(rng.standard_t(rng.uniform(1.5, 8), size=50000), bins=600, range=(0, 20))[0]).astype(float)
    h[rng.random(h.size) < 0.1] = 0  # empty bins, including possibly the last of a candidate
    h = h[: int(np.max(np.nonzero(h)[0])) + 1]
    for nlevels in (16, 128):
        want = _kl_loop(h, nlevels)
        got = percentile_kl._kl_all_candidates(h, nlevels)
        assert np.array_equal(np.isinf(want), np.isinf(got))
        fin = np.isfinite(want)
        assert np.allclose(got[fin], want[fin], rtol=1e-9, atol=1e-12)
        assert abs(int(np.argmin(got)) - int(np.argmin(want))) == 0 or np.isclose(got.min(), want.min(), rtol=1e-9)
