"""Float-scale quantizers: `FSQuantizer` and `MAFSQuantizer`.

y = (clip(R(x / scale) + zp, qmin, qmax) - zp) * scale, with a float scale and,
when asymmetric, an integer zero point. Symmetric grids take the smallest
scale that holds the range with zp = 0 (max(lo / qmin, hi / qmax)); asymmetric
grids map [min(lo, 0), max(hi, 0)] onto the whole grid.

Unlike the reference tool, FS ``Min_MSE`` really searches clipping thresholds
(per channel when per_channel) instead of silently using min/max.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from keras import ops

from qstrat.errors import UnsupportedError
from qstrat.quantizers import fake_quant as fq
from qstrat.quantizers import ranges
from qstrat.quantizers import reference as ref
from qstrat.quantizers.base import Quantizer, StateSpec, _check_policy, register_quantizer
from qstrat.quantizers.grid import DataFormat, Method
from qstrat.quantizers.params import COMMON_PARAMS
from qstrat.quantizers.stats import Histogram, ObserverSpec, RangeStats, histogram_of_rows


class _FloatScale(Quantizer):
    """Scale/zero-point state and range logic shared by FS and MAFS."""

    def state_spec(self, shape) -> dict[str, StateSpec]:
        if self.params.data_format.is_float:
            return {}
        ch = self.channels(shape)
        return {"scale": StateSpec(ch, 1.0), "zero_point": StateSpec(ch, 0.0)}

    def state_from_range(self, lo, hi) -> dict[str, np.ndarray]:
        """Scale and zero point for a clipping range (per channel when arrays)."""
        p = self.params
        if p.symmetry:
            s = ranges.symmetric_scale(lo, hi, self.grid, p.epsilon)
            zp = np.zeros_like(s)
        else:
            s, zp = ranges.asymmetric_scale_zp(lo, hi, self.grid, p.epsilon)
        return {"scale": np.asarray(s, np.float32), "zero_point": np.asarray(zp, np.float32)}

    def _range_from_tensor(self, tensor):
        p = self.params
        rows, lo, hi = self._ranges_from_tensor(tensor)
        if p.method == Method.MIN_MSE:
            lo, hi = ranges.fs_mse_range_tensor(rows, lo, hi, self.grid, p.symmetry, p.round_mode, p.epsilon)
        if self.axis is None:
            return lo[0], hi[0]
        return lo, hi

    def _range_from_histogram(self, hist: Histogram):
        p = self.params
        if p.method != Method.MIN_MSE:
            lo, hi = self._ranges_from_histogram(hist)
        else:
            pairs = [
                ranges.fs_mse_range_hist(h, self.grid, p.symmetry, p.round_mode, p.epsilon) for h in hist.channels()
            ]
            lo, hi = np.array([a for a, _ in pairs]), np.array([b for _, b in pairs])
        return self._shape_like_stats(lo, hist.min), self._shape_like_stats(hi, hist.min)

    def state_from_tensor(self, tensor) -> dict[str, np.ndarray]:
        if self.params.data_format.is_float:
            return {}
        return self.state_from_range(*self._range_from_tensor(tensor))

    def state_from_stats(self, stats) -> dict[str, np.ndarray]:
        if self.params.data_format.is_float:
            return {}
        if isinstance(stats, RangeStats):
            return self.state_from_range(stats.min, stats.max)
        if isinstance(stats, Histogram):
            return self.state_from_range(*self._range_from_histogram(stats))
        raise UnsupportedError(f"{self.type_name}: cannot use statistics of type {type(stats).__name__}.")

    def __call__(self, x, state: Mapping[str, Any], training: bool = False):
        p = self.params
        g = self.grid
        s = fq.state_value(state["scale"])
        zp = fq.state_value(state["zero_point"])
        return fq.affine_fake_quant(x, s, zp, g.qmin, g.qmax, p.round_mode, self.axis)

    def reference(self, x, state) -> np.ndarray:
        x = np.asarray(x)
        axis = None if self.axis is None else self.axis % x.ndim
        return ref.affine_fake_quant_np(x, state["scale"], state["zero_point"], self.grid, self.params.round_mode, axis)


@register_quantizer
class FSQuantizer(_FloatScale):
    """Float-scale quantizer for targets with floating-point rescaling.

    Args (the seed's, JSON spelling): bit_width, data_format ("INT", "UINT",
        "BFP16", "FP16", "BF16"), method, method_percentile, round_mode, symmetry,
        per_channel, channel_axis, epsilon, unsigned, narrow_range,
        use_framework_quantizer (run Keras' ``fake_quant_with_min_max_vars``, which
        becomes a TensorFlow FakeQuant op that converters recognise; HALF_UP only).

    The float formats need no calibration: FP16 and BF16 round like an IEEE
    conversion (saturating), BFP16 shares one exponent per 8 values along
    channel_axis.

    Example:
        >>> q = FSQuantizer(bit_width=8, symmetry=False, per_channel=False, method="Min_MSE")
    """

    accepted = COMMON_PARAMS + ("use_framework_quantizer",)
    defaults = {"symmetry": False, "per_channel": True}
    data_formats = tuple(DataFormat)

    def __call__(self, x, state: Mapping[str, Any], training: bool = False):
        p = self.params
        if p.data_format.is_float:
            return _FLOAT_FORMATS[p.data_format][0](x, p)
        if p.use_framework_quantizer:
            return self._framework(x, state)
        return super().__call__(x, state, training)

    def _framework(self, x, state):
        import keras

        g = self.grid
        s = fq.state_value(state["scale"])
        zp = fq.state_value(state["zero_point"])
        lo, hi = (g.qmin - zp) * s, (g.qmax - zp) * s
        axis = self.axis
        if axis is not None and axis % len(x.shape) != len(x.shape) - 1:
            # Keras' torch and JAX versions of this op only broadcast over the last axis.
            moved = ops.moveaxis(x, axis, -1)
            y = keras.quantizers.fake_quant_with_min_max_vars(
                moved, lo, hi, num_bits=self.params.bit_width, narrow_range=self.params.narrow_range, axis=-1
            )
            return ops.moveaxis(y, -1, axis)
        return keras.quantizers.fake_quant_with_min_max_vars(
            x, lo, hi, num_bits=self.params.bit_width, narrow_range=self.params.narrow_range, axis=axis
        )

    def reference(self, x, state) -> np.ndarray:
        p = self.params
        if p.data_format.is_float:
            return _FLOAT_FORMATS[p.data_format][1](x, p)
        return super().reference(x, state)


# data_format -> (keras.ops kernel, NumPy twin), each called as f(x, params).
_FLOAT_FORMATS = {
    DataFormat.FP16: (lambda x, p: fq.fp16_fake_quant(x), lambda x, p: ref.fp16_np(x)),
    DataFormat.BF16: (lambda x, p: fq.bf16_fake_quant(x), lambda x, p: ref.bf16_np(x)),
    DataFormat.BFP16: (
        lambda x, p: fq.bfp16_fake_quant(x, p.channel_axis, p.round_mode),
        lambda x, p: ref.bfp16_np(x, p.channel_axis, p.round_mode),
    ),
}


@register_quantizer
class MAFSQuantizer(_FloatScale):
    """Float-scale quantizer whose range is a moving average over batches.

    During calibration each batch gives a range by ``method`` (min/max for
    No_OF; a histogram search for the others) and the range is an exponential
    moving average of those, with decay ``ema_decay`` and zero-debiasing.
    """

    accepted = COMMON_PARAMS + ("ema_decay",)

    def observer_spec(self, policy: str | None = None) -> ObserverSpec | None:
        _check_policy(policy)
        p = self.params
        estimate = None
        if p.method != Method.NO_OF:

            def estimate(rows):
                hist = histogram_of_rows(rows)
                lo, hi = self._range_from_histogram(hist)
                return np.atleast_1d(lo), np.atleast_1d(hi)

        return ObserverSpec("ema", self.axis, decay=p.ema_decay, estimate=estimate)
