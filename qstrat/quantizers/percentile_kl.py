"""Range methods over a histogram that pick a clipping point by its statistics (`qstrat.quantizers.ranges` has
the others).

- Min_KL: TensorRT-style entropy calibration over the |x| histogram.
- Percentile: clip where the CDF reaches ``method_percentile``.
"""

from __future__ import annotations

import numpy as np

from qstrat.quantizers.grid import IntGrid
from qstrat.quantizers.stats import Histogram

KL_MAX_BINS = 2048  # the |x| histogram is coarsened to at most this many bins for KL


def _interp_quantile(counts: np.ndarray, lower_edges: np.ndarray, width: float, q: float) -> float:
    """Value below which a fraction q of the mass lies, linear inside a bin."""
    total = counts.sum()
    cdf = np.cumsum(counts)
    target = q * total
    i = int(np.searchsorted(cdf, target, side="left"))
    i = min(i, counts.size - 1)
    before = cdf[i - 1] if i > 0 else 0
    frac = (target - before) / counts[i] if counts[i] else 1.0
    return float(lower_edges[i] + min(max(frac, 0.0), 1.0) * width)


def percentile_range(hist: Histogram, percentile: float, symmetric: bool):
    """Clipping range holding ``percentile`` % of the values.

    Symmetric: ±amax with amax the percentile of |x|. Asymmetric: the two
    tails each give up half of the remaining (100 - p) %.
    """
    lo_obs, hi_obs = float(hist.min), float(hist.max)
    p = percentile / 100.0
    w = float(hist.width)
    if symmetric:
        absc = hist.abs_counts()
        amax = _interp_quantile(absc, np.arange(absc.size) * w, w, p)
        amax = min(amax, max(-lo_obs, hi_obs))
        return max(lo_obs, -amax), min(hi_obs, amax)
    edges = hist.lower_edges()
    tail = (1.0 - p) / 2.0
    lo = _interp_quantile(hist.counts, edges, w, tail)
    hi = _interp_quantile(hist.counts, edges, w, 1.0 - tail)
    return max(lo_obs, min(lo, 0.0)), min(hi_obs, max(hi, 0.0))


def kl_threshold(abs_counts: np.ndarray, width: float, nlevels: int) -> float:
    """TensorRT entropy calibration: the |x| threshold minimising KL(P || Q).

    For each candidate threshold i bins wide (i from ``nlevels`` up): P is the
    histogram up to i with the clipped tail added to its last bin; Q is that
    histogram quantized to ``nlevels`` levels, each level's mass spread evenly
    over its non-empty bins. The zero bin takes its neighbour's count first so
    that a spike of exact zeros (after ReLU) does not dominate.
    """
    h = abs_counts.astype(np.float64).copy()
    n = h.size
    factor = 1
    while n // factor > max(KL_MAX_BINS, 4 * nlevels) and factor < n:
        factor *= 2
    if factor > 1:
        h = h.reshape(-1, factor).sum(axis=1)
        width = width * factor
        n = h.size
    used = int(np.max(np.nonzero(h)[0])) + 1 if np.any(h) else 1
    if used <= nlevels:
        return used * width
    h[0] = h[1] if n > 1 else h[0]
    h = h[:used]
    kl = _kl_all_candidates(h, nlevels)
    return (nlevels + int(np.argmin(kl))) * width


def _kl_all_candidates(h: np.ndarray, nlevels: int) -> np.ndarray:
    """KL(P || Q) for every candidate i in [nlevels, len(h)], computed at once.

    With S = total mass, C_i = mass below bin i, groups m of the first i bins
    (bin j is in group floor(j * nlevels / i)), mass_m and support_m (non-empty
    bins) per group, and the clipped tail T_i folded into bin i - 1:

        KL_i = (sum P log P - sum P log Q) / S - log S + log C_i
        sum P log Q = sum_m mass_m log(mass_m / support_m) + T_i log Q_(i-1)

    which is the per-candidate definition rearranged, so all candidates cost
    O(candidates x nlevels) instead of O(candidates x bins).
    """
    used = h.size
    cand = np.arange(nlevels, used + 1)
    csum = np.concatenate([[0.0], np.cumsum(h)])
    nz = (h > 0).astype(np.float64)
    cnz = np.concatenate([[0.0], np.cumsum(nz)])
    hlogh = np.where(h > 0, h * np.log(np.where(h > 0, h, 1.0)), 0.0)
    chlogh = np.concatenate([[0.0], np.cumsum(hlogh)])
    total = csum[-1]
    tail = total - csum[cand]
    # Group boundaries b_m = ceil(m * i / nlevels), m = 0..nlevels (integer arithmetic).
    m = np.arange(nlevels + 1)
    bounds = -((-m[None, :] * cand[:, None]) // nlevels)
    mass = np.diff(csum[bounds], axis=1)
    support = np.diff(cnz[bounds], axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        mlogq = np.where(mass > 0, mass * np.log(mass / np.where(support > 0, support, 1.0)), 0.0).sum(axis=1)
        last = cand - 1
        g_last = (last * nlevels) // cand
        q_last = np.where(
            support[np.arange(cand.size), g_last] > 0,
            mass[np.arange(cand.size), g_last] / np.maximum(support[np.arange(cand.size), g_last], 1),
            0.0,
        )
        q_last = np.where(h[last] > 0, q_last, 0.0)
        p_last = h[last] + tail
        plogp = chlogh[last] + np.where(p_last > 0, p_last * np.log(np.where(p_last > 0, p_last, 1.0)), 0.0)
        plogq = mlogq - np.where(h[last] > 0, h[last] * np.log(np.where(q_last > 0, q_last, 1.0)), 0.0)
        plogq = plogq + np.where(p_last > 0, p_last * np.log(np.where(q_last > 0, q_last, 1.0)), 0.0)
        kl = (plogp - plogq) / total - np.log(total) + np.log(csum[cand])
    kl = np.where((p_last > 0) & (q_last <= 0), np.inf, kl)
    return kl


def kl_range(hist: Histogram, grid: IntGrid, symmetric: bool):
    """Clipping range from the KL threshold of |x| (clipped to what was observed)."""
    nlevels = max(grid.qmax + 1, -grid.qmin, 1) if grid.qmin < 0 else grid.qmax + 1
    amax = kl_threshold(hist.abs_counts(), float(hist.width), nlevels)
    lo_obs, hi_obs = float(hist.min), float(hist.max)
    return max(lo_obs, -amax), min(hi_obs, amax)
