"""Range methods: from observed data to a clipping range or a power-of-2 position.

All NumPy, all per channel where the quantizer is per channel.

- No_OF: the tightest range that does not overflow. For power-of-2 scales
  pos = floor(-log2(max(lo / qmin, hi / qmax))), computed exactly with frexp.
- Min_MSE: the range with the least squared error. For power-of-2 it tries
  pos0 .. pos0 + 4 (pos0 from No_OF); for float scales it searches clipping
  thresholds. On raw tensors (weights) the error is exact; on histograms
  (activations) it is the expected error with values spread evenly inside
  each bin, integrated in closed form (`expected_sq_error`).
- Min_KL and Percentile: `qstrat.quantizers.percentile_kl`.

Bit widths up to 32: everything runs in float64 and int64, which hold every
integer of such grids; zero points are chosen among float32s
(`float32_zero_point`), as the state stores them.
"""

from __future__ import annotations

import numpy as np

from qstrat.quantizers.grid import IntGrid, RoundMode, float32_inside
from qstrat.quantizers.reference import affine_fake_quant_np, round_np
from qstrat.quantizers.stats import Histogram

MSE_POS_CANDIDATES = 5  # pos0 .. pos0 + 4, as the DPU tool does
FS_MSE_CANDIDATES = 32  # clipping thresholds per search stage: coarse, then 32 around the best
FS_MSE_ROUNDS = 2  # coordinate-descent rounds over (lo, hi) for asymmetric ranges
SEARCH_BINS_PER_SIDE = 2048  # float-scale MSE searches run on a histogram coarsened to this
_CHUNK_ELEMENTS = 1 << 19  # candidates x bins evaluated at once: bounds the search's temporaries


# ---- power-of-2 positions ---------------------------------------------------


def floor_neg_log2(v: np.ndarray) -> np.ndarray:
    """floor(-log2(v)) for v > 0, exactly (no float log)."""
    mant, e = np.frexp(np.asarray(v, dtype=np.float64))  # v = mant * 2^e, mant in [0.5, 1)
    return (-e + (mant == 0.5)).astype(np.int64)


def symmetric_scale(lo, hi, grid: IntGrid, epsilon: float) -> np.ndarray:
    """The smallest scale with lo and hi on the grid and zero point 0."""
    lo = np.minimum(np.asarray(lo, dtype=np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, dtype=np.float64), 0.0)
    s = np.zeros(np.broadcast(lo, hi).shape)
    if grid.qmin < 0:
        s = np.maximum(s, lo / grid.qmin)
    if grid.qmax > 0:
        s = np.maximum(s, hi / grid.qmax)
    return np.maximum(s, epsilon)


def float32_zero_point(zp, grid: IntGrid, lo=None, hi=None, scale=None) -> np.ndarray:
    """Integer zero points as float32 state can hold them, chosen so the range stays on the grid.

    Up to 24 bits every zero point is a float32 and this changes nothing. On
    wider grids a zero point moves to a neighbouring float32 (at most 128
    levels away at 2^31): the nearest one, or, when that would leave ``lo`` or
    ``hi`` more than half a step off the grid (as rounding the zero point
    itself may) and the other neighbour would not, that one. Choosing here,
    where the range methods measure their error, keeps what they measure equal
    to what the state does, instead of the state rounding it when it is stored.
    """
    zp = np.asarray(zp, np.float64)
    inside = float32_inside(grid)
    f = zp.astype(np.float32)
    near = np.clip(f, *inside).astype(np.float64)
    if lo is None or np.array_equal(near, zp):
        return near
    s = np.asarray(scale, np.float64)
    # Levels the zero point may take with lo and hi at most half a step outside the grid.
    least = grid.qmin - np.minimum(np.asarray(lo, np.float64), 0.0) / s - 0.5
    most = grid.qmax - np.maximum(np.asarray(hi, np.float64), 0.0) / s + 0.5
    other = np.where(f > zp, np.nextafter(f, np.float32(-np.inf)), np.nextafter(f, np.float32(np.inf)))
    other = np.clip(other, *inside).astype(np.float64)
    fits = (near >= least) & (near <= most)
    other_fits = (other >= least) & (other <= most)
    return np.where(~fits & other_fits, other, near)


def asymmetric_scale_zp(lo, hi, grid: IntGrid, epsilon: float):
    """Scale and integer zero point mapping [min(lo,0), max(hi,0)] onto the grid."""
    lo = np.minimum(np.asarray(lo, dtype=np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, dtype=np.float64), 0.0)
    s = np.maximum((hi - lo) / (grid.qmax - grid.qmin), epsilon)
    zp = np.clip(np.rint(grid.qmin - lo / s), grid.qmin, grid.qmax)
    return s, float32_zero_point(zp, grid, lo, hi, s)


def nonoverflow_pos(lo, hi, grid: IntGrid, symmetric: bool, epsilon: float, pos_range):
    """Largest power-of-2 position whose grid holds [lo, hi]; clipped to pos_range."""
    if symmetric:
        s = symmetric_scale(lo, hi, grid, epsilon)
    else:
        s, _ = asymmetric_scale_zp(lo, hi, grid, epsilon)
    return np.clip(floor_neg_log2(s), pos_range[0], pos_range[1])


def pof2_zero_point(lo, pos, grid: IntGrid, symmetric: bool, hi=None) -> np.ndarray:
    """Zero point for an asymmetric power-of-2 grid (0 when symmetric); ``hi`` helps pick it above 24 bits."""
    if symmetric:
        return np.zeros_like(np.asarray(pos, dtype=np.float64))
    s = np.ldexp(1.0, -np.asarray(pos, dtype=np.int64))
    lo = np.minimum(np.asarray(lo, dtype=np.float64), 0.0)
    zp = np.clip(np.rint(grid.qmin - lo / s), grid.qmin, grid.qmax)
    return float32_zero_point(zp, grid, lo, 0.0 if hi is None else hi, s)


def tensor_sse(x2d: np.ndarray, scale, zp, grid: IntGrid, round_mode, x64: np.ndarray | None = None) -> np.ndarray:
    """Sum of squared fake-quant error per row of a (C, M) tensor, exact. ``x64``: ``x2d`` as float64, when the
    caller has it already (a search over candidates converts once)."""
    y = affine_fake_quant_np(x2d, np.asarray(scale, np.float32), zp, grid, round_mode, axis=0)
    d = (x2d.astype(np.float64) if x64 is None else x64) - y
    return np.einsum("cm,cm->c", d, d)


def pof2_mse_pos_tensor(x2d, lo, hi, grid, symmetric, round_mode, epsilon, pos_range):
    """Min_MSE position per row of a (C, M) tensor: best of pos0 .. pos0 + 4, ties to the lowest."""
    p0 = nonoverflow_pos(lo, hi, grid, symmetric, epsilon, pos_range)
    best_pos, best_err = p0.copy(), np.full(p0.shape, np.inf)
    x64 = x2d.astype(np.float64)
    for d in range(MSE_POS_CANDIDATES):
        pos = np.minimum(p0 + d, pos_range[1])
        zp = pof2_zero_point(lo, pos, grid, symmetric, hi)
        err = tensor_sse(x2d, np.ldexp(1.0, -pos), zp, grid, round_mode, x64)
        better = err < best_err
        best_pos = np.where(better, pos, best_pos)
        best_err = np.where(better, err, best_err)
    return best_pos


# ---- expected error over a histogram -----------------------------------------


def _cube(x):
    return x * x * x


def _sq_error_antiderivative(t, kmin, kmax, delta):
    """M(t) = ∫_L^t (v - clip(R(v), kmin, kmax))² dv, in units of one step.

    R rounds to the nearest integer, shifted by ``delta`` (0 for nearest modes,
    0.5 for FLOOR). L = kmin - 0.5 + delta is the grid's lower decision edge.
    Cubes are products (``**`` calls the slower ``pow``).
    """
    lo_edge = kmin - 0.5 + delta
    hi_edge = kmax + 0.5 + delta
    period = (_cube(0.5 + delta) - _cube(delta - 0.5)) / 3.0
    inside = np.clip(t, lo_edge, hi_edge)
    k = np.floor(inside - delta + 0.5)
    k = np.minimum(k, kmax)  # t == hi_edge belongs to the last full period
    r = inside - k
    m = (k - kmin) * period + (_cube(r) - _cube(delta - 0.5)) / 3.0
    below = t < lo_edge
    above = t > hi_edge
    m = np.where(below, (_cube(t - kmin) - _cube(lo_edge - kmin)) / 3.0, m)
    m = np.where(above, m + (_cube(t - kmax) - _cube(hi_edge - kmax)) / 3.0, m)
    return m


def expected_sq_error(hist: Histogram, scale, zero_point, grid: IntGrid, round_mode) -> np.ndarray:
    """Expected sum of squared fake-quant error over a per-tensor histogram.

    Each bin's values are taken as spread evenly over the bin; the error is then
    integrated in closed form, so the result is exact for that assumption
    whatever the ratio of bin width to quantization step. ``scale`` and
    ``zero_point`` may be arrays of candidates (K,); the result has shape (K,).
    """
    counts = hist.counts
    nz = np.nonzero(counts)[0]
    if nz.size == 0:
        return np.zeros(np.shape(scale))
    w = float(hist.width)
    n = hist.bins_per_side
    # Bin i spans edges i and i + 1; neighbouring bins share an edge, so the
    # antiderivative is evaluated once per distinct edge, plus the two
    # outermost edges, narrowed to the exact observed extremes.
    edges, where = np.unique(np.concatenate([nz, nz + 1]), return_inverse=True)
    values = (edges - n).astype(np.float64) * w
    values = np.concatenate([values, [max(values[where[0]], float(hist.min))]])
    values = np.concatenate([values, [min(values[where[-1]], float(hist.max))]])
    ia, ib = where[: nz.size].copy(), where[nz.size :].copy()
    ia[0], ib[-1] = len(values) - 2, len(values) - 1
    c = counts[nz].astype(np.float64)
    scales = np.asarray(scale, dtype=np.float64).reshape(-1)
    zps = np.broadcast_to(np.asarray(zero_point, dtype=np.float64).reshape(-1), scales.shape)
    delta = 0.5 if RoundMode(round_mode) == RoundMode.FLOOR else 0.0
    out = np.empty(scales.shape)
    step = max(1, _CHUNK_ELEMENTS // max(len(values), 1))  # bounded temporaries: memory independent of K
    for i in range(0, scales.size, step):
        s = scales[i : i + step].reshape(-1, 1)
        zp = zps[i : i + step].reshape(-1, 1)
        kmin, kmax = grid.qmin - zp, grid.qmax - zp
        u = values / s
        m = _sq_error_antiderivative(u, kmin, kmax, delta)
        ua, ub, ma, mb = u[:, ia], u[:, ib], m[:, ia], m[:, ib]
        width = ub - ua
        point = width <= 0  # a bin holding one exact value (min == max)
        point_err = (ua - np.clip(round_np(ua, round_mode), kmin, kmax)) ** 2 if np.any(point) else 0.0
        per_bin = np.where(point, point_err, (mb - ma) / np.where(point, 1.0, width)) * s**2
        out[i : i + step] = per_bin @ c
    return out.reshape(np.shape(scale))


def pof2_mse_pos_hist(hist: Histogram, grid, symmetric, round_mode, epsilon, pos_range) -> int:
    """Min_MSE position from a histogram: pos0 .. pos0 + 4, ties to the lowest."""
    p0 = int(nonoverflow_pos(hist.min, hist.max, grid, symmetric, epsilon, pos_range))
    cands = np.minimum(p0 + np.arange(MSE_POS_CANDIDATES), pos_range[1])
    zps = pof2_zero_point(hist.min, cands, grid, symmetric, hist.max)
    err = expected_sq_error(coarsened(hist, SEARCH_BINS_PER_SIDE), np.ldexp(1.0, -cands), zps, grid, round_mode)
    return int(cands[int(np.argmin(err))])


def coarsened(hist: Histogram, bins_per_side: int) -> Histogram:
    """The same histogram with at most ``bins_per_side`` bins per side (exact re-binning)."""
    n = hist.bins_per_side
    if n <= bins_per_side:
        return hist
    f = n // bins_per_side
    counts = hist.counts.reshape(-1, f).sum(axis=1)
    return Histogram(counts, hist.exponent, hist.min, hist.max, hist.count)


def _alpha_search(cost) -> float:
    """Minimise cost(alphas) over alpha in (0, 1]: a coarse grid, then a fine grid around the best."""
    k = FS_MSE_CANDIDATES
    coarse = np.arange(1, k + 1) / k
    best = float(coarse[int(np.argmin(cost(coarse)))])
    fine = np.clip(best + np.arange(-k, k + 1) / (k * k), 1.0 / (k * k), 1.0)
    errs = cost(fine)
    return float(fine[int(np.argmin(errs))])


def fs_mse_range_hist(hist: Histogram, grid: IntGrid, symmetric: bool, round_mode, epsilon):
    """Min_MSE clipping range [lo, hi] for a float scale, from a histogram.

    Symmetric: both ends shrink together by alpha. Asymmetric: coordinate descent,
    alternately on hi and lo, FS_MSE_ROUNDS times. Each 1-D search tries 32
    thresholds, then 65 around the best (resolution 1/1024 of the range).
    """
    lo0, hi0 = min(float(hist.min), 0.0), max(float(hist.max), 0.0)
    work = coarsened(hist, SEARCH_BINS_PER_SIDE)

    def cost(los, his):
        if symmetric:
            s = symmetric_scale(los, his, grid, epsilon)
            zp = np.zeros_like(s)
        else:
            s, zp = asymmetric_scale_zp(los, his, grid, epsilon)
        return expected_sq_error(work, s, zp, grid, round_mode)

    if symmetric:
        amax = max(-lo0, hi0)
        if amax == 0:
            return lo0, hi0
        # Both ends shrink together; the grid's own asymmetry is kept.
        a = _alpha_search(lambda al: cost(np.maximum(lo0, -amax * al), np.minimum(hi0, amax * al)))
        return max(lo0, -amax * a), min(hi0, amax * a)
    lo, hi = lo0, hi0
    searched = {}  # side -> the other end it was searched against: the same search again gives the same end
    for _ in range(FS_MSE_ROUNDS):
        if hi0 > 0 and searched.get("hi") != lo:
            searched["hi"] = lo
            hi = hi0 * _alpha_search(lambda al, lo=lo: cost(np.full(al.shape, lo), hi0 * al))
        if lo0 < 0 and searched.get("lo") != hi:
            searched["lo"] = hi
            lo = lo0 * _alpha_search(lambda al, hi=hi: cost(lo0 * al, np.full(al.shape, hi)))
    return lo, hi


def fs_mse_range_tensor(x2d, lo, hi, grid, symmetric, round_mode, epsilon):
    """Min_MSE clipping range per row of a (C, M) tensor, with the exact error.

    The same searches as `fs_mse_range_hist`, run for every row at once.
    """
    lo0 = np.minimum(np.asarray(lo, np.float64), 0.0)
    hi0 = np.maximum(np.asarray(hi, np.float64), 0.0)
    k = FS_MSE_CANDIDATES

    def sse(los, his):
        if symmetric:
            s, zp = symmetric_scale(los, his, grid, epsilon), np.zeros_like(los)
        else:
            s, zp = asymmetric_scale_zp(los, his, grid, epsilon)
        return tensor_sse(x2d, s, zp, grid, round_mode)

    def search(make):
        """Per-row alpha search: coarse grid, then fine grid around each row's best."""

        def best_of(alphas_per_row):
            best_err = np.full(lo0.shape, np.inf)
            best_a = np.ones(lo0.shape)
            for col in range(alphas_per_row.shape[1]):
                a = alphas_per_row[:, col]
                err = sse(*make(a))
                better = err < best_err
                best_err = np.where(better, err, best_err)
                best_a = np.where(better, a, best_a)
            return best_a

        coarse = np.tile(np.arange(1, k + 1) / k, (lo0.size, 1))
        a0 = best_of(coarse)
        fine = np.clip(a0[:, None] + np.arange(-k, k + 1)[None, :] / (k * k), 1.0 / (k * k), 1.0)
        return best_of(fine)

    if symmetric:
        amax = np.maximum(-lo0, hi0)
        a = search(lambda a: (np.maximum(lo0, -amax * a), np.minimum(hi0, amax * a)))
        return np.maximum(lo0, -amax * a), np.minimum(hi0, amax * a)
    lo_, hi_ = lo0, hi0
    for _ in range(FS_MSE_ROUNDS):
        hi_ = hi0 * search(lambda a, lo_=lo_: (lo_, hi0 * a))
        lo_ = lo0 * search(lambda a, hi_=hi_: (lo0 * a, hi_))
    return lo_, hi_
