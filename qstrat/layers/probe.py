"""`StatsTap`: a layer that reduces an activation to calibration statistics inside the model.

Calibration only needs each activation's range (min/max) or its aligned
histogram, not the activation itself. Computing them in the probe model's
graph means a few kilobytes cross from the backend to NumPy per batch instead
of every activation, and the binning runs in the backend's kernels.

The histogram is bit-identical to `qstrat.quantizers.stats.bin_counts`: the
exponent k is the smallest with max|x| < 2^k, found exactly (log2, then
corrected with exact powers of two), and the bin index floor(x * 2^(log2 N - k))
is exact because the multiplier is a power of two.
"""

from __future__ import annotations

import math

import keras
from keras import ops

from qstrat.quantizers.stats import EMPTY_EXPONENT


def _exponent(amax):
    """Smallest integer k with amax < 2^k (EMPTY_EXPONENT for 0), exact."""
    safe = ops.where(amax > 0, amax, ops.ones_like(amax))
    k = ops.floor(ops.log2(safe)) + 1.0
    k = ops.where(ops.power(2.0, k - 1.0) > safe, k - 1.0, k)
    k = ops.where(ops.power(2.0, k) <= safe, k + 1.0, k)
    return ops.where(amax > 0, k, ops.full_like(k, float(EMPTY_EXPONENT)))


class StatsTap(keras.layers.Layer):
    """Reduce a tensor to ``[min, max, size]`` or to ``[counts, exponent, min, max]`` (kind "histogram")."""

    def __init__(self, kind: str, bins_per_side: int = 8192, **kwargs):
        super().__init__(**kwargs)
        self.kind = kind
        self.bins_per_side = bins_per_side

    def call(self, x):
        x = ops.cast(x, "float32")
        lo, hi = ops.min(x), ops.max(x)
        if self.kind != "histogram":
            return [lo, hi, ops.cast(ops.size(x), "int32")]
        n = self.bins_per_side
        amax = ops.maximum(-lo, hi)
        # Exponents below -114 would overflow the float32 multiplier; such tiny
        # tensors get coarser bins, reported with the exponent actually used.
        k = ops.where(amax > 0, ops.maximum(_exponent(amax), -114.0), _exponent(amax))
        scale = ops.where(amax > 0, ops.power(2.0, float(math.log2(n)) - k), ops.ones_like(k))
        # Beyond float32's range the product would overflow or vanish; such a
        # tensor is left to the NumPy path (the caller checks the exponent).
        # No clip needed: k comes from this tensor's own extremes, so every index is in [0, 2n).
        idx = ops.cast(ops.floor(ops.reshape(x, (-1,)) * scale), "int32") + n
        if keras.backend.backend() == "jax":
            # JAX's bincount needs a concrete length under jit; segment_sum takes a static one.
            counts = ops.segment_sum(ops.ones_like(idx), idx, num_segments=2 * n)
        else:  # bincount: as fast as NumPy's on TensorFlow, 7x faster than segment_sum there
            counts = ops.cast(ops.bincount(idx, minlength=2 * n), "int32")
        return [counts, k, lo, hi]

    def compute_output_spec(self, x):
        scalar = keras.KerasTensor((), dtype="float32")
        if self.kind != "histogram":
            return [scalar, keras.KerasTensor((), dtype="float32"), keras.KerasTensor((), dtype="int32")]
        counts = keras.KerasTensor((2 * self.bins_per_side,), dtype="int32")
        return [counts, keras.KerasTensor((), dtype="float32"), scalar, keras.KerasTensor((), dtype="float32")]

    def get_config(self):
        return {**super().get_config(), "kind": self.kind, "bins_per_side": self.bins_per_side}
