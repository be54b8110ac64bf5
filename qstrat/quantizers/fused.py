"""TensorFlow's fused power-of-2 kernel, for passes that only measure a quantized model (`fused_measurement`)."""

from __future__ import annotations

import contextlib
import contextvars

import keras
import numpy as np

from qstrat.quantizers.grid import RoundMode

_FUSED = contextvars.ContextVar("qstrat_fused_measurement", default=False)
FUSED_MISMATCH = 0.5 - 2.0**-25  # the one scaled input where floor(u + 0.5) is not HALF_UP (0.49999997 -> 1)


@contextlib.contextmanager
def fused_measurement():
    """Inside, on TensorFlow and eagerly, per-tensor symmetric power-of-2 HALF_UP kernels run as one fused op.

    TensorFlow's ``QuantizeAndDequantizeV2`` (HALF_UP, range given) computes
    ``floor(clip(x) * 2^p + 0.5) * 2^-p`` in one pass over the tensor, where
    `fake_quant`'s exact kernel makes nine (one per op). With u = x * 2^p,
    floor(u + 0.5) in float32 is HALF_UP(u) for every |u| < 2^22 but one:
    u = `FUSED_MISMATCH` = 0.5 - 2^-25, whose sum rounds up to 1, so that
    input gives one step instead of 0 (the sum is exact for 0.5 <= |u| < 2^22
    and cannot reach an integer for |u| < 0.25; `fused_test` sweeps every
    float32 with 0.25 <= |u| < 4 and finds that one). So it is for
    passes that only measure the quantized model, never for the model itself:
    bias correction's walk, where one such value moves a channel mean by one
    step over the number of values averaged. Other grids, backends and traced
    code keep the exact kernel; so does training.
    """
    token = _FUSED.set(True)
    try:
        yield
    finally:
        _FUSED.reset(token)


def fused_pof2(x, pos, qmin: int, qmax: int, round_mode: RoundMode):
    """`fused_measurement`'s kernel for this call of `fake_quant.pof2_fake_quant` (symmetric), or None where
    it does not apply (outside the context too)."""
    if not _FUSED.get() or round_mode != RoundMode.HALF_UP or keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    if not tf.executing_eagerly() or keras.backend.standardize_dtype(x.dtype) != "float32":
        return None
    p = np.asarray(pos, np.float64)
    if p.size != 1 or not (p == np.round(p)).all() or np.abs(p).max() > 100:
        return None
    if qmin == 0:
        signed, bits, narrow = False, (qmax + 1).bit_length() - 1, False
    else:
        signed, bits, narrow = True, (qmax + 1).bit_length(), qmin == -qmax
        if not narrow and qmin != -(qmax + 1):
            return None
    if not 2 <= bits <= 16 or qmax != (1 << (bits - int(signed))) - 1:
        return None
    step = float(np.ldexp(1.0, -int(p.reshape(()))))
    return tf.quantization.quantize_and_dequantize_v2(
        x, qmin * step, qmax * step, signed_input=signed, num_bits=bits, range_given=True,
        round_mode="HALF_UP", narrow_range=narrow,
    )  # fmt: skip
