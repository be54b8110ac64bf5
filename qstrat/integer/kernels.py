"""NumPy integer kernels: convolutions, pooling and resampling on int64 arrays.

Why: `qstrat.integer` runs a quantized model the way integer hardware does,
and checks it against the fake-quant Keras model bit for bit. These kernels
are the integer arithmetic: no float, no rounding. Positions (what the
integers mean) are the executor's business; here an array is just integers.

Layout is channels last, batch first, any number of spatial axes (1-D, 2-D,
3-D). Padding follows Keras (TensorFlow's SAME rule: the extra pad goes
after), ``"causal"`` pads before. A convolution is a sum over kernel offsets of
strided slices times the kernel tap (`np.tensordot` on int64), so nothing here
depends on BLAS or float accumulation.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from qstrat.errors import UnsupportedError


def padding_amounts(length: int, k_eff: int, stride: int, padding: str) -> tuple[int, int]:
    """(before, after) zeros along one axis: SAME puts the odd pad after, causal puts all before."""
    if padding == "valid":
        return 0, 0
    if padding == "causal":
        return k_eff - 1, 0
    if padding != "same":
        raise UnsupportedError(f'padding "{padding}" is not one of "valid", "same", "causal"')
    out = -(-length // stride)
    total = max((out - 1) * stride + k_eff - length, 0)
    return total // 2, total - total // 2


def _tuple(v, n: int) -> tuple[int, ...]:
    return tuple(int(a) for a in v) if isinstance(v, (tuple, list)) else (int(v),) * n


def _padded(x: np.ndarray, kernel, strides, dilation, padding: str, fill: int = 0):
    """``x`` padded for the windows, and the output's spatial shape."""
    pads, out = [(0, 0)], []
    for length, k, s, d in zip(x.shape[1:-1], kernel, strides, dilation, strict=True):
        k_eff = (k - 1) * d + 1
        before, after = padding_amounts(length, k_eff, s, padding)
        pads.append((before, after))
        out.append((length + before + after - k_eff) // s + 1)
    pads.append((0, 0))
    if any(o < 1 for o in out):
        raise UnsupportedError(f"a window of {tuple(kernel)} does not fit a spatial shape of {x.shape[1:-1]}")
    if any(p != (0, 0) for p in pads):
        x = np.pad(x, pads, constant_values=fill)
    return x, tuple(out)


def _windows(x, kernel, strides, dilation, out):
    """(kernel offset, strided slice of x) for every tap of the window."""
    for offset in itertools.product(*(range(k) for k in kernel)):
        index = [slice(None)]
        for o, s, d, n in zip(offset, strides, dilation, out, strict=True):
            index.append(slice(o * d, o * d + (n - 1) * s + 1, s))
        yield offset, x[tuple(index)]


def conv(x, w, strides=1, padding="valid", dilation=1, groups: int = 1) -> np.ndarray:
    """Integer convolution: x (N, *S, C), w (*K, C / groups, O) -> (N, *S', O), as Keras ConvND.

    Example:
        >>> conv(np.ones((1, 4, 1), np.int64), np.ones((3, 1, 1), np.int64))[0, :, 0]
        array([3, 3])
    """
    x, w = np.asarray(x, np.int64), np.asarray(w, np.int64)
    nd = w.ndim - 2
    kernel, strides, dilation = w.shape[:nd], _tuple(strides, nd), _tuple(dilation, nd)
    xp, out = _padded(x, kernel, strides, dilation, padding)
    c, o = x.shape[-1], w.shape[-1]
    if c != w.shape[-2] * groups or o % groups:
        raise UnsupportedError(f"conv: {c} input channels do not match a kernel of shape {w.shape} in {groups} groups")
    cg, og = c // groups, o // groups
    acc = np.zeros((x.shape[0], *out, o), np.int64)
    for offset, window in _windows(xp, kernel, strides, dilation, out):
        tap = w[offset]
        for g in range(groups):
            part = np.tensordot(window[..., g * cg : (g + 1) * cg], tap[:, g * og : (g + 1) * og], axes=([-1], [0]))
            acc[..., g * og : (g + 1) * og] += part
    return acc


def depthwise_conv(x, w, strides=1, padding="valid", dilation=1) -> np.ndarray:
    """Integer depthwise convolution: x (N, *S, C), w (*K, C, M) -> (N, *S', C * M), channel c * M + m."""
    x, w = np.asarray(x, np.int64), np.asarray(w, np.int64)
    nd = w.ndim - 2
    kernel, strides, dilation = w.shape[:nd], _tuple(strides, nd), _tuple(dilation, nd)
    xp, out = _padded(x, kernel, strides, dilation, padding)
    c, m = w.shape[-2:]
    if x.shape[-1] != c:
        raise UnsupportedError(f"depthwise conv: {x.shape[-1]} input channels, a kernel of shape {w.shape}")
    acc = np.zeros((x.shape[0], *out, c, m), np.int64)
    for offset, window in _windows(xp, kernel, strides, dilation, out):
        acc += window[..., :, None] * w[offset]
    return acc.reshape(*acc.shape[:-2], c * m)


def conv_transpose_length(length, kernel, stride, padding, dilation=1, output_padding=None) -> int:
    """Keras' output length of a transposed convolution."""
    k_eff = (kernel - 1) * dilation + 1
    if output_padding is None:
        return length * stride + (max(k_eff - stride, 0) if padding == "valid" else 0)
    pad = k_eff // 2 if padding == "same" else 0
    return (length - 1) * stride + k_eff - 2 * pad + output_padding


def conv_transpose(x, w, strides=1, padding="valid", dilation=1, output_padding=None) -> np.ndarray:
    """Integer transposed convolution: x (N, *S, C), w (*K, O, C) -> (N, *S', O), as Keras ConvNDTranspose.

    It is the adjoint of the forward convolution of an (N, *S', O) input with
    the same kernel, strides and padding (TensorFlow's definition): each input
    position scatters its taps ``x[i] @ w[k].T`` to ``i * stride + k * dilation``,
    and the padding the forward convolution would add is cut off.
    """
    x, w = np.asarray(x, np.int64), np.asarray(w, np.int64)
    nd = w.ndim - 2
    kernel, strides, dilation = w.shape[:nd], _tuple(strides, nd), _tuple(dilation, nd)
    out_pad = (None,) * nd if output_padding is None else _tuple(output_padding, nd)
    lengths = [
        conv_transpose_length(n, k, s, padding, d, p)
        for n, k, s, d, p in zip(x.shape[1:-1], kernel, strides, dilation, out_pad, strict=True)
    ]
    befores = [
        padding_amounts(n, (k - 1) * d + 1, s, padding)[0]
        for n, k, s, d in zip(lengths, kernel, strides, dilation, strict=True)
    ]
    spans = [(n - 1) * s + (k - 1) * d + 1 for n, k, s, d in zip(x.shape[1:-1], kernel, strides, dilation, strict=True)]
    full = [max(span, b + n) for span, b, n in zip(spans, befores, lengths, strict=True)]
    buf = np.zeros((x.shape[0], *full, w.shape[-2]), np.int64)
    for offset in itertools.product(*(range(k) for k in kernel)):
        index = [slice(None)]
        for o, s, d, n in zip(offset, strides, dilation, x.shape[1:-1], strict=True):
            index.append(slice(o * d, o * d + (n - 1) * s + 1, s))
        buf[tuple(index)] += np.tensordot(x, w[offset], axes=([-1], [1]))
    crop = (slice(None), *(slice(b, b + n) for b, n in zip(befores, lengths, strict=True)))
    return buf[crop]


def dense(x, w) -> np.ndarray:
    """Integer matrix product over the last axis: x (..., I), w (I, O) -> (..., O)."""
    return np.tensordot(np.asarray(x, np.int64), np.asarray(w, np.int64), axes=([-1], [0]))


# ---- pooling --------------------------------------------------------------------------------------

_VERY_NEGATIVE = np.iinfo(np.int64).min


def max_pool(x, pool, strides=None, padding="valid") -> np.ndarray:
    """Window maximum; 'same' padding is ignored (the pads never win), as Keras does."""
    x = np.asarray(x, np.int64)
    nd = x.ndim - 2
    pool = _tuple(pool, nd)
    strides = pool if strides is None else _tuple(strides, nd)
    xp, out = _padded(x, pool, strides, (1,) * nd, padding, fill=_VERY_NEGATIVE)
    result = None
    for _, window in _windows(xp, pool, strides, (1,) * nd, out):
        result = window.copy() if result is None else np.maximum(result, window)
    return result


def sum_pool(x, pool, strides=None, padding="valid") -> np.ndarray:
    """Window sum (zeros where a 'same' window reads padding)."""
    x = np.asarray(x, np.int64)
    nd = x.ndim - 2
    pool = _tuple(pool, nd)
    strides = pool if strides is None else _tuple(strides, nd)
    xp, out = _padded(x, pool, strides, (1,) * nd, padding)
    acc = np.zeros((x.shape[0], *out, x.shape[-1]), np.int64)
    for _, window in _windows(xp, pool, strides, (1,) * nd, out):
        acc += window
    return acc


def window_count(spatial, pool, strides=None, padding="valid") -> np.ndarray | int:
    """How many input elements each window reads: an int for 'valid', else (1, *S', 1) counts."""
    nd = len(spatial)
    pool = _tuple(pool, nd)
    if padding == "valid":
        return math.prod(pool)
    ones = np.ones((1, *spatial, 1), np.int64)
    return sum_pool(ones, pool, strides, padding)


def upsample(x, size) -> np.ndarray:
    """Nearest-neighbour upsampling: each spatial axis repeated ``size`` times."""
    x = np.asarray(x)
    for axis, s in enumerate(_tuple(size, x.ndim - 2), start=1):
        x = np.repeat(x, s, axis=axis)
    return x


def zero_pad(x, padding, fill=0) -> np.ndarray:
    """``padding`` ((before, after) per spatial axis) of ``fill`` around the spatial axes."""
    return np.pad(np.asarray(x), [(0, 0), *padding, (0, 0)], constant_values=fill)


def crop(x, cropping) -> np.ndarray:
    """``cropping`` ((before, after) per spatial axis) cut from the spatial axes."""
    index = [slice(None)]
    for (before, after), n in zip(cropping, np.shape(x)[1:-1], strict=False):
        index.append(slice(before, n - after))
    return np.asarray(x)[tuple(index)]
