"""NumPy reference twins of every quantizer kernel: the executable spec.

Tests compare the keras.ops kernels in `fake_quant.py` with these functions,
bit for bit. They are written independently: rounding is done in float64
with NumPy's own functions, so the twin does not share the keras kernels'
floor-and-compare formulation.

Conventions (shared by both implementations):
    u = x * (1 / scale)                (in the dtype of x; XLA turns a division
                                        by a scalar into this, so all backends
                                        agree on it)
    q = clip(R(u) + zero_point, qmin, qmax)
    y = (q - zero_point) * scale       computed exactly, then rounded once to
                                       the dtype of x (nearest, ties to even)
For power-of-2 quantizers scale = 2^-pos, so every step is exact.

The last line is the spec at every bit width, 32 included: y is the float
nearest to the exact grid value. Up to 24 bits (float32) every integer
involved is a float32, so evaluating the formula in float32 gives exactly
that. Above 24 bits the grid ends (2^31 - 1, say) and q - zero_point need
not be float32 numbers; the twin then works in integers: R(u) of a float32 u
has at most 24 significant bits, so R(u) * scale is exact in float64 and is
rounded once, and a clipped value's (q - zero_point) * scale is rounded from
an exact int64 product (`round_product`). Zero points are integers (every
built-in quantizer makes them so). The sign of a zero result is not part of
the spec (R(-0.3) may be -0.0 or 0.0).
"""

from __future__ import annotations

import numpy as np

from qstrat.quantizers.grid import BFP_BLOCK_SIZE, BFP_MANTISSA_BITS, IntGrid, RoundMode


def round_np(u: np.ndarray, mode: RoundMode | str) -> np.ndarray:
    """Round to integers with the given tie rule, in float64."""
    u = np.asarray(u, dtype=np.float64)
    mode = RoundMode(mode)
    if mode == RoundMode.HALF_TO_EVEN:
        return np.rint(u)
    if mode == RoundMode.HALF_UP:
        return np.floor(u + 0.5)
    if mode == RoundMode.HALF_AWAY_FROM_ZERO:
        return np.sign(u) * np.floor(np.abs(u) + 0.5)
    if mode == RoundMode.HALF_TO_ZERO:
        return np.sign(u) * np.ceil(np.abs(u) - 0.5)
    return np.floor(u)


def expand(param, ndim: int, axis: int | None) -> np.ndarray:
    """Shape a per-channel parameter (C,) to broadcast against an ndim tensor."""
    param = np.asarray(param)
    if axis is None or param.ndim == 0:
        return param
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return param.reshape(shape)


def round_product(t, scale, dtype=np.float32) -> np.ndarray:
    """t * scale rounded once to ``dtype`` (nearest, ties to even), for integer-valued t.

    float32: exact for |t| < 2^39, by integer arithmetic. With scale = m 2^k
    (m a 24-bit integer), t * m is an int64; it is rounded to 24 significant
    bits, ties to even, and scaled back. Overflow gives inf, like IEEE
    float32 arithmetic. float64: t * scale in float64 is that rounding
    already (t is exact in float64). Other dtypes, or a t that is not an
    integer: the float64 product, cast.

    Example:
        >>> round_product(2**31 - 1, np.float32(1.5))    # (2^31 - 1) * 1.5 rounds to 1.5 * 2^31
        array(3.2212255e+09, dtype=float32)
    """
    t = np.asarray(t, dtype=np.float64)
    s = np.asarray(scale, dtype=dtype)
    dtype = np.dtype(dtype)
    if dtype == np.float64:
        return t * s
    s64 = s.astype(np.float64)
    if dtype != np.float32 or not np.all(t == np.round(t)) or np.any(np.abs(t) >= 2.0**39):
        return (t * s64).astype(dtype)
    f, e = np.frexp(s64)  # s = f * 2^e, f in [0.5, 1): m = f * 2^24 is an integer
    m = (f * 2.0**24).astype(np.int64)
    n = np.abs(t).astype(np.int64) * m  # < 2^63: exact
    _, bits = np.frexp(n.astype(np.float64))  # n's bit length, or one more where float64 rounded n up
    bits = np.where((n > 0) & (np.right_shift(n, np.maximum(bits - 1, 0)) == 0), bits - 1, bits)
    shift = np.maximum(bits - 24, 0).astype(np.int64)
    kept = np.right_shift(n, shift)
    rest = n - np.left_shift(kept, shift)
    half = np.where(shift > 0, np.left_shift(np.int64(1), np.maximum(shift - 1, 0)), 1)
    up = (shift > 0) & ((rest > half) | ((rest == half) & (kept % 2 == 1)))
    kept = kept + up
    with np.errstate(over="ignore"):
        y = np.ldexp(kept.astype(np.float64), (shift + e - 24).astype(np.int64)).astype(np.float32)
    return np.where(t < 0, -y, y).astype(np.float32)


def affine_fake_quant_np(x, scale, zero_point, grid: IntGrid, round_mode, axis=None):
    """Quantize to the integer grid and dequantize: the twin of `fake_quant.affine_fake_quant`.

    y = round_to_dtype(clip(R(u), qmin - zp, qmax - zp) * scale), the clip and
    the product exact (see the module docstring).
    """
    x = np.asarray(x)
    dt = x.dtype.type if np.issubdtype(x.dtype, np.floating) else np.float32
    x = x.astype(dt, copy=False)
    s = expand(np.asarray(scale, dtype=dt), x.ndim, axis)
    zp = expand(np.asarray(zero_point, dtype=np.float64), x.ndim, axis)
    u = x * (dt(1) / s)
    n = round_np(u, round_mode)
    lo, hi = grid.qmin - zp, grid.qmax - zp  # exact: integers below 2^53
    # n = R(u) has no more significant bits than u, so n * scale is exact in float64 (float32 x),
    # or its float64 rounding (float64 x): one rounding to dt either way.
    with np.errstate(over="ignore", invalid="ignore"):
        y = (n * s.astype(np.float64)).astype(dt)
    y = np.where(n < lo, round_product(lo, s, dt), y)
    y = np.where(n > hi, round_product(hi, s, dt), y)
    return y.astype(dt, copy=False)


def pof2_scale_np(pos, dtype=np.float32) -> np.ndarray:
    """2^-pos, exactly."""
    return np.ldexp(np.ones_like(np.asarray(pos), dtype=dtype), -np.asarray(pos, dtype=np.int64))


def pof2_fake_quant_np(x, pos, grid: IntGrid, round_mode, axis=None, zero_point=0):
    """Power-of-2 fake quantization: step 2^-pos."""
    x = np.asarray(x, dtype=np.float32) if not np.issubdtype(np.asarray(x).dtype, np.floating) else np.asarray(x)
    return affine_fake_quant_np(x, pof2_scale_np(pos, x.dtype), zero_point, grid, round_mode, axis)


def ste_mask_np(x, scale, zero_point, grid: IntGrid, round_mode, axis=None) -> np.ndarray:
    """1 where the rounded value lies on the grid (the gradient passes), else 0."""
    x = np.asarray(x)
    s = expand(np.asarray(scale, dtype=x.dtype), x.ndim, axis)
    zp = expand(np.asarray(zero_point, dtype=np.float64), x.ndim, axis)
    n = round_np(x * (x.dtype.type(1) / s), round_mode) + zp
    return ((n >= grid.qmin) & (n <= grid.qmax)).astype(x.dtype)


def tqt_pos_np(log_th, bit_width: int, unsigned: bool) -> np.ndarray:
    """TQT position: (b - 1) - ceil(log2 t) for signed grids, b - ceil(log2 t) for unsigned."""
    return (bit_width - 1 + int(unsigned)) - np.ceil(np.asarray(log_th, dtype=np.float64))


def tqt_fake_quant_np(x, log_th, bit_width, grid: IntGrid, round_mode, unsigned=False):
    return pof2_fake_quant_np(x, tqt_pos_np(log_th, bit_width, unsigned), grid, round_mode)


def tqt_grad_np(x, log_th, upstream, bit_width, grid: IntGrid, round_mode, unsigned=False):
    """Gradients of TQT (Jain et al. 2020, eq. 6-8) with straight-through round and ceil.

    d y/d x       = 1 where round(x/step) is on the grid, else 0
    d y/d log2 t  = ln2 * (q(x) - x) on the grid, ln2 * q(x) where clipped
    """
    x = np.asarray(x, dtype=np.float64)
    pos = tqt_pos_np(log_th, bit_width, unsigned)
    step = np.ldexp(1.0, -int(pos))
    n = round_np(x / step, round_mode)
    inside = (n >= grid.qmin) & (n <= grid.qmax)
    q = np.clip(n, grid.qmin, grid.qmax) * step
    dx = upstream * inside
    g = np.where(inside, q - x, q)
    return dx, float(np.sum(upstream * np.log(2.0) * g))


# ---- float data formats ---------------------------------------------------

FP16_MAX = 65504.0
BF16_MAX = float(np.frombuffer(np.uint32(0x7F7F0000).tobytes(), dtype=np.float32)[0])


def fp16_np(x) -> np.ndarray:
    """Round to IEEE half precision (nearest even), saturating at ±65504."""
    x = np.asarray(x, dtype=np.float32)
    return np.clip(x, -FP16_MAX, FP16_MAX).astype(np.float16).astype(np.float32)


def bf16_np(x) -> np.ndarray:
    """Round to bfloat16 (nearest even) by bit manipulation, saturating at the bf16 maximum."""
    x = np.clip(np.asarray(x, dtype=np.float32), -BF16_MAX, BF16_MAX)
    bits = x.view(np.uint32).astype(np.uint64)
    lsb = (bits >> 16) & 1
    rounded = ((bits + 0x7FFF + lsb) & 0xFFFF0000).astype(np.uint32)
    return rounded.view(np.float32)


def bfp16_np(x, axis: int = -1, round_mode=RoundMode.HALF_TO_EVEN) -> np.ndarray:
    """Block floating point: blocks of 8 values along ``axis`` share one exponent.

    For a block with largest magnitude m, E = floor(log2 m) and the step is
    2^(E - 6); each value keeps a sign and a 7-bit magnitude, so it is
    clip(R(x / step), -127, 127) * step.
    """
    x = np.asarray(x, dtype=np.float32)
    moved = np.moveaxis(x, axis, -1)
    c = moved.shape[-1]
    pad = (-c) % BFP_BLOCK_SIZE
    padded = np.concatenate([moved, np.zeros(moved.shape[:-1] + (pad,), np.float32)], axis=-1)
    blocks = padded.reshape(padded.shape[:-1] + (-1, BFP_BLOCK_SIZE)).astype(np.float64)
    m = np.abs(blocks).max(axis=-1, keepdims=True)
    _, e = np.frexp(m)  # m = f * 2^e, f in [0.5, 1): floor(log2 m) = e - 1
    step = np.ldexp(1.0, e - 1 - (BFP_MANTISSA_BITS - 1))
    lim = 2**BFP_MANTISSA_BITS - 1
    y = np.clip(round_np(blocks / step, round_mode), -lim, lim) * step
    y = np.where(m > 0, y, 0.0).reshape(padded.shape)[..., :c].astype(np.float32)
    return np.moveaxis(y, -1, axis)
