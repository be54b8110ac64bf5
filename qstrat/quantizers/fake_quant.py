"""Fake-quantization kernels in keras.ops: identical on TensorFlow, torch and JAX.

Each kernel quantizes to the integer grid and dequantizes. The NumPy twins in
`reference.py` are the spec; tests check these kernels against them bit for
bit on every backend.

Gradients:
- integer grids pass the upstream gradient where the rounded value lies on the
  grid and block it where the value was clipped (clipped straight-through);
- TQT also returns the gradient of its log2 threshold (Jain et al. 2020);
- scale, zero point and position get no gradient.

Bit widths above 24 (float32). At every width up to 32 a float32 kernel
returns the float32 nearest to the exact grid value (ties to even),
``round32(clip(R(u), qmin - zp, qmax - zp) * scale)`` computed exactly, as
`reference.py` specifies: bit for bit, saturated values included, for integer
zero points (as the quantizers make them) and positive normal scales; the
sign of a zero result is left open. Up to 2^24 + 1 levels (24 bits) every
integer the formula touches is a float32 and the plain float32 formula is
that. Wider grids end on integers float32 does not hold (2^31 - 1 is not a
float32; its nearest is 2^31), so the kernels make sure of it:

- ``R(u)`` of a float32 ``u`` is a float32 (|u| >= 2^23 is an integer already),
  and rounding to float32 is monotone, so it commutes with the clip:
  round32(clip(n, L, H) * s) = clip(round32(n * s), round32(L * s), round32(H * s))
  for s > 0. The kernels clip ``n * s`` (one float32 product) to those two bounds.
- Symmetric power-of-2 grids: the bounds are qmin and qmax rounded to float32
  (2^31 - 1 -> 2^31, so a clipped value reads as 2^31 * step, the float32
  nearest to (2^31 - 1) * step). No extra ops.
- With a zero point, L = qmin - zp and H = qmax - zp are integers up to 2^32:
  they are carried exactly as two float32 limbs, and round32(L * s) is formed
  from an exact limb product rounded once (`exact32.times_scale`): about a hundred
  small float32 ops on the per-channel vectors, traced only on these grids.
  Inside `forward_only` with NumPy state they are computed once, in NumPy.
- The straight-through mask (qmin <= R(u) + zp <= qmax) is exact too: it
  compares with the float32s nearest inside the grid, or uses the limbs'
  exact residuals.

float64 inputs hold every integer of a 32-bit grid, so the plain formula is
exact there. float16 and bfloat16 inputs get the plain formula in their own
type, exact only while the grid's integers fit it.

The float formats (FP16, BF16, BFP16) are in `float_formats.py`.

Portability rules learned the hard way (see the environment notes):
- variables go through ``ops.convert_to_tensor`` before any op (JAX ``clip``,
  torch ``custom_gradient``);
- a ``custom_gradient`` grad function takes ``(*args, upstream=None)``;
- ``x * (1 / scale)`` rather than ``x / scale``: XLA rewrites a division by a
  scalar into a multiplication by its reciprocal, so this is what all three
  backends compute identically.
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import keras
import numpy as np
from keras import ops

from qstrat.quantizers.exact32 import (
    NumPyMath,
    OpsMath,
    grid_bounds,
    is_wide,
    limbs,
    nearest,
    pow2,
    times_scale,
)
from qstrat.quantizers.fused import fused_pof2
from qstrat.quantizers.grid import RoundMode


def round_ops(u, mode: RoundMode):
    """Round with the given tie rule, exactly.

    HALF_UP is floor(u) + [u - floor(u) >= 0.5] (see below). The other tie
    rules start from round-half-to-even, which every backend implements
    exactly, and move ties: d = u - round(u) is exact (Sterbenz), and
    |d| == 0.5 marks a tie; a tie u = k + 0.5 has |u| < 2^23, so u + 0.5 and
    u - 0.5 are exact. (floor(u + 0.5) is not: 0.49999997 + 0.5 rounds to 1.)
    """
    mode = RoundMode(mode)
    if mode == RoundMode.FLOOR:
        return ops.floor(u)
    if mode == RoundMode.HALF_UP:
        # u - floor(u) is exact (Sterbenz) except for u in (-0.5, 0), where it is
        # 1 + u > 0.5 rounded to float32: still >= 0.5, so the decision is exact.
        f = ops.floor(u)
        return f + ops.cast(u - f >= 0.5, u.dtype)
    n = ops.round(u)
    if mode == RoundMode.HALF_TO_EVEN:
        return n
    d = u - n
    tie = ops.abs(d) == 0.5
    half = 0.5 * ops.sign(u)
    if mode == RoundMode.HALF_AWAY_FROM_ZERO:
        return ops.where(tie, u + half, n)
    return ops.where(tie, u - half, n)  # HALF_TO_ZERO


def expand(param, ndim: int, axis: int | None):
    """Shape a per-channel parameter (C,) to broadcast against an ndim tensor."""
    param = ops.convert_to_tensor(param)
    if axis is None or len(param.shape) == 0:
        return param
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return ops.reshape(param, shape)


_FORWARD_ONLY = contextvars.ContextVar("qstrat_forward_only", default=False)


@contextlib.contextmanager
def forward_only():
    """Build the kernels without their custom gradients, for graphs that are only ever run forward.

    The forward values are the same ops; the graph is smaller (quicker to trace)
    and a gradient through it would be wrong, so only passes that never
    differentiate (bias correction's frozen probe) use it.
    """
    token = _FORWARD_ONLY.set(True)
    try:
        yield
    finally:
        _FORWARD_ONLY.reset(token)


def is_forward_only() -> bool:
    """Whether the caller is inside `forward_only`."""
    return _FORWARD_ONLY.get()


def custom_gradient(f):
    """``ops.custom_gradient(f)``; inside `forward_only`, f's forward value alone."""
    if _FORWARD_ONLY.get():
        return lambda *args: f(*args)[0]
    return ops.custom_gradient(f)


def state_value(v):
    """A quantizer state value for the kernels: a tensor, or NumPy as given (a frozen copy's constants)."""
    return v if isinstance(v, np.ndarray) else ops.convert_to_tensor(v)


def _constant(x, param, ndim: int, axis: int | None):
    """``param`` as a float32 NumPy array shaped to broadcast against x, when it can be a graph constant.

    That is inside `forward_only`, for NumPy state and a float32 x: the
    scale arithmetic is then done here once, in the same IEEE float32 as the
    kernels would do it, instead of as ops in every traced graph. Else None.
    """
    if not (_FORWARD_ONLY.get() and isinstance(param, np.ndarray)):
        return None
    if keras.backend.standardize_dtype(x.dtype) != "float32":
        return None
    param = np.asarray(param, np.float32)
    if axis is None or param.ndim == 0:
        return param
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return param.reshape(shape)


def grad_args(args, upstream):
    return args[0] if upstream is None else upstream


def affine_fake_quant(x, scale, zero_point, qmin: int, qmax: int, round_mode, axis=None):
    """y = (clip(R(x / scale) + zp, qmin, qmax) - zp) * scale, with a clipped STE."""
    ndim = len(x.shape)
    round_mode = RoundMode(round_mode)
    s, zp = _constant(x, scale, ndim, axis), _constant(x, zero_point, ndim, axis)
    if s is not None and zp is not None:
        inv = np.float32(1.0) / s
    else:
        s = ops.cast(expand(scale, ndim, axis), x.dtype)
        zp = ops.cast(expand(zero_point, ndim, axis), x.dtype)
        inv = 1.0 / s
    if is_wide(x, qmin, qmax):
        return _wide_affine(x, s, inv, zp, qmin, qmax, round_mode, pof2=False)
    return _affine(x, s, inv, zp, qmin, qmax, round_mode)


def _affine(x, s, inv, zp, qmin: int, qmax: int, round_mode):
    """The grid round trip; ``inv`` is 1 / s, ``zp`` None for a zero point that is 0 by construction.

    Exact for every grid when ``zp`` is None, and for grids of at most 2^24 + 1
    levels otherwise (`_wide_affine` takes the rest). Inference pays only for
    the forward ops: the clipped-STE mask is computed in the gradient
    function, when a gradient is asked for.
    """
    (cmin, cmax), (mmin, mmax) = grid_bounds(x.dtype, qmin, qmax)

    @custom_gradient
    def fq(x, s, inv):
        n = round_ops(x * inv, round_mode)
        if zp is not None:
            n = n + zp
        q = ops.clip(n, cmin, cmax)
        y = (q if zp is None else q - zp) * s

        def grad(*args, upstream=None):
            dy = grad_args(args, upstream)
            inside = ops.cast(ops.logical_and(n >= mmin, n <= mmax), dy.dtype)
            return dy * inside, ops.zeros_like(s), ops.zeros_like(inv)

        return y, grad

    return fq(x, s, inv)


def pof2_fake_quant(x, pos, qmin: int, qmax: int, round_mode, axis=None, zero_point=None):
    """Power-of-2 fake quantization: scale 2^-pos, exact at every step (``zero_point`` None: symmetric)."""
    ndim = len(x.shape)
    round_mode = RoundMode(round_mode)
    if zero_point is None:
        fused = fused_pof2(x, pos, qmin, qmax, round_mode)
        if fused is not None:
            return fused
    p = _constant(x, pos, ndim, axis)
    zp = None if zero_point is None else _constant(x, zero_point, ndim, axis)
    # 2^p for integer p in [-126, 126] is an exact normal float32 (ldexp); other positions keep the ops.
    if p is not None and (zero_point is None or zp is not None) and np.all((np.abs(p) <= 126) & (p == np.round(p))):
        k = p.astype(np.int32)
        one = np.float32(1.0)
        s, inv = np.ldexp(one, -k), np.ldexp(one, k)
    else:
        p = ops.cast(expand(pos, ndim, axis), x.dtype)
        zp = None if zero_point is None else ops.cast(expand(zero_point, ndim, axis), x.dtype)
        s, inv = pow2(-p), pow2(p)
    if zp is not None and is_wide(x, qmin, qmax):
        return _wide_affine(x, s, inv, zp, qmin, qmax, round_mode, pof2=True)
    return _affine(x, s, inv, zp, qmin, qmax, round_mode)


# ---- grids wider than float32's integers --------------------------------------------------------


def _wide_affine(x, s, inv, zp, qmin: int, qmax: int, round_mode, pof2: bool):
    """The grid round trip with a zero point on a grid wider than 2^24 + 1 levels (float32 x).

    y = clip(round32(n * s), round32(L * s), round32(H * s)), with L = qmin - zp
    and H = qmax - zp exact (see the module docstring); for power-of-2 scales
    round32(L * s) = round32(L) * s, so n is clipped to round32(L), round32(H)
    and multiplied afterwards. ``s``, ``inv`` and ``zp`` are all NumPy
    (inside `forward_only`: the bounds are computed here, once) or all tensors.
    """
    m = NumPyMath if isinstance(zp, np.ndarray) and isinstance(s, np.ndarray) else OpsMath
    lo_h, lo_l = limbs(m, qmin, zp)
    hi_h, hi_l = limbs(m, qmax, zp)
    lo, lo_r = nearest(m, lo_h, lo_l)
    hi, hi_r = nearest(m, hi_h, hi_l)
    if not pof2:
        y_lo, y_hi = times_scale(m, lo_h, lo_l, s), times_scale(m, hi_h, hi_l, s)

    @custom_gradient
    def fq(x, s, inv):
        n = round_ops(x * inv, round_mode)
        if pof2:
            y = ops.minimum(ops.maximum(n, lo), hi) * s
        else:
            y = ops.minimum(ops.maximum(n * s, y_lo), y_hi)

        def grad(*args, upstream=None):
            dy = grad_args(args, upstream)
            # n >= L exactly: above round32(L), or equal to it where round32(L) >= L; likewise n <= H.
            ge = ops.logical_or(n > lo, ops.logical_and(n == lo, lo_r <= 0.0))
            le = ops.logical_or(n < hi, ops.logical_and(n == hi, hi_r >= 0.0))
            inside = ops.cast(ops.logical_and(ge, le), dy.dtype)
            return dy * inside, ops.zeros_like(s), ops.zeros_like(inv)

        return y, grad

    return fq(x, s, inv)


def tqt_position(log_th, bit_width: int, unsigned: bool):
    """pos = (b - 1) - ceil(log2 t) on a signed grid, b - ceil(log2 t) on an unsigned one."""
    return float(bit_width - 1 + int(unsigned)) - ops.ceil(log_th)


def tqt_forward(x, lt, bit_width: int, cmin, cmax, mmin, mmax, round_mode: RoundMode, unsigned: bool):
    """TQT's forward value and its straight-through mask (the rounded value on the grid)."""
    pos = tqt_position(lt, bit_width, unsigned)
    n = round_ops(x * pow2(pos), round_mode)
    y = ops.clip(n, cmin, cmax) * pow2(-pos)
    return y, ops.logical_and(n >= mmin, n <= mmax)


def tqt_grads(x, y, inside, dy):
    """(dL/dx, dL/dlog_th) from the upstream gradient ``dy`` (see `tqt_fake_quant`)."""
    g = ops.where(inside, y - x, y) * math.log(2.0)
    return dy * ops.cast(inside, x.dtype), ops.sum(dy * g)


def tqt_fake_quant(
    x, log_th, bit_width: int, qmin: int, qmax: int, round_mode, unsigned: bool, fused: bool = False, enabled=None
):
    """Trained-threshold power-of-2 fake quantization (Jain et al., MLSys 2020).

    Forward: pof2 fake quant at pos = (b - 1) - ceil(log_th).
    Backward, with straight-through round and ceil:
        dy/dx      = 1 where round(x / step) is on the grid, else 0;
        dy/dlog_th = ln2 * (q(x) - x) on the grid, ln2 * q(x) where clipped.

    ``fused``: on TensorFlow, run forward and backward each as one XLA kernel
    (`qstrat.quantizers.xla`; the same exact float32 operations), as training
    does: about twenty elementwise passes over an activation become two.
    ``enabled`` (fused only): a layer's on/off flag, applied inside the
    kernels (x itself, and no threshold gradient, where off).
    """
    round_mode = RoundMode(round_mode)
    lt = ops.cast(ops.convert_to_tensor(log_th), x.dtype)
    (cmin, cmax), (mmin, mmax) = grid_bounds(x.dtype, qmin, qmax)  # exact above 24 bits too (see _affine)
    if fused and keras.backend.backend() == "tensorflow" and not _FORWARD_ONLY.get():
        from qstrat.quantizers.xla import tqt_fused

        return tqt_fused(x, lt, bit_width, (cmin, cmax, mmin, mmax), round_mode, unsigned, enabled)
    if enabled is not None:
        raise ValueError("tqt_fake_quant applies enabled only in its fused TensorFlow kernels")

    @custom_gradient
    def fq(x, lt):
        y, inside = tqt_forward(x, lt, bit_width, cmin, cmax, mmin, mmax, round_mode, unsigned)

        def grad(*args, upstream=None):
            dx, dlog = tqt_grads(x, y, inside, grad_args(args, upstream))
            return dx, ops.reshape(dlog, ops.shape(lt))

        return y, grad

    return fq(x, lt)
