"""Exact integer sums in base-256 digits, in float32 and int32 keras.ops: for `batch_ranges.mse_pos` where the
grid is wider than 8 bits (its terms can pass 2^53) or the backend has no float64 (torch on Apple's MPS).

A nonnegative integer is held as its digits, lowest first, each in 0..255 once
carried ("canonical"). Products of digits are below 2^17 and their column sums
below 2^20, exact in float32; digit sums over a tensor's axis are int32 and
carried again, so a sum of any size is exact and the same in any order.
"""

from __future__ import annotations

import numpy as np
from keras import ops

from qstrat.quantizers.grid import IntGrid

_BASE = 256.0
_F32 = np.float32


def magnitude_bits(grid: IntGrid) -> int:
    """Bits of |i| <= |u| + |y / h| + 1 <= 2^(b + 5) + 1 (`batch_ranges.mse_pos`), b the grid's bits."""
    return int(np.ceil(np.log2(grid.qmax - grid.qmin + 1))) + 6


def magnitude_digits(grid: IntGrid) -> int:
    """Base-256 digits of |i| (`magnitude_bits`)."""
    return -(-magnitude_bits(grid) // 8)


def digits_of(v, n: int):
    """A float32 integer 0 <= v < 256^n as n base-256 digits, lowest first (the last one takes any excess)."""
    out = []
    for _ in range(n - 1):
        hi = ops.floor(v * _F32(1.0 / _BASE))
        out.append(v - hi * _F32(_BASE))
        v = hi
    return [*out, v]


def error_digits(a, sigma, phi_digits, width: int):
    """Sum over each row of w = a^2 * 2^24 + 2 sigma |phi| a (>= 0), as canonical base-256 digits (..., C, P).

    Per value: the digit products (each below 2^17, every column below 2^20,
    exact in float32, so a fused multiply-add gives the same bits) are summed
    into columns and carried into digits 0..255. The digits are summed as
    int32 over R (at most 255 R: R < 2^23), carried again, summed over B and
    carried once more.
    """
    ad = digits_of(a, width)
    cols = [0.0] * (2 * width + 2)
    for j, p in enumerate(phi_digits):
        for k, d in enumerate(ad):
            cols[j + k] = cols[j + k] + (_F32(2.0) * sigma) * (p * d)
    for k, d in enumerate(ad):
        cols[3 + 2 * k] = cols[3 + 2 * k] + d * d  # a^2 * 2^24: 2^24 is three digits up
        for m in range(k + 1, width):
            cols[3 + k + m] = cols[3 + k + m] + _F32(2.0) * (d * ad[m])
    digits, carry = [], _F32(0.0)
    for c in cols:
        v = c + carry
        carry = ops.floor(v * _F32(1.0 / _BASE))
        digits.append(v - carry * _F32(_BASE))
    digits.append(carry)  # w < 256^(2 width + 3)
    per_b = ops.stack([ops.sum(ops.cast(d, "int32"), axis=-1) for d in digits], axis=-1)  # (..., C, B, P)
    per_b = carried(per_b, 4)  # sums below 2^31: four more digits take the carries
    return carried(ops.sum(per_b, axis=-2), 4)  # (..., C, P); each sum is at most 255 B


def carried(v, extra: int):
    """Integer digit sums (..., P), each >= 0, as canonical base-256 digits (..., P + extra)."""
    out, carry = [], None
    for k in range(v.shape[-1]):
        t = v[..., k] if carry is None else v[..., k] + carry
        carry = ops.floor_divide(t, 256)
        out.append(t - carry * 256)
    for _ in range(extra):
        nxt = ops.floor_divide(carry, 256)
        out.append(carry - nxt * 256)
        carry = nxt
    return ops.stack(out, axis=-1)


def less(a, b):
    """a < b for canonical digit rows (C, P), lowest digit first: the highest digit that differs decides."""
    top_a, top_b = ops.flip(a, axis=-1), ops.flip(b, axis=-1)  # highest digit first
    differ = top_a != top_b
    first = ops.expand_dims(ops.argmax(ops.cast(differ, "int32"), axis=-1), -1)  # 0 where none differs
    less = ops.take_along_axis(top_a < top_b, first, axis=-1)[..., 0]
    return ops.logical_and(less, ops.any(differ, axis=-1))
