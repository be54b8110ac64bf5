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
from qstrat.quantizers import batch_ranges, float_formats, ranges
from qstrat.quantizers import fake_quant as fq
from qstrat.quantizers import reference as ref
from qstrat.quantizers.base import Quantizer, StateSpec, _check_policy, _to_numpy
from qstrat.quantizers.framework_op import framework_fake_quant
from qstrat.quantizers.grid import DataFormat, Method, float32_inside
from qstrat.quantizers.params import COMMON_PARAMS
from qstrat.quantizers.registry import register_quantizer
from qstrat.quantizers.stats import Histogram, ObserverSpec, RangeStats, histogram_of_rows, move_axis_last


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

    def _scale_zp(self, m, lo, hi):
        """Scale and zero point of a range, in float32 with the array module ``m`` (keras.ops or NumPy).

        The same formulas as `ranges.symmetric_scale` / `ranges.asymmetric_scale_zp`,
        with divisions by constants written as products with their float32
        reciprocals, which every backend computes the same way.
        """
        p, g = self.params, self.grid
        f32 = np.float32
        lo, hi = m.minimum(lo, f32(0.0)), m.maximum(hi, f32(0.0))
        if p.symmetry:
            s = m.zeros_like(hi)
            if g.qmin < 0:
                s = m.maximum(s, lo * f32(1.0 / g.qmin))
            if g.qmax > 0:
                s = m.maximum(s, hi * f32(1.0 / g.qmax))
            s = m.maximum(s, f32(p.epsilon))
            return s, m.zeros_like(s)
        s = m.maximum((hi - lo) * f32(1.0 / (g.qmax - g.qmin)), f32(p.epsilon))
        zlo, zhi = float32_inside(g)  # the float32 grid ends themselves up to 24 bits; inside the grid above
        zp = m.clip(m.round(f32(g.qmin) - lo / s), f32(zlo), f32(zhi))
        return s, zp


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

    In training (``training=True``: ``model.fit``), method No_OF keeps running
    extremes: the range the state holds, widened to the batch's min and max
    (per channel when per_channel), gives the new scale and zero point, which
    are written to the state and quantize the batch; a batch inside that range
    leaves the state as it is (`batch_ranges.widened_scale_zp`).
    An uncalibrated state (scale 1, zero point 0, its initial values, as
    ``get_qat_model(init_quant=False)`` leaves activations) holds no range: the
    first batch's range is used alone. So does a calibrated state that happens
    to hold exactly those values. The other methods, the float formats and
    use_framework_quantizer keep their state frozen in training. Inference
    (``training=False``) reads the state. `reference_train` is the NumPy twin
    of a training step.

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
        if training and p.method == Method.NO_OF:
            return self._train(x, state)
        return super().__call__(x, state, training)

    def _train(self, x, state):
        """Widen the state's range to the batch's extremes, write it, quantize with it."""
        batch_ranges.require_variables(self, state, "widens the range in the state to each batch's")
        s, zp = batch_ranges.fs_state(self, x, state)
        state["scale"].assign(s)
        state["zero_point"].assign(zp)
        g = self.grid
        return fq.affine_fake_quant(x, s, zp, g.qmin, g.qmax, self.params.round_mode, self.axis)

    def _framework(self, x, state):
        g, p = self.grid, self.params
        return framework_fake_quant(x, state, g.qmin, g.qmax, self.axis, p.bit_width, p.narrow_range, p.round_mode)

    @property
    def exact_twin(self) -> bool:
        # fake_quant_test: the affine and float-format kernels against their twins; the framework op is the
        # twin's grid within one level only (test_framework_quantizer_agrees_with_half_up_kernel).
        return not self.params.use_framework_quantizer

    def reference(self, x, state) -> np.ndarray:
        p = self.params
        if p.data_format.is_float:
            return _FLOAT_FORMATS[p.data_format][1](x, p)
        return super().reference(x, state)

    def reference_train(self, x, state) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The NumPy twin of ``__call__(x, state, training=True)``: (output, updated state).

        No_OF: float32 throughout, the same operations in the same order as the
        keras version; the other cases: ``state`` unchanged. ``state`` is not modified.
        """
        p = self.params
        new = {k: np.array(v, np.float32) for k, v in state.items()}
        if p.method == Method.NO_OF and not (p.data_format.is_float or p.use_framework_quantizer):
            rows = move_axis_last(np.asarray(x, np.float32), self.axis)
            lo, hi = rows.min(axis=1), rows.max(axis=1)
            if self.axis is None:
                lo, hi = lo[0], hi[0]
            s, zp = batch_ranges.widened_scale_zp(self, _NumPyOps, new["scale"], new["zero_point"], lo, hi)
            new = {"scale": np.asarray(s, np.float32), "zero_point": np.asarray(zp, np.float32)}
        return self.reference(x, new), new


# data_format -> (keras.ops kernel, NumPy twin), each called as f(x, params).
_FLOAT_FORMATS = {
    DataFormat.FP16: (lambda x, p: float_formats.fp16_fake_quant(x), lambda x, p: ref.fp16_np(x)),
    DataFormat.BF16: (lambda x, p: float_formats.bf16_fake_quant(x), lambda x, p: ref.bf16_np(x)),
    DataFormat.BFP16: (
        lambda x, p: float_formats.bfp16_fake_quant(x, p.channel_axis, p.round_mode),
        lambda x, p: ref.bfp16_np(x, p.channel_axis, p.round_mode),
    ),
}


@register_quantizer
class MAFSQuantizer(_FloatScale):
    """Float-scale quantizer whose range is a moving average over batches.

    Why: a single batch's min/max jitters from batch to batch; averaging the
    ranges gives a range that follows the data without jumping with outliers.
    This is the reference tool's MAFS: ``min``/``max`` are exponential moving
    averages with zero-debiasing (TensorFlow's
    ``assign_moving_average(zero_debias=True)``), then float-scale fake quant.

    The moving average runs over calibration batches and, with
    ``training=True`` (``model.fit``), over every training batch; with
    ``training=False`` the state is read only. The state carries the average:

    - ``biased_min``, ``biased_max``: the accumulators b_n, per channel when per_channel;
    - ``steps``: n, the number of batches averaged (calibration's count carries over);
    - ``scale``, ``zero_point``: from the debiased range b_n / (1 - d^n), as FS
      computes them; inference reads only these.

    In calibration each batch's range is by ``method`` (min/max for No_OF; a
    histogram search for the others), averaged in float64. In training it is
    the batch's min/max (as in the reference tool), averaged in float32 as
    ``b <- b - (b - r) * (1 - d)`` (TensorFlow's form: 1 - d is held to float32
    precision even for d near 1), debiased by ``-expm1(n * log(d))`` (no
    cancellation for small n), with scale and zero point derived in float32.
    `reference_train` is the NumPy twin of a training step.

    Example:
        >>> fq = FakeQuant({"type": "MAFSQuantizer", "params": {"ema_decay": 0.99}})  # qstrat.layers
        >>> y = fq(x, training=True)   # as in model.fit: updates the average, quantizes with it
        >>> y = fq(x)                  # inference: the frozen range
    """

    accepted = COMMON_PARAMS + ("ema_decay",)

    def state_spec(self, shape) -> dict[str, StateSpec]:
        ch = self.channels(shape)
        spec = super().state_spec(shape)
        spec.update({k: StateSpec(ch, 0.0) for k in _EMA_KEYS})
        # float32 counts exactly to 2^24 batches; by then d^n is 0 for any usable decay.
        spec["steps"] = StateSpec((), 0.0)
        return spec

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

    # ---- calibration ------------------------------------------------------------------

    def state_from_tensor(self, tensor) -> dict[str, np.ndarray]:
        lo, hi = self._range_from_tensor(tensor)
        return {**self.state_from_range(lo, hi), **self._one_batch(lo, hi)}

    def state_from_stats(self, stats) -> dict[str, np.ndarray]:
        state = super().state_from_stats(stats)  # scale and zero point of the debiased range, as before
        if hasattr(stats, "steps"):
            # The ema observer's MovingAverageStats (qstrat.calibration.observers): continue its average.
            return {
                **state,
                "biased_min": np.asarray(stats.biased_min, np.float32),
                "biased_max": np.asarray(stats.biased_max, np.float32),
                "steps": np.asarray(stats.steps, np.float32),
            }
        if isinstance(stats, RangeStats):
            return {**state, **self._one_batch(stats.min, stats.max)}
        return {**state, **self._one_batch(*self._range_from_histogram(stats))}

    def _one_batch(self, lo, hi) -> dict[str, np.ndarray]:
        """The accumulators of an average of one batch whose range is (lo, hi)."""
        omd = 1.0 - self.params.ema_decay
        return {
            "biased_min": np.asarray(omd * np.asarray(lo, np.float64), np.float32),
            "biased_max": np.asarray(omd * np.asarray(hi, np.float64), np.float32),
            "steps": np.asarray(1.0, np.float32),
        }

    # ---- training -----------------------------------------------------------------------

    def __call__(self, x, state: Mapping[str, Any], training: bool = False):
        if not training:
            return super().__call__(x, state, training)
        missing = [k for k in (*_EMA_KEYS, "steps", "scale", "zero_point") if not hasattr(state[k], "assign")]
        if missing:
            raise UnsupportedError(
                f"{self.type_name}: training=True updates the moving average in the state, but "
                f"{', '.join(missing)} are not variables. Call it with a layer's state "
                "(FakeQuant, QuantizeWrapper), or with training=False."
            )
        ndim = len(x.shape)
        batch = ops.cast(ops.stop_gradient(x), "float32")
        if self.axis is None:
            lo, hi = ops.min(batch), ops.max(batch)
        else:
            others = tuple(i for i in range(ndim) if i != self.axis % ndim)
            lo, hi = ops.min(batch, axis=others), ops.max(batch, axis=others)
        # Under tf.distribute, the whole batch's extremes on every replica, as on one device.
        lo, hi = batch_ranges.across_replicas(lo, "min"), batch_ranges.across_replicas(hi, "max")
        omd, log_d = (ops.convert_to_tensor(c) for c in self._ema_constants())
        b_lo = ops.convert_to_tensor(state["biased_min"])
        b_hi = ops.convert_to_tensor(state["biased_max"])
        b_lo = b_lo - (b_lo - lo) * omd
        b_hi = b_hi - (b_hi - hi) * omd
        n = ops.convert_to_tensor(state["steps"]) + ops.convert_to_tensor(np.float32(1.0))
        w = -ops.expm1(n * log_d)
        s, zp = self._scale_zp(ops, b_lo / w, b_hi / w)
        for key, value in (("biased_min", b_lo), ("biased_max", b_hi), ("steps", n), ("scale", s), ("zero_point", zp)):
            state[key].assign(value)
        g = self.grid
        return fq.affine_fake_quant(x, s, zp, g.qmin, g.qmax, self.params.round_mode, self.axis)

    def _ema_constants(self):
        """(1 - d, log d) as float32: the effective decay is exactly 1 - (1 - d) of the float32 1 - d."""
        omd = np.float32(1.0 - self.params.ema_decay)
        return omd, np.float32(np.log1p(-np.float64(omd)))

    def reference_train(self, x, state) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The NumPy twin of ``__call__(x, state, training=True)``: (output, updated state).

        Float32 throughout, the same operations in the same order as the keras
        version; ``state`` is not modified.
        """
        x = np.asarray(x)
        rows = move_axis_last(x.astype(np.float32), self.axis)
        lo, hi = rows.min(axis=1), rows.max(axis=1)
        if self.axis is None:
            lo, hi = lo[0], hi[0]
        omd, log_d = self._ema_constants()
        b_lo, b_hi = (np.asarray(state[k], np.float32) for k in _EMA_KEYS)
        b_lo = np.float32(b_lo - (b_lo - lo) * omd)
        b_hi = np.float32(b_hi - (b_hi - hi) * omd)
        n = np.float32(np.float32(state["steps"]) + np.float32(1.0))
        w = -np.expm1(n * log_d)
        s, zp = self._scale_zp(_NumPyOps, b_lo / w, b_hi / w)
        new = {"scale": s, "zero_point": zp, "biased_min": b_lo, "biased_max": b_hi, "steps": n}
        new = {k: np.asarray(v, np.float32) for k, v in new.items()}
        return self.reference(x, new), new

    def moving_range(self, state) -> tuple[np.ndarray, np.ndarray] | None:
        """The debiased range (min, max) the state holds, in float32 as training computes it; None before any batch."""
        n = np.float32(_numpy(state["steps"]))
        if n == 0:
            return None
        w = -np.expm1(n * self._ema_constants()[1])
        return tuple(np.asarray(_numpy(state[k]), np.float32) / w for k in _EMA_KEYS)

    def describe(self, state: Mapping[str, Any]) -> dict[str, Any]:
        info = super().describe(state)
        rng = self.moving_range(state)
        if rng is not None:
            info["min"], info["max"] = rng[0].tolist(), rng[1].tolist()
        return info


# The moving average's biased accumulators, for the low and the high end of the range.
_EMA_KEYS = ("biased_min", "biased_max")


class _NumPyOps:
    """The keras.ops names `_FloatScale._scale_zp` and `batch_ranges.widened_scale_zp` use, as float32 NumPy."""

    minimum = staticmethod(np.minimum)
    maximum = staticmethod(np.maximum)
    zeros_like = staticmethod(np.zeros_like)
    clip = staticmethod(np.clip)
    round = staticmethod(np.rint)
    where = staticmethod(np.where)
    logical_and = staticmethod(np.logical_and)
    logical_not = staticmethod(np.logical_not)


def _numpy(v) -> np.ndarray:
    return v if isinstance(v, np.ndarray) else np.asarray(_to_numpy(v))
