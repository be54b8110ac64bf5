"""What analysis sums over the batches: SQNR, MSE and cosine moments, and each quantizer's range against its values.

Every sum is of float32 products, each rounded once (relative 2^-24), accumulated in float64, so a total
is good to about 2^-24 relative whatever the count, without a float64 copy of every tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from qstrat.arrays import to_numpy
from qstrat.inspect.units import Quant

SAMPLE_PER_BATCH = 2048  # activation values drawn (with replacement) per batch and quantizer, for the histograms
SAMPLE_CAP = 32768
HIST_BINS = 64


def sqnr_db(signal: float, noise: float) -> float:
    """10·log10(signal / noise) in dB; inf when there is no noise."""
    if noise <= 0.0:
        return math.inf
    if signal <= 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


@dataclass
class RangeStats:
    """One quantizer's chosen range against what it saw."""

    target: str
    kind: str
    bit_width: int | None
    grid_min: float  # the lowest value the quantizer gives (over channels)
    grid_max: float
    observed_min: float
    observed_max: float
    clipped: float  # fraction of values beyond the grid's ends
    hist_counts: list[int] = field(default_factory=list)
    hist_edges: list[float] = field(default_factory=list)


def dot(a: np.ndarray, b: np.ndarray) -> float:
    """sum(a * b): the products in the arrays' type (each rounded once, relative 2^-24 in float32), summed in
    float64, so the total is good to about 2^-24 relative whatever the count."""
    return float(np.add.reduce(np.multiply(a, b).ravel(), dtype=np.float64))


def sse(q: np.ndarray, f: np.ndarray) -> float:
    """The sum of squared differences, as every figure here computes it."""
    e = np.subtract(q, f)
    return dot(e, e)


class Moments:
    """Sums for SQNR, MSE and cosine of quantized against float tensors (`dot`)."""

    def __init__(self):
        self.ff = self.ee = self.fq = self.qq = 0.0
        self.n = 0

    def add(self, f: np.ndarray, q: np.ndarray) -> None:
        self.ff += dot(f, f)
        self.ee += sse(q, f)
        self.fq += dot(f, q)
        self.qq += dot(q, q)
        self.n += f.size

    def sqnr(self) -> float:
        return sqnr_db(self.ff, self.ee)

    def mse(self) -> float:
        return self.ee / max(self.n, 1)

    def cosine(self) -> float:
        den = math.sqrt(self.ff * self.qq)
        return self.fq / den if den > 0 else (1.0 if self.ee == 0 else 0.0)


class Seen:
    """An activation quantizer's observed extremes, clipped count and value sample."""

    def __init__(self, quant: Quant, rng: np.random.Generator):
        self.quant, self.rng = quant, rng
        self.lo = self.hi = None
        self.min, self.max = math.inf, -math.inf
        self.clipped = self.count = 0
        self.sample: list[np.ndarray] = []
        self.kept = 0

    def add(self, x: np.ndarray) -> None:
        if self.lo is None:
            self.lo, self.hi = self.quant.grid_ends(x[:1])
        self.min, self.max = min(self.min, float(x.min())), max(self.max, float(x.max()))
        self.clipped += int(np.count_nonzero((x < self.lo) | (x > self.hi)))
        self.count += x.size
        if self.kept < SAMPLE_CAP:
            flat = x.ravel()
            take = min(flat.size, SAMPLE_PER_BATCH, SAMPLE_CAP - self.kept)
            self.sample.append(flat[self.rng.integers(0, flat.size, take)])
            self.kept += take

    def stats(self) -> RangeStats:
        values = np.concatenate(self.sample) if self.sample else np.zeros(0, np.float32)
        return range_stats(self.quant, self.lo, self.hi, self.min, self.max, self.clipped / max(self.count, 1), values)


def range_stats(quant: Quant, lo, hi, vmin, vmax, clipped, values) -> RangeStats:
    gmin, gmax = float(np.min(lo)), float(np.max(hi))
    span = (min(vmin, gmin), max(vmax, gmax))
    if not span[1] > span[0]:
        span = (span[0] - 0.5, span[0] + 0.5)
    counts, edges = np.histogram(values, bins=HIST_BINS, range=span)
    return RangeStats(
        quant.target,
        quant.kind,
        quant.bit_width,
        gmin,
        gmax,
        float(vmin),
        float(vmax),
        float(clipped),
        counts.tolist(),
        [float(e) for e in edges],
    )


def weight_stats(quant: Quant) -> RangeStats:

    layer = quant.layer.layer
    target = getattr(layer, "target_value", None)
    w = to_numpy(target(quant.attr) if target else getattr(layer, quant.attr))
    lo, hi = quant.grid_ends(w)
    clipped = float(np.mean((w < lo) | (w > hi))) if w.size else 0.0
    return range_stats(quant, lo, hi, float(w.min()), float(w.max()), clipped, w.ravel())
