"""Exact float32 arithmetic for integer grids wider than float32's integers (more than 2^24 + 1 levels).

`qstrat.quantizers.fake_quant` rounds a value to a 32-bit grid with a zero
point in float32 and must still return the float32 nearest to the exact grid
value (see its docstring). The grid ends minus the zero point reach 2^32, so
they are carried here as two float32 "limbs", and their products with a scale
are formed exactly and rounded once. Each helper takes ``m``, the array
module: `OpsMath` (keras.ops tensors, traced into the kernel) or `NumPyMath`
(float32 NumPy, when the state is known up front): both give the same bits.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from qstrat.quantizers.grid import IntGrid, float32_inside


def pow2(k):
    """2^k for integer-valued k, exact on every backend (checked by tests)."""
    return ops.power(2.0, k)


def floor_log2(m):
    """floor(log2 m) for m > 0, corrected to be exact where log2 rounds across an integer."""
    e = ops.floor(ops.log2(m))
    e = ops.where(pow2(e) > m, e - 1.0, e)
    return ops.where(pow2(e + 1.0) <= m, e + 1.0, e)


_F32_INTEGERS = 2**24  # every integer of magnitude up to 2^24 is a float32


def is_wide(x, qmin: int, qmax: int) -> bool:
    """True for float32 x on a grid whose q - zp can leave float32's integers (more than 2^24 + 1 levels)."""
    return qmax - qmin > _F32_INTEGERS and keras.backend.standardize_dtype(x.dtype) == "float32"


def grid_bounds(dtype, qmin: int, qmax: int):
    """((clip lo, clip hi), (mask lo, mask hi)) for the grid ends, as Python floats.

    For float32: the clip bounds are qmin and qmax rounded to the nearest
    float32 (what round32(clip(n, qmin, qmax)) clips a float32 n to); the
    mask bounds are the float32s nearest inside the grid, so that for a
    float32 n, n <= qmax exactly when n <= the mask bound. Both are the grid
    ends themselves up to 2^24. Other dtypes: the grid ends as they are.
    """
    if keras.backend.standardize_dtype(dtype) != "float32":
        return (float(qmin), float(qmax)), (float(qmin), float(qmax))
    return (float(np.float32(qmin)), float(np.float32(qmax))), float32_inside(IntGrid(qmin, qmax))


class OpsMath:
    """The operations `limbs`, `nearest` and `times_scale` use, on keras tensors."""

    floor = staticmethod(ops.floor)
    where = staticmethod(ops.where)

    @staticmethod
    def f32(cond):
        return ops.cast(cond, "float32")

    @staticmethod
    def pow2(k):
        return pow2(k)

    @staticmethod
    def floor_log2(v):
        return floor_log2(v)


class NumPyMath:
    """The same operations on float32 NumPy arrays (IEEE float32 like the backends: the same bits)."""

    floor = staticmethod(np.floor)
    where = staticmethod(np.where)

    @staticmethod
    def f32(cond):
        return np.asarray(cond, np.float32)

    @staticmethod
    def pow2(k):
        return np.ldexp(np.float32(1.0), np.asarray(k).astype(np.int32))

    @staticmethod
    def floor_log2(v):
        return (np.frexp(v)[1] - 1).astype(np.float32)


def limbs(m, q: int, zp):
    """q - zp as float32 integers (high, low), q - zp = high * 2^24 + low with 0 <= low < 2^24, exactly.

    ``zp`` is a float32 integer with |zp| < 2^32 (so |high| <= 2^9); every
    intermediate is an integer below 2^24 in magnitude or a multiple of 2^24
    with few bits, so nothing rounds.
    """
    zh = m.floor(zp * 2.0**-24)
    zl = zp - zh * 2.0**24  # in [0, 2^24)
    qh, ql = divmod(q, 2**24)
    low = float(ql) - zl  # in (-2^24, 2^24)
    borrow = m.floor(low * 2.0**-24)  # -1 where low < 0, else 0
    return (float(qh) - zh) + borrow, low - borrow * 2.0**24


def nearest(m, high, low):
    """(round32(t), t - round32(t)) for t = high * 2^24 + low: one rounding, and its exact residual."""
    t = high * 2.0**24 + low  # both terms exact: one correctly rounded addition
    th = m.floor(t * 2.0**-24)
    tl = t - th * 2.0**24  # t's own limbs, exact
    return t, (high - th) * 2.0**24 + (low - tl)  # a small integer: exact


def split12(m, v):
    """An integer v in [0, 2^24) as (v // 2^12, v % 2^12), exactly."""
    hi = m.floor(v * 2.0**-12)
    return hi, v - hi * 2.0**12


def times_scale(m, high, low, s):
    """round32(t * s) for t = high * 2^24 + low (|t| < 2^33) and a normal float32 s > 0, exactly.

    With s = M * 2^(e - 23) (M a 24-bit integer) the exact product is
    |t| * M * 2^(e - 23). |t| * M < 2^57 is multiplied out in base 2^12
    (every partial product below 2^24, every column sum below 2^14, all exact
    in float32), then written as two float32s A + B: A the bits from 2^34 up,
    B the bits from 2^24 to 2^33 and, for the bits below 2^24, which can only
    break a tie, a single sticky 2^23. One float32 addition A + B then rounds
    exactly as the full product would (Goldberg's round and sticky bits). Every
    product is exact, so a backend that fuses a multiply and an add into an
    FMA gets the same bits.
    """
    neg = m.f32(high < 0)
    sign = 1.0 - 2.0 * neg
    h, lo = high * sign, low * sign
    borrow = m.floor(lo * 2.0**-24)
    ah, al = h + borrow, lo - borrow * 2.0**24  # |t| = ah * 2^24 + al, 0 <= al < 2^24, 0 <= ah < 2^9
    e = m.floor_log2(s)
    mant = s * m.pow2(-e) * 2.0**23  # M, an integer in [2^23, 2^24)
    m1, m0 = split12(m, mant)
    a1, a0 = split12(m, al)
    p00, p01, p10 = split12(m, a0 * m0), split12(m, a0 * m1), split12(m, a1 * m0)
    p11, p20, p21 = split12(m, a1 * m1), split12(m, ah * m0), split12(m, ah * m1)
    cols = [
        p00[1],
        p00[0] + p01[1] + p10[1],
        p01[0] + p10[0] + p11[1] + p20[1],
        p11[0] + p20[0] + p21[1],
        p21[0],
    ]
    digits, carry = [], 0.0
    for c in cols:
        carry, digit = split12(m, c + carry)
        digits.append(digit)
    d0, d1, d2, d3, d4 = digits  # base 2^12; the last carry is 0, as |t| * M < 2^57
    n2 = d4  # bits 48..56
    n1 = d3 * 2.0**12 + d2  # bits 24..47
    n0 = d1 * 2.0**12 + d0  # bits 0..23
    n1_top = m.floor(n1 * 2.0**-10)
    a_big = n2 * 2.0**48 + n1_top * 2.0**34  # 23 significant bits at most
    b_big = (n1 - n1_top * 2.0**10) * 2.0**24 + m.f32(n0 > 0) * 2.0**23
    big = n2 > 0  # otherwise n1 * 2^24 + n0 is already two float32s
    r = m.where(big, a_big, n1 * 2.0**24) + m.where(big, b_big, n0)
    return sign * (r * 2.0**-23) * m.pow2(e)
