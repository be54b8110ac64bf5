"""Quantizer state from one training batch, in keras.ops: what ``model.fit`` recomputes at every step.

In training, `Pof2SQuantizer` takes each batch's own position (the reference
tool's policy) and `FSQuantizer` widens its range to each batch's extremes.
Both run inside the traced training step, in float32 keras.ops, and give the
values the NumPy code gives on that batch (the quantizers' ``reference_train``):

- No_OF position (`ranges.nonoverflow_pos`): the largest pos whose grid holds
  the range, pos = floor(-log2 s) with s = max(lo / qmin, hi / qmax) when
  symmetric, (hi - lo) / (qmax - qmin) when not; at most floor(-log2 epsilon),
  then clipped to [min_quantize_pos, max_quantize_pos]. A float32 log2 may fall
  on the wrong side of an integer, so it only narrows pos to four values; the
  conditions themselves decide: hi * 2^pos <= qmax and lo * 2^pos >= qmin are
  products by a power of two, exact, and the asymmetric sum carries its
  rounding error (Fast2Sum). NumPy's float64 is exact here too, but for one
  case: hi - lo rounds when |lo| and |hi| are over 2^29 apart, and NumPy may
  then keep a position whose grid misses the smaller end by less than 2^-53 of
  the range (where exact arithmetic takes the next one down).
- Min_MSE position (`ranges.pof2_mse_pos_tensor`): the best of pos0 .. pos0 + 4
  by summed squared error, ties to the lowest. What `mse_pos` compares is an
  integer per candidate: the error's sum less the part every candidate
  shares, in units of 2^-24 of the finest candidate's step squared.
  - Where the backend computes in float64 (`sums_in_float64`; on JAX within
    ``jax.enable_x64``) and the grid has up to 8 bits, each candidate's terms
    are summed in float64. While min_quantize_pos does not bind, every term
    is an integer below 2^53, so the sum is exact while it stays below 2^53
    (errors of 2^29 finest steps squared). Past that, each addition rounds
    by at most 2^-53 of the sum, so two sums may be misordered (or a tie
    missed) only when they are within 2N 2^-53 of each other, relatively, N
    the values summed.
  - Elsewhere (wider grids; torch on MPS) the terms are summed in base-256
    int32 digits, exact at any size, at several times the cost.
  NumPy sums the errors themselves in float64, exact but for its rounding
  (2^-53 per addition): the two agree unless two candidates' errors are that
  close. Exact up to 19-bit grids while min_quantize_pos does not bind (the
  batch then fits the grid at pos0, so the integers involved stay below
  2^24), with one approximation: with FLOOR, a value in (-h / 2, 0), h the
  finest candidate's step, has its error rounded to a multiple of 2^-24 h.
- FS running extremes (`widened_scale_zp`): float32 in both, the same
  operations in the same order.
"""

from __future__ import annotations

import contextlib
import contextvars

import numpy as np
from keras import ops

from qstrat.errors import UnsupportedError
from qstrat.quantizers import digit_sums, ranges
from qstrat.quantizers import fake_quant as fq
from qstrat.quantizers.exact32 import floor_log2, pow2
from qstrat.quantizers.grid import IntGrid, Method, float32_inside

PER_BATCH_METHODS = (Method.NO_OF, Method.MIN_MSE)  # the methods training recomputes; the others stay frozen
_F32 = np.float32


def rows(x, axis):
    """x as float32 (C, B, R) without gradient: channels first, then x's first other axis, then the rest.

    Integer sums run over R, then over B, so a sum never holds more than one axis's worth of values.
    """
    x = ops.cast(ops.stop_gradient(ops.convert_to_tensor(x)), "float32")
    if axis is None:
        x = ops.expand_dims(x, 0)
    else:
        x = ops.moveaxis(x, axis % len(x.shape), 0)
    if len(x.shape) == 1:
        x = ops.expand_dims(x, 1)
    b = x.shape[1] if x.shape[1] is not None else ops.shape(x)[1]
    return ops.reshape(x, (x.shape[0], b, -1))


def require_variables(q, state, what: str) -> None:
    """Refuse state that is not Keras variables: training writes it."""
    missing = [k for k in state if not hasattr(state[k], "assign")]
    if missing:
        raise UnsupportedError(
            f"{q.type_name}: training=True {what}, but {', '.join(missing)} are not variables. "
            "Call it with a layer's state (FakeQuant, QuantizeWrapper), or with training=False."
        )


# ---- power-of-2 positions -----------------------------------------------------------


def pof2_state(q, x):
    """`Pof2SQuantizer` state from the batch ``x``, as ``q.state_from_tensor(x)`` gives it: {key: tensor}."""
    p, g = q.params, q.grid
    check_zero_point_grid(q)
    r = rows(x, q.axis)
    lo, hi = across_replicas(ops.min(r, axis=(1, 2)), "min"), across_replicas(ops.max(r, axis=(1, 2)), "max")
    pos_range = (p.min_quantize_pos, p.max_quantize_pos)
    if p.method == Method.MIN_MSE:
        pos = mse_pos(r, lo, hi, g, p.symmetry, p.round_mode, p.epsilon, pos_range)
    else:
        pos = nonoverflow_pos(lo, hi, g, p.symmetry, p.epsilon, pos_range)
    shape = () if q.axis is None else (-1,)
    state = {"pos": ops.reshape(pos, shape)}
    if not p.symmetry:
        state["zero_point"] = ops.reshape(zero_point(lo, pos, g), shape)
    return state


_SAME_ON_EVERY_REPLICA = contextvars.ContextVar("qstrat_same_on_every_replica", default=False)


@contextlib.contextmanager
def same_on_every_replica():
    """Within: the quantizers quantize a weight, which every replica holds whole (no reduction across them)."""
    token = _SAME_ON_EVERY_REPLICA.set(True)
    try:
        yield
    finally:
        _SAME_ON_EVERY_REPLICA.reset(token)


def _replica_context():
    """The replica context of a ``tf.distribute`` step over more than one replica, for a state computed from
    the replica's part of the batch; else None: one device, JAX (whose batch is one array over all its
    devices already), or a weight (every replica holds the same weights)."""
    import keras

    if _SAME_ON_EVERY_REPLICA.get() or keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    ctx = tf.distribute.get_replica_context()
    return ctx if ctx is not None and ctx.num_replicas_in_sync > 1 else None


def across_replicas(x, how: str):
    """``x`` ("min", "max" or "sum") over the replicas of a ``tf.distribute`` step; ``x`` itself elsewhere.

    Under ``tf.distribute.MirroredStrategy`` each replica trains on its part of the batch; a state computed
    from the batch (a position, a range) must be the whole batch's, the same on every replica, as on one
    device. Minima, maxima and integer sums are exact in any order. The values are gathered from every
    replica of every worker (``merge_call`` would see only this worker's).
    """
    ctx = _replica_context()
    if ctx is None:
        return x
    parts = ctx.all_gather(ops.expand_dims(x, 0), axis=0)
    return {"min": ops.min, "max": ops.max, "sum": ops.sum}[how](parts, axis=0)


def check_zero_point_grid(q) -> None:
    """Refuse an asymmetric grid wider than 24 bits: its zero points need more than float32 integers."""
    p, g = q.params, q.grid
    if not p.symmetry and g.qmax - g.qmin > 2**24:
        raise UnsupportedError(
            f"{q.type_name}: training recomputes the zero point in float32, which holds it on grids of "
            f"up to 24 bits; this one has {p.bit_width}. Use symmetry true, or a bit_width up to 24."
        )


def nonoverflow_pos(lo, hi, grid: IntGrid, symmetric: bool, epsilon: float, pos_range):
    """`ranges.nonoverflow_pos` for float32 lo, hi of shape (C,): positions (C,) as float32."""
    cap = int(min(ranges.floor_neg_log2(epsilon), pos_range[1]))  # s >= epsilon, pos <= max_quantize_pos
    lo, hi = ops.minimum(lo, _F32(0.0)), ops.maximum(hi, _F32(0.0))
    if symmetric:
        s = ops.zeros_like(hi)
        if grid.qmin < 0:
            s = ops.maximum(s, lo * _F32(1.0 / grid.qmin))
        if grid.qmax > 0:
            s = ops.maximum(s, hi * _F32(1.0 / grid.qmax))
    else:
        s = (hi - lo) * _F32(1.0 / (grid.qmax - grid.qmin))
    # s is the exact ratio within a few roundings, so floor(-log2) of the exact one is in
    # [-e - 2, -e + 1] for e = floor(log2 s). The floor keeps 2^pos finite (pos <= 126).
    e = floor_log2(ops.maximum(s, _F32(2.0**-125)))
    top = _F32(1.0) - e
    pos = top - _F32(3.0)
    for k in (2.0, 1.0, 0.0):  # the conditions hold below some pos: the highest that holds wins
        c = top - _F32(k)
        pos = ops.where(_holds(lo, hi, c, grid, symmetric), c, pos)
    return ops.maximum(_F32(pos_range[0]), ops.minimum(pos, _F32(cap)))


def _holds(lo, hi, pos, grid: IntGrid, symmetric: bool):
    """Whether the grid at ``pos`` holds [lo, hi] (lo <= 0 <= hi), decided exactly."""
    w = pow2(pos)
    if symmetric:
        ok = ops.ones_like(hi) > 0
        mmin, mmax = float32_inside(grid)  # for a float32 v: v >= qmin exactly when v >= mmin
        if grid.qmin < 0:
            ok = ops.logical_and(ok, lo * w >= _F32(mmin))
        if grid.qmax > 0:
            ok = ops.logical_and(ok, hi * w <= _F32(mmax))
        return ok
    # (hi - lo) * 2^pos <= qmax - qmin, both terms exact and >= 0; t + err is their sum exactly.
    a, b = hi * w, -lo * w
    big, small = ops.maximum(a, b), ops.minimum(a, b)
    t = big + small
    err = small - (t - big)
    levels = _F32(grid.qmax - grid.qmin)  # a float32 up to 2^24 (wider asymmetric grids are refused)
    return ops.logical_or(t < levels, ops.logical_and(t == levels, err <= _F32(0.0)))


def zero_point(lo, pos, grid: IntGrid):
    """`ranges.pof2_zero_point` up to 24 bits: clip(rint(qmin - lo * 2^pos), qmin, qmax), ties to even."""
    v = -(ops.minimum(lo, _F32(0.0)) * pow2(pos))  # >= 0, exact
    n = ops.round(v)  # ties to even: rint(qmin + v) = qmin + n for an even qmin
    if grid.qmin % 2:
        # For an odd qmin the even sum is the other neighbour of a tie.
        d = v - n
        n = ops.where(ops.abs(d) == _F32(0.5), n + _F32(2.0) * d, n)
    return ops.clip(_F32(grid.qmin) + n, _F32(grid.qmin), _F32(grid.qmax))


def mse_pos(r, lo, hi, grid: IntGrid, symmetric: bool, round_mode, epsilon: float, pos_range):
    """`ranges.pof2_mse_pos_tensor` on (C, B, R) float32 rows: positions (C,), by exact error sums.

    In units of the finest candidate's step h (u = x / h), each candidate's
    error is d = u - y / h = f + i, with f = u - round(u) the same for every
    candidate and i an integer. So sum d^2 = sum f^2 + sum (i^2 + 2 f i), and
    the first sum cancels between candidates. f is a multiple of 2^-24
    wherever i can be nonzero (|u| >= 1/2), so what is compared is the integer
    sum of i^2 * 2^24 + 2 (f * 2^24) i = i (i 2^24 + 2 f 2^24), each term >= 0
    (|2 f| <= 1 <= |i| where i is nonzero): summed in float64 where every term
    is below 2^53 (grids up to 8 bits) and the backend has it
    (`sums_in_float64`), else written in base-256 digits.
    """
    p0 = nonoverflow_pos(lo, hi, grid, symmetric, epsilon, pos_range)
    cands = [ops.minimum(p0 + _F32(k), _F32(pos_range[1])) for k in range(ranges.MSE_POS_CANDIDATES)]
    scale = ops.reshape(pow2(cands[-1]), (-1, 1, 1))  # the finest step is 1 / scale
    u = r * scale
    n0 = ops.round(u)
    phi = ops.round((u - n0) * _F32(2.0**24))

    in_float64 = sums_in_float64() and digit_sums.magnitude_bits(grid) <= 14  # |i| < 2^14: every term below 2^53
    sums_scope = float64_enabled if in_float64 else contextlib.nullcontext  # float64 stays float64 within, on JAX too
    if in_float64:
        with sums_scope():
            phi64 = ops.cast(phi, "float64")
    else:
        phi_digits = digit_sums.digits_of(ops.abs(phi), 3)  # |phi| <= 2^23
        sign_phi = ops.sign(phi)
        width = digit_sums.magnitude_digits(grid)

    def error_sums(pos, shape):  # the sums (..., C, 1) or digit sums (..., C, P) of the candidates ``pos``
        zp = None if symmetric else ops.reshape(zero_point(lo, pos, grid), shape)
        y = fq.pof2_fake_quant(r, ops.reshape(pos, shape), grid.qmin, grid.qmax, round_mode, None, zp)
        i = n0 - y * scale
        if in_float64:  # i (i 2^24 + 2 phi): each term below 2^53, exact, and >= 0
            with sums_scope():
                i = ops.cast(i, "float64")
                return ops.expand_dims(ops.sum(i * (i * 2.0**24 + 2.0 * phi64), axis=(-2, -1)), -1)
        return digit_sums.error_digits(ops.abs(i), ops.sign(i) * sign_phi, phi_digits, width)

    with fq.forward_only():
        if _all_at_once(r):  # one set of ops for every candidate: a fifth of the graph to trace
            together = error_sums(ops.stack(cands), (len(cands), -1, 1, 1))
            with sums_scope():
                sums = [together[k] for k in range(len(cands))]
        else:  # one candidate at a time: a fifth of the memory
            sums = [error_sums(pos, (-1, 1, 1)) for pos in cands]
    if _replica_context() is not None:  # each replica summed its part of the batch: add them (the digits, carried)
        if in_float64:
            sums = [across_replicas(err, "sum") for err in sums]
        else:
            sums = [digit_sums.carried(across_replicas(ops.cast(err, "int32"), "sum"), 1) for err in sums]
    best_pos, best = cands[0], sums[0]
    with sums_scope():
        for pos, err in zip(cands[1:], sums[1:], strict=True):
            better = err[..., 0] < best[..., 0] if in_float64 else digit_sums.less(err, best)
            best_pos = ops.where(better, pos, best_pos)
            best = ops.where(ops.expand_dims(better, -1), err, best)
    return best_pos


def sums_in_float64() -> bool:
    """Whether `mse_pos` sums in float64: where the backend computes in it (TensorFlow; torch but on Apple's MPS;
    JAX, within `float64_enabled`). Elsewhere it sums in base-256 int32 digits, exact at any size but several times
    the operations (a pof2s QAT step on the digits CNN took 2.5x as long)."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        return _jax_x64() is not None
    if backend == "torch":
        try:
            from keras.src.backend.torch.core import get_device  # where Keras puts its tensors
        except ImportError:
            import torch

            return not torch.backends.mps.is_available()
        return not str(get_device()).startswith("mps")
    return backend == "tensorflow"


def float64_enabled():
    """Within: float64 arrays are float64 on JAX as well (``jax.enable_x64``, when ``jax_enable_x64`` is off)."""
    import keras

    if keras.backend.backend() == "jax":
        enable = _jax_x64()
        if enable is not None:
            return enable()
    return contextlib.nullcontext()


def _jax_x64():
    """A function giving a context within which JAX computes in float64 (a no-op when ``jax_enable_x64`` is on),
    or None where this JAX has none: ``jax.enable_x64`` (JAX 0.8 and later), ``jax.experimental.enable_x64``."""
    import jax

    if jax.config.jax_enable_x64:
        return contextlib.nullcontext
    if hasattr(jax, "enable_x64"):
        return lambda: jax.enable_x64(True)
    import jax.experimental

    return getattr(jax.experimental, "enable_x64", None)


_TOGETHER = 2**20  # elements of a batch (times the candidates) up to which `mse_pos` computes every candidate at once


def _all_at_once(r) -> bool:
    """Whether ``r`` has a static shape small enough that the candidates' errors fit in memory together
    (weights do; activations, with their batch size unknown while traced, go one candidate at a time)."""
    if any(d is None for d in r.shape):
        return False
    return ranges.MSE_POS_CANDIDATES * int(np.prod(r.shape)) <= _TOGETHER


# ---- float-scale running extremes -----------------------------------------------------------


def fs_state(q, x, state):
    """`FSQuantizer` (scale, zero point) after the batch ``x``: the state's range widened to x's extremes."""
    r = rows(x, q.axis)
    lo, hi = across_replicas(ops.min(r, axis=(1, 2)), "min"), across_replicas(ops.max(r, axis=(1, 2)), "max")
    if q.axis is None:
        lo, hi = lo[0], hi[0]
    scale, zero_point = (ops.convert_to_tensor(state[k].value) for k in ("scale", "zero_point"))
    return widened_scale_zp(q, ops, scale, zero_point, lo, hi)


def widened_scale_zp(q, m, scale, zero_point, lo, hi):
    """FS scale and zero point after widening the state's range to a batch's (lo, hi); ``m`` is keras.ops or NumPy.

    The state holds [(qmin - zp) * scale, (qmax - zp) * scale]; the batch
    widens it, and the scale and zero point come from the wider range
    (`_FloatScale._scale_zp`). A state still at its initial values (scale 1,
    zero point 0: uncalibrated) holds no range, so the batch's range is used
    alone. A batch inside the state's range keeps the state as it is: deriving
    it again from its own range can move it by a float32 rounding, which would
    creep over many steps.
    """
    g = q.grid
    s_lo = (_F32(g.qmin) - zero_point) * scale
    s_hi = (_F32(g.qmax) - zero_point) * scale
    empty = m.logical_and(scale == _F32(1.0), zero_point == _F32(0.0))
    inside = m.logical_and(lo >= s_lo, hi <= s_hi)
    held = m.logical_and(m.logical_not(empty), inside)
    lo = m.where(empty, lo, m.minimum(s_lo, lo))
    hi = m.where(empty, hi, m.maximum(s_hi, hi))
    s, zp = q._scale_zp(m, lo, hi)
    return m.where(held, scale, s), m.where(held, zero_point, zp)
