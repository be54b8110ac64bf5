"""Streaming calibration observers: ``update(batch)``, ``result()``, ``reset()``, ``merge(other)``.

Observers never keep raw activations, so their memory does not grow with the
number of batches. Merging two observers that saw two shards gives the result
of one observer that saw all the data: exactly for `MinMaxObserver`,
`HistogramObserver` and `PositionVoteObserver`, and up to float rounding for
`MovingAverageObserver`, whose merge treats ``other``'s batches as coming after
``self``'s.

Example:
    >>> obs = MinMaxObserver()
    >>> for batch in batches:
    ...     obs.update(batch)
    >>> stats = obs.result()      # RangeStats(min, max, count)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from qstrat.errors import CalibrationDataError, UnsupportedError
from qstrat.quantizers.stats import (
    DEFAULT_BINS_PER_SIDE,
    EMPTY_EXPONENT,
    Histogram,
    RangeStats,
    bin_counts,
    check_finite,
    coarsen,
    exponent_for,
    move_axis_last,
)


def finite_range(name: str, lo, hi):
    """``(lo, hi)`` as 1-element float64 arrays; a `CalibrationDataError` naming the tensor where either is not
    finite (the float model made NaN or Inf)."""
    lo, hi = np.array([float(lo)]), np.array([float(hi)])
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
        raise CalibrationDataError(
            f"{name}: the tensor holds NaN or Inf values (min {lo[0]}, max {hi[0]}), made by its layer or by one "
            "before it that has no quantizer (a Lambda, a layer left in float). The model overflows, divides by "
            "zero or takes a logarithm of a negative on this data; check the data and the float model."
        )
    return lo, hi


class Observer:
    """Base class: input checks, channel bookkeeping and the merge contract."""

    def __init__(self, axis: int | None = None, name: str = "observer"):
        self.axis = axis
        self.name = name
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self.channels: int | None = None

    def _rows(self, batch):
        """Check a batch; return it as (C, M) rows (C = 1 per tensor) with each row's min and max."""
        batch = np.asarray(batch)
        if self.axis is not None:
            if batch.ndim == 0 or not -batch.ndim <= self.axis < batch.ndim:
                raise CalibrationDataError(
                    f"{self.name}: channel axis {self.axis} does not exist in a batch of shape {batch.shape}."
                )
        if batch.size == 0 or batch.dtype.kind not in "fiu":
            check_finite(batch, self.name)  # raises the matching error
        rows = move_axis_last(batch, self.axis)
        if self.axis is None:
            lo, hi = np.array([rows.min()], np.float64), np.array([rows.max()], np.float64)
        else:
            lo, hi = rows.min(axis=1).astype(np.float64), rows.max(axis=1).astype(np.float64)
        check_finite(batch, self.name, lo, hi)
        if self.channels is None:
            self.channels = rows.shape[0]
        elif rows.shape[0] != self.channels:
            raise CalibrationDataError(
                f"{self.name}: batch has {rows.shape[0]} channels on axis {self.axis}, "
                f"earlier batches had {self.channels}. Every batch must have the same channel count."
            )
        return rows, lo, hi

    def _check_mergeable(self, other) -> None:
        if type(other) is not type(self) or other.axis != self.axis:
            raise UnsupportedError(
                f"{self.name}: cannot merge a {type(other).__name__}(axis={other.axis}) "
                f"into a {type(self).__name__}(axis={self.axis})."
            )
        if self.channels is not None and other.channels is not None and self.channels != other.channels:
            raise UnsupportedError(
                f"{self.name}: cannot merge observers of {self.channels} and {other.channels} channels."
            )

    def _need_data(self) -> None:
        if self.count == 0:
            raise UnsupportedError(f"{self.name}: no data observed yet; call update(batch) first.")

    def _squeeze(self, a: np.ndarray) -> np.ndarray:
        return np.asarray(a[0]) if self.axis is None else a

    def update(self, batch) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def result(self):  # pragma: no cover - interface
        raise NotImplementedError

    def merge(self, other) -> Observer:  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """Bytes of numeric state held (a constant in the number of batches)."""
        return sum(v.nbytes for v in vars(self).values() if isinstance(v, np.ndarray))


class MinMaxObserver(Observer):
    """Running minimum and maximum, per tensor or per channel."""

    def reset(self) -> None:
        super().reset()
        self.min = self.max = None

    def update(self, batch) -> None:
        rows, lo, hi = self._rows(batch)
        self.min = lo if self.min is None else np.minimum(self.min, lo)
        self.max = hi if self.max is None else np.maximum(self.max, hi)
        self.count += rows.shape[1]

    def update_range(self, lo, hi, count: int) -> None:
        """Add a batch given by its precomputed min and max (per tensor)."""
        lo, hi = finite_range(self.name, lo, hi)
        self.channels = self.channels or 1
        self.min = lo if self.min is None else np.minimum(self.min, lo)
        self.max = hi if self.max is None else np.maximum(self.max, hi)
        self.count += int(count)

    def merge(self, other: MinMaxObserver) -> MinMaxObserver:
        self._check_mergeable(other)
        if other.count:
            self.min = other.min if self.min is None else np.minimum(self.min, other.min)
            self.max = other.max if self.max is None else np.maximum(self.max, other.max)
            self.count += other.count
            self.channels = self.channels or other.channels
        return self

    def result(self) -> RangeStats:
        self._need_data()
        return RangeStats(self._squeeze(self.min), self._squeeze(self.max), self.count)


def minmax_estimate(rows: np.ndarray):
    return rows.min(axis=1).astype(np.float64), rows.max(axis=1).astype(np.float64)


@dataclass(frozen=True)
class MovingAverageStats(RangeStats):
    """A moving average's debiased range, and the accumulators that continue it.

    ``min == biased_min / (1 - decay**steps)`` (and so for max): ``steps`` is
    the number of batches averaged. A quantizer that keeps averaging after
    calibration (MAFS while training) starts from these instead of from the
    debiased range, so the count carries over.
    """

    biased_min: np.ndarray
    biased_max: np.ndarray
    steps: int


class MovingAverageObserver(Observer):
    """Exponential moving average of a per-batch range, debiased (Adam-style).

    After n batches with per-batch estimates r_1..r_n:
        b_n = d * b_(n-1) + (1 - d) * r_n,   result = b_n / (1 - d^n).
    ``merge(other)`` is exact algebra: b = d^(n_other) * b_self + b_other.
    ``result()`` is a `MovingAverageStats`: the range plus b_n and n.

    Args:
        decay: the EMA decay d in (0, 1).
        estimate: maps (C, M) rows to per-row (lo, hi); min/max by default.
    """

    def __init__(self, decay: float = 0.999, axis=None, estimate: Callable | None = None, name="observer"):
        self.decay = float(decay)
        self.estimate = estimate or minmax_estimate
        super().__init__(axis, name)

    def reset(self) -> None:
        super().reset()
        self.steps = 0
        self.biased_min = self.biased_max = None

    def update(self, batch) -> None:
        rows, lo, hi = self._rows(batch)
        if self.estimate is not minmax_estimate:
            lo, hi = self.estimate(rows)
        d = self.decay
        if self.biased_min is None:
            self.biased_min, self.biased_max = (1 - d) * lo, (1 - d) * hi
        else:
            self.biased_min = d * self.biased_min + (1 - d) * lo
            self.biased_max = d * self.biased_max + (1 - d) * hi
        self.steps += 1
        self.count += rows.shape[1]

    def merge(self, other: MovingAverageObserver) -> MovingAverageObserver:
        self._check_mergeable(other)
        if other.steps:
            if self.steps == 0:
                self.biased_min, self.biased_max = other.biased_min.copy(), other.biased_max.copy()
            else:
                f = self.decay**other.steps
                self.biased_min = f * self.biased_min + other.biased_min
                self.biased_max = f * self.biased_max + other.biased_max
            self.steps += other.steps
            self.count += other.count
            self.channels = self.channels or other.channels
        return self

    def result(self) -> MovingAverageStats:
        self._need_data()
        debias = 1.0 - self.decay**self.steps
        return MovingAverageStats(
            self._squeeze(self.biased_min / debias),
            self._squeeze(self.biased_max / debias),
            self.count,
            self._squeeze(self.biased_min.copy()),
            self._squeeze(self.biased_max.copy()),
            self.steps,
        )


class HistogramObserver(Observer):
    """Power-of-2 aligned histogram with exact re-binning (see `qstrat.quantizers.stats`).

    Args:
        bins_per_side: bins on each side of zero, a power of two (default 8192).
        axis: channel axis for per-channel histograms, or None.
    """

    def __init__(self, bins_per_side: int = DEFAULT_BINS_PER_SIDE, axis=None, name="observer"):
        if bins_per_side < 2 or bins_per_side & (bins_per_side - 1):
            raise UnsupportedError(f"bins_per_side must be a power of two >= 2, got {bins_per_side}.")
        self.bins_per_side = int(bins_per_side)
        super().__init__(axis, name)

    def reset(self) -> None:
        super().reset()
        self.counts = self.exponent = self.min = self.max = None

    def _init_state(self, channels: int) -> None:
        self.counts = np.zeros((channels, 2 * self.bins_per_side), dtype=np.int64)
        self.exponent = np.full(channels, EMPTY_EXPONENT, dtype=np.int64)
        self.min = np.full(channels, np.inf)
        self.max = np.full(channels, -np.inf)

    def _grow(self, c: int, k: int) -> None:
        if k > self.exponent[c]:
            self.counts[c] = coarsen(self.counts[c], int(k - self.exponent[c]))
            self.exponent[c] = k

    def update(self, batch, counted: int | None = None) -> None:
        """Add a batch. ``counted``: count only its first ``counted`` entries on axis 0 (the first samples of
        a batch) in the histogram; the range, and so the bins' exponent, still come from the whole batch."""
        rows, lo, hi = self._rows(batch)
        if counted is not None:
            rows = move_axis_last(np.asarray(batch)[:counted], self.axis)
        if self.counts is None:
            self._init_state(rows.shape[0])
        k_new = exponent_for(np.maximum(-lo, hi))
        for c in range(rows.shape[0]):
            self._grow(c, int(k_new[c]))
            self.counts[c] += bin_counts(rows[c], int(self.exponent[c]), self.bins_per_side)
        self.min = np.minimum(self.min, lo)
        self.max = np.maximum(self.max, hi)
        self.count += rows.shape[1]

    def update_histogram(self, counts, exponent: int, lo, hi, count: int) -> None:
        """Add a batch given by its own aligned histogram (per tensor), merged exactly."""
        lo, hi = finite_range(self.name, lo, hi)
        if self.counts is None:
            self._init_state(1)
            self.channels = 1
        k = int(max(self.exponent[0], int(exponent)))
        self._grow(0, k)
        self.counts[0] += coarsen(np.asarray(counts, np.int64), k - int(exponent))
        self.min = np.minimum(self.min, lo)
        self.max = np.maximum(self.max, hi)
        self.count += int(count)

    def merge(self, other: HistogramObserver) -> HistogramObserver:
        self._check_mergeable(other)
        if other.bins_per_side != self.bins_per_side:
            raise UnsupportedError(
                f"{self.name}: cannot merge histograms of {other.bins_per_side} and {self.bins_per_side} bins per side."
            )
        if other.count:
            if self.counts is None:
                self._init_state(other.counts.shape[0])
                self.channels = other.channels
            for c in range(self.counts.shape[0]):
                k = int(max(self.exponent[c], other.exponent[c]))
                self._grow(c, k)
                self.counts[c] += coarsen(other.counts[c], int(k - other.exponent[c]))
            self.min = np.minimum(self.min, other.min)
            self.max = np.maximum(self.max, other.max)
            self.count += other.count
        return self

    def result(self) -> Histogram:
        self._need_data()
        return Histogram(
            self._squeeze(self.counts).copy(),
            self._squeeze(self.exponent).copy(),
            self._squeeze(self.min).copy(),
            self._squeeze(self.max).copy(),
            self.count,
        )


class PositionVoteObserver(Observer):
    """Per-batch power-of-2 position, reduced to the most common one (the DPU tool's policy).

    Each batch gets its own position from ``estimate`` (a function of the raw
    batch returning an int per channel); the result is the most frequent
    position per channel. Ties go to the lowest position (the wider range),
    which keeps the result independent of batch order and sharding.
    """

    def __init__(self, estimate: Callable[[np.ndarray], np.ndarray], axis=None, name="observer"):
        self.estimate = estimate
        super().__init__(axis, name)

    def reset(self) -> None:
        super().reset()
        self.votes: Counter = Counter()

    def update(self, batch) -> None:
        rows, _, _ = self._rows(batch)
        pos = np.atleast_1d(np.asarray(self.estimate(np.asarray(batch)), dtype=np.int64))
        for c, p in enumerate(pos):
            self.votes[(c, int(p))] += 1
        self.count += rows.shape[1]

    def merge(self, other: PositionVoteObserver) -> PositionVoteObserver:
        self._check_mergeable(other)
        self.votes.update(other.votes)
        self.count += other.count
        self.channels = self.channels or other.channels
        return self

    def result(self) -> np.ndarray:
        self._need_data()
        best: dict[int, tuple[int, int]] = {}
        for (c, p), n in self.votes.items():
            cur = best.get(c)
            if cur is None or n > cur[0] or (n == cur[0] and p < cur[1]):
                best[c] = (n, p)
        out = np.array([best[c][1] for c in sorted(best)], dtype=np.int64)
        return self._squeeze(out)

    @property
    def nbytes(self) -> int:
        return 64 * len(self.votes)


def make_observer(spec, name: str = "observer") -> Observer:
    """Build the observer a quantizer asked for with its `ObserverSpec`."""
    if spec.kind == "minmax":
        return MinMaxObserver(axis=spec.axis, name=name)
    if spec.kind == "ema":
        return MovingAverageObserver(spec.decay, axis=spec.axis, estimate=spec.estimate, name=name)
    if spec.kind == "histogram":
        return HistogramObserver(spec.bins_per_side, axis=spec.axis, name=name)
    if spec.kind == "votes":
        return PositionVoteObserver(spec.estimate, axis=spec.axis, name=name)
    raise UnsupportedError(f"unknown observer kind {spec.kind!r}")
