"""`StatsTaps`: a layer that reduces activations to calibration statistics inside the model.

Calibration only needs each activation's range (min/max) or its aligned
histogram, not the activation itself. Computing them in the probe model's
graph means a few kilobytes cross from the backend to NumPy per batch instead
of every activation, and the binning runs in the backend's kernels.

The histogram is bit-identical to `qstrat.quantizers.stats.bin_counts`: the
exponent k is the smallest with max|x| < 2^k, read exactly from the float32
exponent bits (a few integer ops, so the probe graph stays small and quick to
trace), and the bin index floor(x * 2^(log2 N - k)) is exact because the
multiplier is a power of two. On TensorFlow the counting is ``Bincount`` of
floor(x * 2^(log2 N - k)) + N (exact: integers under 2^24), which splits the
values among the CPU threads; ``HistogramFixedWidth`` would need no shift nor
cast (two ops fewer per tensor to trace) but counts in one loop, and took
about 1.5x as long on a float batch of activations (2 cores).
"""

from __future__ import annotations

import math

import keras
import numpy as np
from keras import ops

from qstrat.layers.masking import EndsMask
from qstrat.quantizers.stats import DEFAULT_BINS_PER_SIDE, EMPTY_EXPONENT, coarsen


def _exponent(amax):
    """Smallest integer k >= -126 with amax < 2^k (EMPTY_EXPONENT for 0), exact, from the float32 bits.

    A normal float32 with biased exponent field E lies in [2^(E-127), 2^(E-126)),
    so k = E - 126. Subnormals (E = 0) give -126, an upper bound that the
    caller's clamp to -114 makes irrelevant. (TensorFlow's CPU kernels flush
    subnormals to zero anyway, so a tensor of only subnormals reads as empty.)
    """
    field = ops.bitwise_and(ops.right_shift(ops.view(amax, "int32"), 23), 255)
    k = ops.cast(field - 126, "float32")
    return ops.where(amax > 0, k, ops.full_like(k, float(EMPTY_EXPONENT)))


def _pow2(e):
    """2.0 ** e for integer-valued float32 e in [-126, 127], exact, built from its bit pattern."""
    return ops.view(ops.left_shift(ops.cast(e, "int32") + 127, 23), "float32")


HISTOGRAMS = frozenset({"histogram", "share"})  # "share": of a share of each batch (``hist_rows``)


def _first_rows(x, rows: int, batch: int | None):
    """The first ``rows`` samples of the batch ``x``; of each batch, where ``x`` is batches of ``batch`` samples
    joined (a distribution's group, sharded on the batch axis, or `qstrat.passes.runner.merged`)."""
    n = x.shape[0]
    if batch and n is not None and n > batch and n % batch == 0:
        return ops.reshape(ops.reshape(x, (n // batch, batch, *x.shape[1:]))[:, :rows], (-1, *x.shape[1:]))
    if batch and n is not None and n > batch:  # whole batches, then a short one
        return ops.take(x, np.flatnonzero(np.arange(n) % batch < rows), axis=0)
    return x[:rows]


def _stats(xs, kinds, bins_per_side: int, hist_rows: int | None = None, batch: int | None = None) -> list:
    """Packed statistics of every tensor: ``[lo (T,), hi (T,), size (T,)]``, then ``[counts (H, 2n), k (H,)]``
    for the H tensors of kind "histogram" or "share", in order (their size is reported as 0).

    ``hist_rows``: the histograms of kind "share" count only the first ``hist_rows`` entries of the
    tensor's first axis (the batch's first samples; of each batch of ``batch`` samples in a group, see
    `_first_rows`); the ranges and the exponent k still come from the whole tensor.

    Everything is computed for all tensors at once where it can be (one
    stack of extremes, one exponent computation, one unstack of the scales),
    and packed into few outputs: the probe graph stays small, and its trace
    time grows with its op count.
    """
    n = bins_per_side
    kern = _kernels(n)
    xs = [ops.cast(x, "float32") for x in xs]
    los, his = [kern.min(x) for x in xs], [kern.max(x) for x in xs]
    lo, hi = ops.stack(los), ops.stack(his)
    # Element counts matter only for ranges (a histogram's is the sum of its counts).
    if "range" in kinds:
        zero = ops.zeros((), "int32")
        pairs = zip(xs, kinds, strict=True)
        sizes = ops.stack([ops.cast(ops.size(x), "int32") if kind == "range" else zero for x, kind in pairs])
    else:
        sizes = ops.zeros((len(xs),), "int32")
    out = [lo, hi, sizes]
    hist = [i for i, kind in enumerate(kinds) if kind in HISTOGRAMS]
    if not hist:
        return out
    index = ops.convert_to_tensor(hist, "int32")
    amax = ops.maximum(-ops.take(lo, index), ops.take(hi, index))
    # Exponents below -114 would overflow the float32 multiplier; such tiny
    # tensors get coarser bins, reported with the exponent actually used.
    e = _exponent(amax)
    ks = ops.where(amax > 0, ops.maximum(e, -114.0), e)
    scales = ops.where(amax > 0, _pow2(float(math.log2(n)) - ks), ops.ones_like(ks))
    # No clip needed: k comes from this tensor's own extremes, so every floor(x * scale) is in [-n, n).
    counted = [kern.first_rows(xs[i], hist_rows, batch) if hist_rows and kinds[i] == "share" else xs[i] for i in hist]
    scaled = [ops.floor(x * scale) for x, scale in zip(counted, ops.unstack(scales, len(hist)), strict=True)]
    return out + [ops.cast(ops.stack([kern.counts(f) for f in scaled]), "int32"), ks]


def _kernels(n: int = DEFAULT_BINS_PER_SIDE):
    return _TensorFlowKernels(n) if keras.backend.backend() == "tensorflow" else _KerasKernels(n)


class _KerasKernels:
    """The per-tensor operations of `_stats` and `ChannelSumTaps`, in Keras ops (torch, JAX)."""

    def __init__(self, n: int):
        self.n = n

    def channel_sums(self, x):
        return per_sample_channel_sums(x)

    def min(self, x):
        return ops.min(x)

    def max(self, x):
        return ops.max(x)

    def first_rows(self, x, rows: int, batch: int | None):
        return _first_rows(x, rows, batch)

    def counts(self, f):
        """The histogram of integer-valued floats ``f`` in [-n, n), in 2n bins."""
        return _bincount(ops.cast(ops.reshape(f, (-1,)), "int32") + self.n, 2 * self.n)


class _TensorFlowKernels(_KerasKernels):
    """The same operations on TensorFlow: one op each, their constant operands made once.

    The probe's trace time grows with the ops it makes; ``ops.min`` or a
    slice would make one or three constants per tensor beside the op itself
    (`bench/traces.py` prints the probe's op count).
    """

    def __init__(self, n: int):
        import tensorflow as tf

        super().__init__(n)
        self.tf, self._consts, self._range = tf, {}, None

    def _const(self, values):
        values = tuple(int(v) for v in values)
        if values not in self._consts:
            self._consts[values] = self.tf.constant(values, self.tf.int32, shape=(len(values),))
        return self._consts[values]

    def channel_sums(self, x):
        x = self.tf.cast(x, self.tf.float32)
        if len(x.shape) <= 2:
            return x
        return self.tf.raw_ops.Sum(input=x, axis=self._const(range(1, len(x.shape) - 1)))

    def min(self, x):
        return self.tf.raw_ops.Min(input=x, axis=self._const(range(len(x.shape))))

    def max(self, x):
        return self.tf.raw_ops.Max(input=x, axis=self._const(range(len(x.shape))))

    def first_rows(self, x, rows: int, batch: int | None):
        if not batch:
            ends = self._const([rows])  # beyond the batch's end: the whole batch, as x[:rows]
            return self.tf.raw_ops.StridedSlice(input=x, begin=self._const([0]), end=ends, strides=self._const([1]))
        # The traced batch axis is open: one batch or several joined (`qstrat.passes.runner.merged`). The rows
        # to count are found once per trace, from the first tensor's length (every tapped tensor's first axis
        # is the batch's).
        if (rows, batch) not in self._consts:
            tf = self.tf
            index = tf.range(tf.shape(x, out_type=tf.int32)[0])
            self._consts[rows, batch] = tf.reshape(tf.where(tf.math.floormod(index, batch) < rows), [-1])
            self._consts["axis"] = tf.constant(0, tf.int32)
        return self.tf.raw_ops.GatherV2(params=x, indices=self._consts[rows, batch], axis=self._consts["axis"])

    def counts(self, f):
        # Bin floor(x * scale) + n (exact: integers under 2^24), counted by Bincount, which splits the values
        # among the threads (see the module's docstring).
        if self._range is None:
            self._range = self.tf.constant(float(self.n)), self.tf.constant(2 * self.n), self.tf.zeros([0], "int32")
        shift, bins, unweighted = self._range
        index = self.tf.cast(f + shift, self.tf.int32)
        return self.tf.raw_ops.Bincount(arr=index, size=bins, weights=unweighted)


def _bincount(idx, length: int):
    """Counts of each value of ``idx`` (all in [0, length)), as one kernel (torch, JAX)."""
    if keras.backend.backend() == "jax":
        # JAX's bincount needs a concrete length under jit; segment_sum takes a static one.
        return ops.segment_sum(ops.ones_like(idx), idx, num_segments=length)
    return ops.bincount(idx, minlength=length)


def _spec(kinds, bins_per_side: int) -> list:
    t, h = len(kinds), sum(kind in HISTOGRAMS for kind in kinds)
    out = [keras.KerasTensor((t,), dtype="float32"), keras.KerasTensor((t,), dtype="float32")]
    out.append(keras.KerasTensor((t,), dtype="int32"))
    if h:
        out += [keras.KerasTensor((h, 2 * bins_per_side), dtype="int32"), keras.KerasTensor((h,), dtype="float32")]
    return out


def unpack_stats(outs, kinds) -> list[list]:
    """Per tensor, from `StatsTaps`' packed outputs (NumPy): ``[min, max, size]`` or ``[counts, exponent, min, max]``."""
    lo, hi, size = (np.asarray(o) for o in outs[:3])
    counts, ks = (np.asarray(o) for o in outs[3:5]) if len(outs) > 3 else (None, None)
    per, h = [], 0
    for i, kind in enumerate(kinds):
        if kind in HISTOGRAMS:
            per.append([counts[h], ks[h], lo[i], hi[i]])
            h += 1
        else:
            per.append([lo[i], hi[i], size[i]])
    return per


LEVELS = 4  # the exponents a histogram's sum is kept at (`PackedStats`) before the lowest two merge


class PackedStats:
    """`StatsTaps`' packed statistics of many batches, summed exactly: ``add`` each batch's, then
    ``per_tensor()`` gives what `unpack_stats` gives for one batch, for all of them.

    Ranges take the minimum and maximum and add the element counts. A
    histogram's batches are added at their own exponent: one sum per exponent
    met, at most `LEVELS` of them (the lowest two merge, `coarsen`ed, beyond
    that). ``per_tensor`` aligns the sums to the largest exponent (`coarsen`:
    exact, since the bins are power-of-2 aligned) and adds them, so the total
    equals the histogram of all the values, whatever the order of the
    batches. Most batches meet an exponent already held, and cost one
    addition; re-binning a batch to the largest exponent so far on arrival
    was most of the Python time of a calibration pass. An observer then takes
    one update per tensor instead of one per batch, with the same result as
    its exact merge of the batches (`qstrat.calibration.HistogramObserver`).
    """

    def __init__(self, kinds):
        self.kinds = list(kinds)
        self.lo = self.hi = self.size = None
        self.levels: list[dict[int, np.ndarray]] | None = None  # per histogram: {exponent: int64 counts}

    @property
    def k(self) -> np.ndarray | None:
        """Each histogram's largest exponent so far (that of `per_tensor`'s counts)."""
        return None if self.levels is None else np.array([max(held) for held in self.levels], np.int64)

    def add(self, outs) -> bool:
        """Add one batch's packed outputs; False (nothing added) where a range is not finite (NaN, Inf)."""
        lo, hi, size = (np.asarray(o) for o in outs[:3])
        if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
            return False
        if self.lo is None:
            self.lo, self.hi, self.size = lo.astype(np.float32), hi.astype(np.float32), size.astype(np.int64)
        else:
            self.lo, self.hi = np.minimum(self.lo, lo), np.maximum(self.hi, hi)
            self.size += size
        if len(outs) > 3:
            counts, ks = np.asarray(outs[3]), np.asarray(outs[4]).astype(np.int64).tolist()
            if self.levels is None:
                self.levels = [{} for _ in ks]
            for held, row, k in zip(self.levels, counts, ks, strict=True):
                if k in held:
                    np.add(held[k], row, out=held[k], casting="unsafe")
                    continue
                held[k] = row.astype(np.int64)
                if len(held) > LEVELS:
                    low = min(held)
                    nxt = min(e for e in held if e > low)
                    held[nxt] += coarsen(held.pop(low), nxt - low)
        return True

    def per_tensor(self) -> list[list]:
        """Per tensor, over every batch added: ``[min, max, size]`` or ``[counts, exponent, min, max]``."""
        outs = [self.lo, self.hi, self.size]
        if self.levels is not None:
            top = self.k
            counts = [
                sum(coarsen(c, int(t) - e) for e, c in held.items()) for held, t in zip(self.levels, top, strict=True)
            ]
            outs += [np.stack(counts), top]
        return unpack_stats(outs, self.kinds)


class StatsTaps(EndsMask, keras.layers.Layer):
    """Reduce each tensor to its range (kind "range") or its aligned histogram (kind "histogram"; "share":
    of each batch's first ``hist_rows`` samples, all of them where ``hist_rows`` is None), packed.

    Outputs: see `_stats`; `unpack_stats` gives each tensor's statistics.
    ``batch``: the batch size, which tells a group of batches from one batch.
    """

    def __init__(self, kinds: list[str], bins_per_side: int = 8192, hist_rows: int | None = None, batch=None, **kwargs):
        super().__init__(**kwargs)
        self.kinds = list(kinds)
        self.bins_per_side = bins_per_side
        self.hist_rows = hist_rows
        self.batch = batch

    def call(self, xs):
        return _stats(list(xs), self.kinds, self.bins_per_side, self.hist_rows, self.batch)

    def compute_output_spec(self, xs):
        return _spec(self.kinds, self.bins_per_side)

    def get_config(self):
        config = {"kinds": self.kinds, "bins_per_side": self.bins_per_side}
        config.update(hist_rows=self.hist_rows, batch=self.batch)
        return {**super().get_config(), **config}


def per_sample_channel_sums(x):
    """(samples, channels): each sample's sum over every axis but the first and the last, in float32 (bias
    correction's float and quantized means both start from these)."""
    x = ops.cast(x, "float32")
    axes = tuple(range(1, len(x.shape) - 1))
    return ops.sum(x, axis=axes) if axes else x


class ChannelSumTaps(EndsMask, keras.layers.Layer):
    """`per_sample_channel_sums` of each tensor: (samples, channels) each."""

    def call(self, xs):
        kern = _kernels()
        return [kern.channel_sums(x) for x in xs]

    def compute_output_spec(self, xs):
        return [keras.KerasTensor((None, x.shape[-1]), dtype="float32") for x in xs]


def tap_stats(x, kind: str, bins_per_side: int = 8192, hist_rows: int | None = None, batch=None) -> list:
    """One tensor's statistics, ``[min, max, size]`` or ``[counts, exponent, min, max]`` (NumPy)."""
    outs = StatsTaps([kind], bins_per_side, hist_rows, batch)([x])
    return unpack_stats([ops.convert_to_numpy(o) for o in outs], [kind])[0]
