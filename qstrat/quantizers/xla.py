"""TensorFlow: TQT's training kernels compiled with XLA, so that a QAT step costs little more than a float one.

`qstrat.quantizers.fake_quant.tqt_fake_quant` is about twenty elementwise
ops over an activation, forward and backward; in TensorFlow's graph each one
reads and writes the whole tensor. Compiled with XLA (``jit_compile``) the
forward is one fused kernel and the backward another. They are the same
float32 operations (a product by a power of 2, floor, compares, a clip;
nothing XLA may reassociate), so the values are the same bit for bit:
`qstrat/quantizers/xla_test.py` checks values and gradients against the
unfused kernel. The rest of the training step stays as Keras traces it.
"""

from __future__ import annotations

from functools import cache

import tensorflow as tf

from qstrat.quantizers.fake_quant import tqt_forward, tqt_grads
from qstrat.quantizers.grid import RoundMode


@cache
def _kernels(bit_width: int, bounds: tuple, round_mode: RoundMode, unsigned: bool):
    @tf.function(jit_compile=True, reduce_retracing=True, autograph=False)
    def forward(x, lt, on):
        y, inside = tqt_forward(x, lt, bit_width, *bounds, round_mode, unsigned)
        return tf.where(on, y, x), tf.logical_or(inside, tf.logical_not(on))

    @tf.function(jit_compile=True, reduce_retracing=True, autograph=False)
    def backward(x, y, inside, dy, on):
        dx, dlog = tqt_grads(x, y, inside, dy)
        return dx, tf.where(on, dlog, tf.zeros_like(dlog))

    return forward, backward


def tqt_fused(x, lt, bit_width: int, bounds: tuple, round_mode: RoundMode, unsigned: bool, enabled=None):
    """`tqt_fake_quant` (``bounds``: the clip and mask bounds) as two XLA kernels, with its gradient.

    ``enabled``: a layer's on/off flag (a variable, on above 0.5); off, the
    output is x and the gradient passes straight through, as `FakeQuant`'s
    gate does, inside the same kernels.
    """
    forward, backward = _kernels(bit_width, tuple(float(b) for b in bounds), round_mode, unsigned)
    on = tf.constant(True) if enabled is None else tf.convert_to_tensor(enabled) > 0.5

    @tf.custom_gradient
    def fq(x, lt):
        y, inside = forward(x, lt, on)

        def grad(dy):
            dx, dlog = backward(x, y, inside, dy, on)
            return dx, tf.reshape(dlog, tf.shape(lt))

        return y, grad

    return fq(x, lt)
