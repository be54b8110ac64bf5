"""`StatsTap`: a layer that reduces an activation to calibration statistics inside the model.

Calibration only needs each activation's range (min/max) or its aligned
histogram, not the activation itself. Computing them in the probe model's
graph means a few kilobytes cross from the backend to NumPy per batch instead
of every activation, and the binning runs in the backend's kernels.

The histogram is bit-identical to `qstrat.quantizers.stats.bin_counts`: the
exponent k is the smallest with max|x| < 2^k, read exactly from the float32
exponent bits (a few integer ops, so the probe graph stays small and quick to
trace), and the bin index floor(x * 2^(log2 N - k)) is exact because the
multiplier is a power of two.
"""

from __future__ import annotations

import math

import keras
from keras import ops

from qstrat.quantizers.stats import EMPTY_EXPONENT


def _exponent(amax):
    """Smallest integer k >= -126 with amax < 2^k (EMPTY_EXPONENT for 0), exact, from the float32 bits.

    A normal float32 with biased exponent field E lies in [2^(E-127), 2^(E-126)),
    so k = E - 126. Subnormals (E = 0) give -126, an upper bound that the
    caller's clamp to -114 makes irrelevant. (TensorFlow's CPU kernels flush
    subnormals to zero anyway, so a tensor of only subnormals reads as empty.)
    """
    field = ops.bitwise_and(ops.right_shift(ops.view(amax, "int32"), 23), 255)
    k = ops.cast(field - 126, "float32")
    return ops.where(amax > 0, k, ops.full_like(k, float(EMPTY_EXPONENT)))


def _pow2(e):
    """2.0 ** e for integer-valued float32 e in [-126, 127], exact, built from its bit pattern."""
    return ops.view(ops.left_shift(ops.cast(e, "int32") + 127, 23), "float32")


def _stats(xs, kinds, bins_per_side: int) -> list:
    """Per tensor, ``[min, max, size]`` (kind "range") or ``[counts, exponent, min, max]`` ("histogram").

    The exponent and bin-scale arithmetic runs once, on the vector of every
    histogram tensor's extremes, which keeps the probe graph small (its trace
    time grows with its op count).
    """
    n = bins_per_side
    xs = [ops.cast(x, "float32") for x in xs]
    los, his = [ops.min(x) for x in xs], [ops.max(x) for x in xs]
    out: list = [[lo, hi, ops.cast(ops.size(x), "int32")] for x, lo, hi in zip(xs, los, his, strict=True)]
    hist = [i for i, kind in enumerate(kinds) if kind == "histogram"]
    if not hist:
        return [t for o in out for t in o]
    amax = ops.maximum(-ops.stack([los[i] for i in hist]), ops.stack([his[i] for i in hist]))
    # Exponents below -114 would overflow the float32 multiplier; such tiny
    # tensors get coarser bins, reported with the exponent actually used.
    e = _exponent(amax)
    ks = ops.where(amax > 0, ops.maximum(e, -114.0), e)
    scales = ops.where(amax > 0, _pow2(float(math.log2(n)) - ks), ops.ones_like(ks))
    for j, i in enumerate(hist):
        # No clip needed: k comes from this tensor's own extremes, so every index is in [0, 2n).
        idx = ops.cast(ops.floor(ops.reshape(xs[i], (-1,)) * scales[j]), "int32") + n
        if keras.backend.backend() == "jax":
            # JAX's bincount needs a concrete length under jit; segment_sum takes a static one.
            counts = ops.segment_sum(ops.ones_like(idx), idx, num_segments=2 * n)
        else:  # bincount: as fast as NumPy's on TensorFlow, 7x faster than segment_sum there
            counts = ops.cast(ops.bincount(idx, minlength=2 * n), "int32")
        out[i] = [counts, ks[j], los[i], his[i]]
    return [t for o in out for t in o]


def _spec(kind: str, bins_per_side: int) -> list:
    scalar = keras.KerasTensor((), dtype="float32")
    if kind != "histogram":
        return [scalar, keras.KerasTensor((), dtype="float32"), keras.KerasTensor((), dtype="int32")]
    counts = keras.KerasTensor((2 * bins_per_side,), dtype="int32")
    return [counts, keras.KerasTensor((), dtype="float32"), scalar, keras.KerasTensor((), dtype="float32")]


class StatsTap(keras.layers.Layer):
    """Reduce a tensor to ``[min, max, size]`` or to ``[counts, exponent, min, max]`` (kind "histogram")."""

    def __init__(self, kind: str, bins_per_side: int = 8192, **kwargs):
        super().__init__(**kwargs)
        self.kind = kind
        self.bins_per_side = bins_per_side

    def call(self, x):
        return _stats([x], [self.kind], self.bins_per_side)

    def compute_output_spec(self, x):
        return _spec(self.kind, self.bins_per_side)

    def get_config(self):
        return {**super().get_config(), "kind": self.kind, "bins_per_side": self.bins_per_side}


class StatsTaps(keras.layers.Layer):
    """`StatsTap` for many tensors at once: their outputs, concatenated in order, from one small graph."""

    def __init__(self, kinds: list[str], bins_per_side: int = 8192, **kwargs):
        super().__init__(**kwargs)
        self.kinds = list(kinds)
        self.bins_per_side = bins_per_side

    def call(self, xs):
        return _stats(list(xs), self.kinds, self.bins_per_side)

    def compute_output_spec(self, xs):
        return [t for kind in self.kinds for t in _spec(kind, self.bins_per_side)]

    def get_config(self):
        return {**super().get_config(), "kinds": self.kinds, "bins_per_side": self.bins_per_side}


class ChannelSums(keras.layers.Layer):
    """Reduce a tensor to its per-channel sums (last axis) and the element count per channel."""

    def call(self, x):
        x = ops.cast(x, "float32")
        axes = tuple(range(len(x.shape) - 1))
        count = ops.cast(ops.size(x) // ops.shape(x)[-1], "float32")
        return [ops.sum(x, axis=axes), count]

    def compute_output_spec(self, x):
        return [keras.KerasTensor((x.shape[-1],), dtype="float32"), keras.KerasTensor((), dtype="float32")]


class SampleChannelSums(keras.layers.Layer):
    """Reduce a tensor to per-sample channel sums (batch, C) and the element count per channel per sample."""

    def call(self, x):
        x = ops.cast(x, "float32")
        axes = tuple(range(1, len(x.shape) - 1))
        count = ops.cast(ops.size(x) // (ops.shape(x)[0] * ops.shape(x)[-1]), "float32")
        return [ops.sum(x, axis=axes) if axes else x, count]

    def compute_output_spec(self, x):
        return [keras.KerasTensor((x.shape[0], x.shape[-1]), dtype="float32"), keras.KerasTensor((), dtype="float32")]
