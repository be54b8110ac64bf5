"""Statistics that observers hand to quantizers: ranges and aligned histograms.

A `Histogram` covers [-2^k, 2^k) with ``2N`` equal bins, bin ``i`` holding
values in ``[(i - N) w, (i - N + 1) w)`` with ``w = 2^k / N``. Because the
range is a power of two and the bins are aligned to zero, growing the range
from 2^k to 2^(k+j) merges each run of 2^j bins into one, exactly: a value's
bin at the coarse range is its fine bin shifted right by j. So a histogram
never needs raw data again, its memory does not depend on how many batches
it saw, and two shards merged equal one pass over all the data, bit for bit.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from qstrat.errors import CalibrationDataError

DEFAULT_BINS_PER_SIDE = 8192
# A histogram that has only seen zeros starts at this exponent; the first
# non-zero value grows it. Coarsening from here is exact like any other.
EMPTY_EXPONENT = -126


@dataclass(frozen=True)
class RangeStats:
    """Observed range: per-tensor scalars, or one value per channel."""

    min: np.ndarray
    max: np.ndarray
    count: int


@dataclass(frozen=True)
class Histogram:
    """Power-of-2 aligned histogram, per tensor (1-D counts) or per channel (2-D).

    Attributes:
        counts: int64, shape (2N,) or (C, 2N).
        exponent: int64, shape () or (C,): the range is [-2^exponent, 2^exponent).
        min, max: exact extremes seen, shape () or (C,).
        count: number of values seen per channel (or in all).
    """

    counts: np.ndarray
    exponent: np.ndarray
    min: np.ndarray
    max: np.ndarray
    count: int

    @property
    def bins_per_side(self) -> int:
        return self.counts.shape[-1] // 2

    @property
    def width(self) -> np.ndarray:
        return np.ldexp(1.0, self.exponent.astype(np.int64) - int(np.log2(self.bins_per_side)))

    def channel(self, c: int) -> Histogram:
        """The histogram of one channel of a per-channel histogram."""
        return Histogram(self.counts[c], self.exponent[c], self.min[c], self.max[c], self.count)

    def channels(self):
        """Iterate per-channel histograms (a per-tensor histogram yields itself)."""
        if self.counts.ndim == 1:
            yield self
        else:
            for c in range(self.counts.shape[0]):
                yield self.channel(c)

    def lower_edges(self) -> np.ndarray:
        """Lower edge of every bin (per-tensor histograms only)."""
        n = self.bins_per_side
        return (np.arange(2 * n, dtype=np.float64) - n) * float(self.width)

    def abs_counts(self) -> np.ndarray:
        """Counts of |x| over [0, 2^k) in N bins (per-tensor histograms only).

        Bin -j-1 holds [-(j+1)w, -jw), whose |x| lies in (jw, (j+1)w]: it
        folds onto |x| bin j with no loss beyond the edge value itself.
        """
        n = self.bins_per_side
        return self.counts[n:] + self.counts[:n][::-1]


def check_finite(batch: np.ndarray, where: str = "calibration batch", lo=None, hi=None) -> None:
    """Raise CalibrationDataError when a batch is empty, not numeric, or holds NaN or Inf.

    ``lo``/``hi`` are the batch's min and max when the caller has them already:
    NaN and Inf propagate into them, so the check then costs nothing.
    """
    if batch.size == 0:
        raise CalibrationDataError(f"{where}: the batch is empty (shape {batch.shape}).")
    if batch.dtype == np.bool_ or not (
        np.issubdtype(batch.dtype, np.floating) or np.issubdtype(batch.dtype, np.integer)
    ):
        raise CalibrationDataError(f"{where}: expected a numeric array, got dtype {batch.dtype}.")
    if np.issubdtype(batch.dtype, np.floating):
        if lo is None:
            lo, hi = batch.min(), batch.max()
        if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
            bad = int(np.count_nonzero(~np.isfinite(batch)))
            raise CalibrationDataError(
                f"{where}: {bad} of {batch.size} values are NaN or Inf. "
                "Clean the data (np.nan_to_num, or drop those samples) before calibrating."
            )


def exponent_for(amax: np.ndarray) -> np.ndarray:
    """Smallest k with amax < 2^k (exact, via frexp); EMPTY_EXPONENT for zero."""
    amax = np.asarray(amax, dtype=np.float64)
    _, e = np.frexp(amax)
    return np.where(amax > 0, e, EMPTY_EXPONENT).astype(np.int64)


def coarsen(counts: np.ndarray, shift: int) -> np.ndarray:
    """Re-bin a 1-D signed histogram to a range 2^shift times larger, exactly."""
    if shift <= 0:
        return counts
    n = counts.shape[-1] // 2
    if shift >= 62 or (1 << shift) >= 2 * n:
        out = np.zeros_like(counts)
        out[n - 1] = counts[:n].sum()
        out[n] = counts[n:].sum()
        return out
    f = 1 << shift
    merged = counts.reshape(-1, f).sum(axis=1)  # 2n/f merged bins, aligned at zero
    out = np.zeros_like(counts)
    half = merged.shape[0] // 2
    out[n - half : n + half] = merged
    return out


_scratch = threading.local()


def _buffer(dtype, size: int) -> np.ndarray:
    """A reusable per-thread work array of ``dtype`` with at least ``size`` elements.

    Reusing it avoids allocating (and page-faulting) batch-sized arrays on every
    update; its size follows the largest batch, not the number of batches.
    """
    key = np.dtype(dtype).char
    buf = getattr(_scratch, key, None)
    if buf is None or buf.size < size:
        buf = np.empty(size, dtype)
        setattr(_scratch, key, buf)
    return buf[:size]


def bin_counts(values: np.ndarray, exponent: int, bins_per_side: int) -> np.ndarray:
    """Counts of ``values`` (all in [-2^exponent, 2^exponent)) in the aligned bins.

    The bin index is floor(x * 2^(log2 N - exponent)) + N. Multiplying by a power
    of two is exact, so the index is exact; no clipping is needed because the
    caller picked the exponent from the batch's own extremes.
    """
    n = bins_per_side
    flat = np.ravel(values)
    shift = int(np.log2(n)) - int(exponent)
    if flat.dtype == np.float64 or not -126 <= shift <= 127:
        work = _buffer(np.float64, flat.size)
        np.multiply(flat, np.ldexp(1.0, shift), out=work, casting="unsafe")
    else:  # a float32 power of two: exact, and half the memory traffic
        work = _buffer(np.float32, flat.size)
        np.multiply(flat, np.float32(np.ldexp(1.0, shift)), out=work, casting="unsafe")
    np.floor(work, out=work)
    ibuf = _buffer(np.intp, flat.size)
    np.copyto(ibuf, work, casting="unsafe")
    ibuf += n
    return np.bincount(ibuf, minlength=2 * n)


def move_axis_last(x: np.ndarray, axis: int | None) -> np.ndarray:
    """Reshape to (C, M) with the channel axis first, or (1, M) for axis None."""
    if axis is None:
        return x.reshape(1, -1)
    axis = axis % x.ndim
    return np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)


@dataclass(frozen=True)
class ObserverSpec:
    """What a quantizer needs to see during calibration; `calibration.make_observer` builds it.

    Attributes:
        kind: "minmax", "ema" (moving average of a per-batch range), "histogram",
            or "votes" (per-batch position, most common wins).
        axis: channel axis for per-channel statistics, or None.
        decay: EMA decay for "ema".
        estimate: per-batch function for "ema" ((C, M) rows -> (lo, hi)) and
            "votes" (raw batch -> position per channel).
        share: for "histogram": a histogram of a share of a large calibration set
            decides the state as well as one of all of it (a search among a few
            power-of-2 positions), so calibration may count only a share of each
            batch (`qstrat.passes.calibrate.HISTOGRAM_SAMPLES`).
    """

    kind: str
    axis: int | None = None
    decay: float | None = None
    estimate: object = None
    bins_per_side: int = DEFAULT_BINS_PER_SIDE
    share: bool = False


def histogram_of_rows(rows: np.ndarray, bins_per_side: int = DEFAULT_BINS_PER_SIDE) -> Histogram:
    """One aligned histogram per row of a (C, M) array (used for weights and single batches)."""
    rows = np.asarray(rows)
    lo, hi = rows.min(axis=1).astype(np.float64), rows.max(axis=1).astype(np.float64)
    k = exponent_for(np.maximum(-lo, hi))
    counts = np.stack([bin_counts(r, int(kc), bins_per_side) for r, kc in zip(rows, k, strict=False)])
    return Histogram(counts, k, lo, hi, rows.shape[1])
