"""Fake quantization to float formats in keras.ops: IEEE half, bfloat16 and block floating point (BFP16).

Same contract as the integer kernels in `fake_quant.py`: bit for bit with the
NumPy twins in `reference.py` on every backend, and a clipped straight-through
gradient (1 inside the format's range, 0 where it saturated).
"""

from __future__ import annotations

from keras import ops

from qstrat.quantizers.exact32 import floor_log2, pow2
from qstrat.quantizers.fake_quant import custom_gradient, grad_args, round_ops
from qstrat.quantizers.grid import BFP_BLOCK_SIZE, BFP_MANTISSA_BITS, RoundMode
from qstrat.quantizers.reference import BF16_MAX, FP16_MAX


def _with_clipped_ste(x, forward, lo: float, hi: float):
    """forward(x), with gradient 1 where lo <= x <= hi and 0 elsewhere."""

    @custom_gradient
    def f(x):
        y = forward(x)
        inside = ops.cast(ops.logical_and(x >= lo, x <= hi), x.dtype)

        def grad(*args, upstream=None):
            return grad_args(args, upstream) * inside

        return y, grad

    return f(x)


def fp16_fake_quant(x):
    """Round to IEEE half precision (nearest even), saturating at ±65504."""

    def forward(v):
        return ops.cast(ops.cast(ops.clip(v, -FP16_MAX, FP16_MAX), "float16"), v.dtype)

    return _with_clipped_ste(x, forward, -FP16_MAX, FP16_MAX)


def bf16_fake_quant(x):
    """Round to bfloat16 (nearest even), saturating at the largest bfloat16."""

    def forward(v):
        return ops.cast(ops.cast(ops.clip(v, -BF16_MAX, BF16_MAX), "bfloat16"), v.dtype)

    return _with_clipped_ste(x, forward, -BF16_MAX, BF16_MAX)


def bfp16_fake_quant(x, axis: int = -1, round_mode=RoundMode.HALF_TO_EVEN):
    """Block floating point: 8 values along ``axis`` share an exponent; 7-bit magnitudes.

    The gradient is straight-through: BFP16 only clips values far beyond the
    block maximum's own range, which never happens to the block's members.
    """
    round_mode = RoundMode(round_mode)
    ndim = len(x.shape)
    axis = axis % ndim

    def forward(v):
        moved = ops.moveaxis(v, axis, -1)
        shape = tuple(moved.shape)
        c = shape[-1]
        pad = (-c) % BFP_BLOCK_SIZE
        if pad:
            moved = ops.pad(moved, [(0, 0)] * (ndim - 1) + [(0, pad)])
        lead = tuple(ops.shape(moved)[:-1])
        blocks = ops.reshape(moved, lead + ((c + pad) // BFP_BLOCK_SIZE, BFP_BLOCK_SIZE))
        m = ops.max(ops.abs(blocks), axis=-1, keepdims=True)
        safe = ops.where(m > 0, m, ops.ones_like(m))
        step = pow2(floor_log2(safe) - float(BFP_MANTISSA_BITS - 1))
        lim = float(2**BFP_MANTISSA_BITS - 1)
        y = ops.clip(round_ops(blocks * (1.0 / step), round_mode), -lim, lim) * step
        y = ops.where(m > 0, y, ops.zeros_like(y))
        y = ops.reshape(y, lead + (c + pad,))[..., :c]
        return ops.moveaxis(y, -1, axis)

    big = float("inf")
    return _with_clipped_ste(x, forward, -big, big)
