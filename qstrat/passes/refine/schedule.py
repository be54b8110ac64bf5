"""How bias correction reads the calibration data: one segment of samples per level, in a fixed number of passes.

Each level must be measured with every level upstream of it already
corrected. Measuring level after level on the whole data would cost a pass
per level, which grows with depth. Instead the samples are cut into one
segment per level, in order: level 0 is measured on the first segment,
corrected, then level 1 on the next segment, and so on. The number of passes
is fixed: the fewest (at most `MAX_PASSES`) that give each level
`MIN_SAMPLES_PER_LEVEL` samples. A level needs no more than
`MAX_SAMPLES_PER_LEVEL`: the shift is the mean of a difference between the
quantized and the float output of the same samples, which varies far less
from sample to sample than either output, so a large calibration set is only
partly read (the levels then share less than one pass). Segments are whole
batches where that costs at most a quarter of a level's samples, so no
batch is run in pieces. Segments of in-memory arrays are drawn in a fixed random
order, so sorted data (all of one class first) does not give each level one
kind of sample; other sources are read in their own order.

For in-memory arrays, the float side of every segment is gathered during
the calibration pass (`FloatSide`: per-sample channel sums of each target's
float output, added to the segments that sample falls in).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qstrat.calibration.data import iterate_batches
from qstrat.graph.ir import TensorRef

MIN_SAMPLES_PER_LEVEL = 32
MAX_SAMPLES_PER_LEVEL = 64
MAX_PASSES = 3


@dataclass(frozen=True)
class Schedule:
    """How the calibration samples are cut into one segment per level."""

    levels: int
    samples: int  # in the calibration data
    segment: int  # samples per level

    @classmethod
    def plan(cls, samples: int, levels: int, batch_size: int = 1) -> Schedule:
        """The fewest passes that give each level `MIN_SAMPLES_PER_LEVEL`, at most `MAX_SAMPLES_PER_LEVEL`
        samples each; rounded down to whole batches of ``batch_size`` when that keeps the minimum and
        three quarters of the samples (fewer samples per level measure the shifts less well)."""
        passes = min(MAX_PASSES, max(1, -(-MIN_SAMPLES_PER_LEVEL * levels // samples)))
        segment = max(1, min(MAX_SAMPLES_PER_LEVEL, passes * samples // levels))
        whole = segment // batch_size * batch_size
        if whole >= min(segment, MIN_SAMPLES_PER_LEVEL) and 4 * whole >= 3 * segment:
            segment = whole
        return cls(levels, samples, segment)

    @property
    def passes(self) -> int:
        """Passes over the data (the last one possibly partial)."""
        return -(-self.segment * self.levels // self.samples)


def _sample_stream(data, specs, batch_size, steps, samples):
    """Batches of the calibration data, cycled, for the passes of bias correction.

    In-memory arrays come in a fixed random order (the same samples as
    calibration used), every batch full; other sources in their own order,
    re-read each pass.
    """
    from qstrat.calibration.data import array_bundle, check_batch

    arrays = array_bundle(data, specs)
    if arrays is None:
        while True:
            yield from iterate_batches(data, specs, batch_size, steps)
    # Stream position t is sample order[t mod samples]: whole batches across the ends of passes.
    order, start = _order(samples), 0
    while True:
        rows = order[np.arange(start, start + batch_size) % samples]
        yield check_batch([a[rows] for a in arrays], specs, start // batch_size)
        start += batch_size


def _segments(stream, schedule: Schedule):
    """Per level, the list of batches (sliced where a segment ends) that make up its segment."""
    pending: list = []
    size = 0
    for level in range(schedule.levels):
        pieces = []
        need = schedule.segment
        while need > 0:
            if not pending:
                pending = next(stream)
                size = len(pending[0])
            take = min(need, size)
            pieces.append([a[:take] for a in pending])
            pending = [a[take:] for a in pending] if take < size else []
            size -= take
            need -= take
        yield level, pieces


class FloatSide:
    """Per target, the float output's channel sums over its level's segments, gathered during calibration.

    The quantized passes read the samples in a fixed random order (seed 0),
    cycled: stream position t is sample ``order[t mod samples]``, and level L
    owns positions [L * segment, (L + 1) * segment). Calibration reads the
    samples in their own order; `update` adds each sample's sums to the levels
    whose segments hold one of its appearances.
    """

    def __init__(self, refs: list[TensorRef], channels: list[int], levels: list[int], schedule: Schedule):
        self.refs = refs
        self.channels = channels
        self.levels = np.asarray(levels)
        self.schedule = schedule
        order = _order(schedule.samples)
        self.position = np.empty(schedule.samples, np.int64)
        self.position[order] = np.arange(schedule.samples)
        self.sums: list = [None] * len(levels)
        self.counts = np.zeros(len(levels))
        self.seen = 0

    def update(self, first: int, outputs: list) -> None:
        """``outputs``: `SampleChannelSums` of the targets (per-sample sums (batch, sum of C), counts (targets,))."""
        from qstrat.layers.probe import split_channels

        s = self.schedule
        sums, counts = split_channels(outputs[0], self.channels), np.asarray(outputs[1])
        n = len(outputs[0])
        positions = self.position[first : first + n]
        for k in range(s.passes):
            level_of = (k * s.samples + positions) // s.segment  # levels >= s.levels own nothing
            for j, level in enumerate(self.levels):
                rows = level_of == level
                if not rows.any():
                    continue
                total = np.sum(sums[j][rows], axis=0, dtype=np.float64)
                self.sums[j] = total if self.sums[j] is None else self.sums[j] + total
                self.counts[j] += float(np.count_nonzero(rows)) * float(counts[j])
        self.seen += n

    def means(self, first: int, count: int) -> list[np.ndarray]:
        if self.seen != self.schedule.samples:
            raise RuntimeError(
                f"bias correction planned for {self.schedule.samples} samples, calibration saw {self.seen}"
            )
        return [self.sums[j] / self.counts[j] for j in range(first, first + count)]


def _order(samples: int) -> np.ndarray:
    """The fixed random order in which bias correction reads in-memory samples."""
    return np.random.default_rng(0).permutation(samples)
