"""`FSQuantizer`'s framework quantizer: Keras' ``fake_quant_with_min_max_vars``, and where nothing differentiates
an eager copy of TensorFlow's per-channel kernel in whole-tensor ops.

With ``use_framework_quantizer``, `FSQuantizer` runs Keras'
``fake_quant_with_min_max_vars`` (`framework_fake_quant`), which on
TensorFlow is ``FakeQuantWithMinMaxVars(PerChannel)``, the op converters
recognise. The per-channel CPU kernel loops over the channels and evaluates
each one as a strided column of the tensor: on a ResNet50's kernels it takes
about 16 ns per weight, most of bias correction's cost with fs. The same
arithmetic as broadcast ops over the whole tensor (`per_channel_fake_quant`)
gives the same float32s at about a third of the time:

- per channel, the kernel's nudge (here in NumPy float32, the same float32
  operations in the same order): scale = (max - min) / (qmax - qmin),
  inv = (qmax - qmin) / (max - min), zero point = qmin - min / scale, clamped
  to the grid and rounded half away from zero; nudged_min = (qmin - zp) *
  scale, nudged_max = (qmax - zp) * scale, quant_zero =
  floor(-nudged_min * inv + 0.5);
- per value: floor((clip(x, nudged_min, nudged_max) - nudged_min) * inv -
  quant_zero + 0.5) * scale.

`framework_op_test` checks equality with the op on random tensors with
values put on every tie. It is used only where nothing differentiates
(inside `qstrat.quantizers.fake_quant.forward_only`), eagerly, on
TensorFlow, for float32 inputs whose channel ranges are proper (min < max,
and every float of the nudge finite and normal: TensorFlow flushes subnormals
to zero, NumPy does not); everything else runs the op. Traced code keeps the
op, so a saved or converted model holds it.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from qstrat.arrays import to_numpy
from qstrat.quantizers import fake_quant as fq


def framework_fake_quant(x, state, qmin: int, qmax: int, axis: int | None, bits: int, narrow: bool, round_mode):
    """Keras' ``fake_quant_with_min_max_vars`` of ``x`` with the range of an FS ``state`` (scale, zero point) on
    the grid [qmin, qmax], per channel over ``axis`` (None: per tensor).

    The values are the op's; the gradient is qstrat's clipped straight-through estimator, as for every other
    quantizer: 1 where ``x`` rounds (``round_mode``) onto the grid, else 0. Keras' own gradient of the op
    treats the values at the very ends of the range differently on each backend, so QAT would not train
    the same on all three.
    """
    s = fq.state_value(state["scale"])
    zp = fq.state_value(state["zero_point"])
    if fq.is_forward_only():
        return _framework_values(x, s, zp, qmin, qmax, axis, bits, narrow)
    ndim = len(x.shape)
    _, (mmin, mmax) = fq.grid_bounds(x.dtype, qmin, qmax)

    @fq.custom_gradient
    def op(x, s, zp):  # the state comes in as arguments: TensorFlow's custom gradients refuse captured variables
        def grad(*args, upstream=None):
            dy = fq.grad_args(args, upstream)
            s_x, zp_x = ops.cast(fq.expand(s, ndim, axis), x.dtype), ops.cast(fq.expand(zp, ndim, axis), x.dtype)
            n = fq.round_ops(x * (1.0 / s_x), round_mode) + zp_x
            inside = ops.cast(ops.logical_and(n >= mmin, n <= mmax), dy.dtype)
            return dy * inside, ops.zeros_like(s), ops.zeros_like(zp)

        return _framework_values(x, s, zp, qmin, qmax, axis, bits, narrow), grad

    return op(x, ops.cast(s, "float32"), ops.cast(zp, "float32"))  # tensors read from the state variables


def _framework_values(x, s, zp, qmin: int, qmax: int, axis: int | None, bits: int, narrow: bool):
    lo, hi = (qmin - zp) * s, (qmax - zp) * s
    if axis is None:
        return keras.quantizers.fake_quant_with_min_max_vars(x, lo, hi, num_bits=bits, narrow_range=narrow)
    fast = per_channel_fake_quant(x, lo, hi, axis, bits, narrow)
    if fast is not None:
        return fast
    if axis % len(x.shape) != len(x.shape) - 1:
        # Keras' torch and JAX versions of this op only broadcast over the last axis.
        moved = ops.moveaxis(x, axis, -1)
        y = keras.quantizers.fake_quant_with_min_max_vars(moved, lo, hi, num_bits=bits, narrow_range=narrow, axis=-1)
        return ops.moveaxis(y, -1, axis)
    return keras.quantizers.fake_quant_with_min_max_vars(x, lo, hi, num_bits=bits, narrow_range=narrow, axis=axis)


def nudge(lo, hi, qmin: int, qmax: int):
    """(scale, inv, zero point) per channel, float32, as the kernel computes them from the range [lo, hi]: the
    zero point qmin - lo / scale clamped to [qmin, qmax] and rounded half away from zero."""
    f = np.float32
    lo, hi = np.asarray(lo, f), np.asarray(hi, f)
    qminf, qmaxf = f(qmin), f(qmax)
    with np.errstate(all="ignore"):  # a degenerate range gives inf or nan here, and the caller runs the op
        scale = (hi - lo) / (qmaxf - qminf)
        inv = (qmaxf - qminf) / (hi - lo)
        from_min = qminf - lo / scale
        floor = np.floor(from_min)
        away = floor + (from_min - floor >= f(0.5)).astype(f)  # half away from zero; from_min >= 0 where used
        zp = np.where(from_min < qminf, qminf, np.where(from_min > qmaxf, qmaxf, away)).astype(f)
    return scale, inv, zp


def nudged(lo, hi, qmin: int, qmax: int):
    """(nudged_min, nudged_max, scale, inv, quant_zero) per channel, float32, as the kernel computes them."""
    f = np.float32
    scale, inv, zp = nudge(lo, hi, qmin, qmax)
    with np.errstate(all="ignore"):
        nmin, nmax = (f(qmin) - zp) * scale, (f(qmax) - zp) * scale
        return nmin, nmax, scale, inv, np.floor(-nmin * inv + f(0.5))


def per_channel_fake_quant(x, lo, hi, axis: int, bits: int, narrow: bool):
    """``FakeQuantWithMinMaxVarsPerChannel`` of ``x`` over ``axis``, as whole-tensor ops; None where it does
    not apply (see the module), for the caller to run the op."""
    if not fq.is_forward_only() or keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    if not tf.executing_eagerly() or keras.backend.standardize_dtype(x.dtype) != "float32":
        return None
    lo = to_numpy(lo).astype(np.float32).ravel()
    hi = to_numpy(hi).astype(np.float32).ravel()
    qmin, qmax = (1 if narrow else 0), 2**bits - 1
    nmin, nmax, scale, inv, quant_zero = nudged(lo, hi, qmin, qmax)
    # TensorFlow's threads flush subnormal floats to zero, NumPy does not: keep the nudge to normal floats.
    if not (np.all(lo < hi) and all(_normal(v) for v in (lo, hi, scale, inv, nmin, nmax))):
        return None
    shape = [1] * len(x.shape)
    shape[axis % len(x.shape)] = -1

    def c(v):
        return tf.constant(np.asarray(v, np.float32).reshape(shape))

    nmin_t = c(nmin)
    clamped = tf.maximum(tf.minimum(x, c(nmax)), nmin_t)
    return tf.floor((clamped - nmin_t) * c(inv) - c(quant_zero) + 0.5) * c(scale)


def _normal(v: np.ndarray) -> bool:
    """Every value finite, and 0 or a normal float32 (no subnormal, where flush-to-zero would differ)."""
    a = np.abs(v)
    return bool(np.all(np.isfinite(v)) and np.all((a == 0) | (a >= np.finfo(np.float32).tiny)))
