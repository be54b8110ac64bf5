"""Power-of-2 scale quantizers: `Pof2SQuantizer` (PTQ) and `TQTQuantizer` (trained thresholds).

The scale is 2^-pos for an integer quantize position ``pos``, so the DPU can
rescale with shifts. Both quantizers pick positions the same way:

- No_OF: pos = floor(-log2(max(lo / qmin, hi / qmax))), the largest position
  whose grid holds the observed range;
- Min_MSE: the best of pos0 .. pos0 + 4 by squared error (per channel when
  per_channel, unlike the reference tool, which used one offset for all);
- Min_KL / Percentile: the No_OF position of the clipped range.

Activations are calibrated with one of two policies: "global" (statistics
over all batches, then one search) or "batch_vote" (a position per batch,
the most common wins: the reference tool's behaviour).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np

from qstrat.errors import ConfigError, UnsupportedError
from qstrat.quantizers import batch_ranges, ranges
from qstrat.quantizers import fake_quant as fq
from qstrat.quantizers import reference as ref
from qstrat.quantizers.base import (
    DEFAULT_POSITION_POLICY,
    Quantizer,
    StateSpec,
    _check_policy,
)
from qstrat.quantizers.grid import Method
from qstrat.quantizers.params import COMMON_PARAMS
from qstrat.quantizers.registry import register_quantizer
from qstrat.quantizers.stats import Histogram, ObserverSpec, RangeStats, histogram_of_rows, move_axis_last


class _Pof2Positions(Quantizer):
    """Position selection shared by the power-of-2 quantizers."""

    @property
    def _pos_range(self):
        return (self.params.min_quantize_pos, self.params.max_quantize_pos)

    def _positions_from_tensor(self, tensor):
        """(pos, zero_point) per channel for a raw tensor (weights, or one batch)."""
        p = self.params
        rows, lo, hi = self._ranges_from_tensor(tensor)
        if p.method == Method.MIN_MSE:
            pos = ranges.pof2_mse_pos_tensor(
                rows, lo, hi, self.grid, p.symmetry, p.round_mode, p.epsilon, self._pos_range
            )
        else:
            pos = ranges.nonoverflow_pos(lo, hi, self.grid, p.symmetry, p.epsilon, self._pos_range)
        zp = ranges.pof2_zero_point(lo, pos, self.grid, p.symmetry, hi)
        shape_like = 0.0 if self.axis is None else lo
        return self._shape_like_stats(pos, shape_like), self._shape_like_stats(zp, shape_like)

    def _positions_from_stats(self, stats):
        p = self.params
        if isinstance(stats, np.ndarray) and np.issubdtype(stats.dtype, np.integer):  # votes
            return stats.astype(np.int64), np.zeros(stats.shape)
        if isinstance(stats, RangeStats):
            lo, hi = np.asarray(stats.min, np.float64), np.asarray(stats.max, np.float64)
            pos = ranges.nonoverflow_pos(lo, hi, self.grid, p.symmetry, p.epsilon, self._pos_range)
            return pos, ranges.pof2_zero_point(lo, pos, self.grid, p.symmetry, hi)
        if isinstance(stats, Histogram):
            if p.method == Method.MIN_MSE:
                pos = np.array(
                    [
                        ranges.pof2_mse_pos_hist(h, self.grid, p.symmetry, p.round_mode, p.epsilon, self._pos_range)
                        for h in stats.channels()
                    ]
                )
                lo, hi = np.atleast_1d(stats.min), np.atleast_1d(stats.max)
            else:
                lo, hi = self._ranges_from_histogram(stats)
                pos = ranges.nonoverflow_pos(lo, hi, self.grid, p.symmetry, p.epsilon, self._pos_range)
            zp = ranges.pof2_zero_point(lo, pos, self.grid, p.symmetry, hi)
            return self._shape_like_stats(pos, stats.min), self._shape_like_stats(zp, stats.min)
        raise UnsupportedError(f"{self.type_name}: cannot use statistics of type {type(stats).__name__}.")

    def _batch_position(self, batch) -> np.ndarray:
        """One batch's position for the batch_vote policy.

        Min_MSE searches the batch's own histogram (like the global policy does for
        all batches), not the raw values: the same choice in a tenth of the time.
        """
        if self.params.method != Method.MIN_MSE:
            return self._positions_from_tensor(batch)[0]
        rows = move_axis_last(np.asarray(batch), self.axis)
        return self._positions_from_stats(histogram_of_rows(rows))[0].reshape(-1)

    def observer_spec(self, policy: str | None = None) -> ObserverSpec | None:
        _check_policy(policy)
        policy = policy or DEFAULT_POSITION_POLICY
        if policy == "batch_vote":
            if not self.params.symmetry:
                raise UnsupportedError(
                    f"{self.type_name}: the batch_vote policy picks positions only; an asymmetric "
                    "grid also needs a zero point. Use the global policy."
                )
            return ObserverSpec("votes", self.axis, estimate=self._batch_position)
        spec = super().observer_spec(policy)
        # A position is one of a few power-of-2 grids: a share of a large calibration set picks it as all does.
        return replace(spec, share=True) if spec is not None and spec.kind == "histogram" else spec


@register_quantizer
class Pof2SQuantizer(_Pof2Positions):
    """Power-of-2 scale quantizer: y = clip(R(x * 2^pos) + zp, qmin, qmax) * 2^-pos (zp = 0 if symmetric).

    Why: the DPU rescales with bit shifts, so every scale must be a power of two;
    this quantizer simulates it bit for bit.

    In training (``training=True``: ``model.fit``), methods No_OF and Min_MSE take
    each batch's own position, as the reference tool does, for activations and
    weights alike: the position (and zero point) calibration would pick on that
    batch (`batch_ranges`), written to the state, then used to quantize the
    batch; no gradient reaches it. Min_KL and Percentile search a histogram,
    too costly per batch: their calibrated state stays frozen in training.
    Inference (``training=False``) reads the state. `reference_train` is the
    NumPy twin of a training step.

    Args (the seed's, JSON spelling): bit_width, data_format ("INT"/"UINT"), method,
        method_percentile, round_mode, symmetry, per_channel, channel_axis, unsigned,
        narrow_range, epsilon (smallest step allowed: guards all-zero tensors),
        min_quantize_pos, max_quantize_pos.

    Example:
        >>> q = Pof2SQuantizer(bit_width=8, method="Min_MSE", round_mode="HALF_UP")
        >>> state = q.state_from_tensor(weights)      # {"pos": ...}
        >>> y = q(x, state)
        >>> y = fq(x, training=True)   # a FakeQuant (qstrat.layers) holding q: the batch's position
    """

    accepted = COMMON_PARAMS + ("min_quantize_pos", "max_quantize_pos")

    def state_spec(self, shape) -> dict[str, StateSpec]:
        ch = self.channels(shape)
        spec = {"pos": StateSpec(ch, 0.0)}
        if not self.params.symmetry:
            spec["zero_point"] = StateSpec(ch, 0.0)
        return spec

    def _state(self, pos, zp) -> dict[str, np.ndarray]:
        state = {"pos": np.asarray(pos, np.float32)}
        if not self.params.symmetry:
            state["zero_point"] = np.asarray(zp, np.float32)
        return state

    def state_from_tensor(self, tensor) -> dict[str, np.ndarray]:
        return self._state(*self._positions_from_tensor(tensor))

    def state_from_stats(self, stats) -> dict[str, np.ndarray]:
        return self._state(*self._positions_from_stats(stats))

    def __call__(self, x, state: Mapping[str, Any], training: bool = False):
        if training and self.params.method in batch_ranges.PER_BATCH_METHODS:
            state = self._train(x, state)
        g = self.grid
        zp = state.get("zero_point")
        return fq.pof2_fake_quant(
            x,
            fq.state_value(state["pos"]),
            g.qmin,
            g.qmax,
            self.params.round_mode,
            self.axis,
            None if zp is None else fq.state_value(zp),
        )

    def _train(self, x, state):
        """The batch's state, written to the state variables; returns it as tensors."""
        batch_ranges.require_variables(self, state, "writes each batch's position to the state")
        new = batch_ranges.pof2_state(self, x)
        for key, value in new.items():
            state[key].assign(value)
        return new

    exact_twin = True  # fake_quant_test: the kernel against `reference` on every grid's edges and ties

    def reference(self, x, state) -> np.ndarray:
        x = np.asarray(x)
        return ref.pof2_fake_quant_np(
            x,
            np.asarray(state["pos"]),
            self.grid,
            self.params.round_mode,
            None if self.axis is None else self.axis % x.ndim,
            state.get("zero_point", 0.0),
        )

    def reference_train(self, x, state) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The NumPy twin of ``__call__(x, state, training=True)``: (output, updated state).

        No_OF and Min_MSE: the state `state_from_tensor` gives on the float32
        batch; the other methods: ``state`` unchanged. ``state`` is not modified.
        """
        x = np.asarray(x)
        if self.params.method in batch_ranges.PER_BATCH_METHODS:
            batch_ranges.check_zero_point_grid(self)
            new = self.state_from_tensor(x.astype(np.float32))
        else:
            new = {k: np.array(v, np.float32) for k, v in state.items()}
        return self.reference(x, new), new


@register_quantizer
class TQTQuantizer(_Pof2Positions):
    """Trained quantization threshold (Jain et al., MLSys 2020): power-of-2, for QAT.

    The state is a trainable log2 threshold ``log_th``; the position is
    (b - 1) - ceil(log_th) on signed grids and b - ceil(log_th) on unsigned ones.
    Calibration picks a position with the method, then sets log_th to the middle
    of that position's interval, so a small training step does not flip it.
    Per-channel and asymmetric TQT are not defined by the paper: both are errors.
    """

    accepted = COMMON_PARAMS

    def _check(self, path: str) -> None:
        if self.params.per_channel:
            raise ConfigError(
                f"{path}.per_channel",
                "TQTQuantizer learns one threshold per tensor, got per_channel true",
                "Set per_channel to false, or use Pof2SQuantizer for per-channel positions.",
            )
        if not self.params.symmetry:
            raise ConfigError(
                f"{path}.symmetry",
                "TQTQuantizer is symmetric (zero point 0), got symmetry false",
                "Set symmetry to true, or use FSQuantizer for asymmetric ranges.",
            )

    @property
    def _offset(self) -> int:
        return self.params.bit_width - 1 + int(self.params.is_unsigned)

    def state_spec(self, shape) -> dict[str, StateSpec]:
        return {"log_th": StateSpec((), 0.0, trainable=True)}

    def _state(self, pos) -> dict[str, np.ndarray]:
        return {"log_th": np.asarray(self._offset - np.asarray(pos, np.float64) - 0.5, np.float32)}

    def position(self, state) -> np.ndarray:
        """The integer position a log_th value gives."""
        return ref.tqt_pos_np(np.asarray(state["log_th"]), self.params.bit_width, self.params.is_unsigned)

    def state_from_tensor(self, tensor) -> dict[str, np.ndarray]:
        return self._state(self._positions_from_tensor(tensor)[0])

    def state_from_stats(self, stats) -> dict[str, np.ndarray]:
        return self._state(self._positions_from_stats(stats)[0])

    def __call__(self, x, state: Mapping[str, Any], training: bool = False):
        g = self.grid
        p = self.params
        return fq.tqt_fake_quant(
            x, state["log_th"], p.bit_width, g.qmin, g.qmax, p.round_mode, p.is_unsigned, fused=bool(training)
        )

    def gated_training_call(self, x, state, enabled):
        """TensorFlow: the fused training kernels with the flag inside (`qstrat.quantizers.xla`)."""
        import keras

        if keras.backend.backend() != "tensorflow":
            return None
        g, p = self.grid, self.params
        return fq.tqt_fake_quant(
            x, state["log_th"], p.bit_width, g.qmin, g.qmax, p.round_mode, p.is_unsigned, fused=True, enabled=enabled
        )

    def reference(self, x, state) -> np.ndarray:
        p = self.params
        return ref.tqt_fake_quant_np(
            np.asarray(x), state["log_th"], p.bit_width, self.grid, p.round_mode, p.is_unsigned
        )

    def describe(self, state) -> dict[str, Any]:
        info = super().describe(state)
        info["quantize_pos"] = int(self.position({"log_th": info["log_th"]}))
        return info
