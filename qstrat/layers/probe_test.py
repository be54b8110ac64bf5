"""StatsTaps computes, inside the model, exactly the statistics the NumPy observers compute."""

import keras
import numpy as np
import pytest
from keras import ops

from qstrat.calibration import HistogramObserver, MinMaxObserver
from qstrat.layers.probe import StatsTaps, tap_stats, unpack_stats
from qstrat.quantizers.stats import DEFAULT_BINS_PER_SIDE, bin_counts, histogram_of_rows

pytestmark = pytest.mark.portable

CASES = [
    np.random.default_rng(0).standard_t(3, size=(4, 50, 3)).astype("float32"),
    np.maximum(np.random.default_rng(1).normal(size=(2, 300)), 0).astype("float32") * 7,
    np.full((3, 4), 2.0, "float32"),  # a maximum that is exactly a power of two
    np.full((3, 4), -0.5, "float32"),
    np.zeros((2, 5), "float32"),
    (np.random.default_rng(2).normal(size=(64,)) * 1e-20).astype("float32"),
    np.array([1e-37, -3e-37, 0.0], "float32"),  # tiny normals: the coarsest bins (k clamped to -114)
    np.array([3e37, -1.5, 2.0**-126], "float32"),
    np.array([np.nextafter(np.float32(4.0), np.float32(0.0)), 1.0], "float32"),  # just below a power of two
]


@pytest.mark.parametrize("x", CASES)
def test_in_graph_histogram_is_bit_identical(x):
    counts, k, lo, hi = tap_stats(ops.convert_to_tensor(x), "histogram")
    direct = histogram_of_rows(x.reshape(1, -1)).channel(0)
    if np.abs(x).max() > 0:
        # Below 2^-114 the in-graph bins are coarser (a float32 multiplier limit): the exponent says so.
        assert int(k) == max(int(direct.exponent), -114)
        assert np.array_equal(counts, bin_counts(x.reshape(-1), int(k), DEFAULT_BINS_PER_SIDE))
    assert int(k) >= int(direct.exponent) and (int(k) > -114 or np.abs(x).max() < 2.0**-114)
    if int(k) == int(direct.exponent):
        assert np.array_equal(counts, direct.counts)
    assert float(lo) == x.min() and float(hi) == x.max()


def test_observers_take_precomputed_statistics():
    xs = [c for c in CASES[:2]]
    a, b = HistogramObserver(), HistogramObserver()
    m1, m2 = MinMaxObserver(), MinMaxObserver()
    for x in xs:
        a.update(x)
        m1.update(x)
        counts, k, lo, hi = tap_stats(ops.convert_to_tensor(x), "histogram")
        b.update_histogram(counts, int(k), lo, hi, x.size)
        lo, hi, size = tap_stats(ops.convert_to_tensor(x), "range")
        assert int(size) == x.size
        m2.update_range(lo, hi, int(size))
    ra, rb = a.result(), b.result()
    assert np.array_equal(ra.counts, rb.counts) and int(ra.exponent) == int(rb.exponent) and ra.count == rb.count
    assert float(m1.result().max) == float(m2.result().max) and m1.result().count == m2.result().count


def test_probe_model_with_taps():
    i = keras.Input((10,))
    x = keras.layers.Dense(4)(i)
    out = StatsTaps(["range", "histogram"], bins_per_side=256)([i, x])
    m = keras.Model(i, out)
    (lo, hi, size), (counts, k, _, _) = unpack_stats(
        m.predict_on_batch(np.ones((3, 10), "float32")), ["range", "histogram"]
    )
    assert counts.shape == (512,) and counts.sum() == 12
    assert float(lo) == float(hi) == 1.0 and int(size) == 30


def test_stats_taps_give_each_tensor_what_it_gives_alone():
    xs = CASES[:4] + CASES[6:8]
    kinds = ["histogram", "range", "histogram", "histogram", "range", "histogram"]
    outs = StatsTaps(kinds)([ops.convert_to_tensor(x) for x in xs])
    together = unpack_stats([ops.convert_to_numpy(t) for t in outs], kinds)
    alone = [tap_stats(ops.convert_to_tensor(x), k) for x, k in zip(xs, kinds, strict=True)]
    assert [len(t) for t in together] == [4, 3, 4, 4, 3, 4]
    for a, b in zip(together, alone, strict=True):
        for u, v in zip(a, b, strict=True):
            assert np.array_equal(u, v)


@pytest.mark.parametrize("rows", [1, 2, 3])
def test_share_histograms_count_the_first_samples_with_the_whole_batchs_range_and_bins(rows):
    # The largest value is in the last sample: the subset's counts must still use the whole batch's exponent.
    x = np.random.default_rng(3).normal(size=(4, 30)).astype("float32")
    x[3, 7] = 9.5
    whole = tap_stats(ops.convert_to_tensor(x), "histogram")
    assert np.array_equal(tap_stats(ops.convert_to_tensor(x), "histogram", hist_rows=rows)[0], whole[0])  # all
    counts, k, lo, hi = tap_stats(ops.convert_to_tensor(x), "share", hist_rows=rows)
    assert int(k) == int(whole[1]) == 4  # 9.5 < 2^4: set by the sample the histogram leaves out
    assert float(lo) == x.min() and float(hi) == x.max() == np.float32(9.5)
    assert counts.sum() == rows * 30
    assert np.array_equal(counts, bin_counts(x[:rows].reshape(-1), 4, DEFAULT_BINS_PER_SIDE))
    obs = HistogramObserver()
    obs.update(x, counted=rows)  # the NumPy observer's twin of the same subset
    got = obs.result()
    assert np.array_equal(got.counts, counts) and int(got.exponent) == 4 and got.count == rows * 30
    assert float(got.max) == np.float32(9.5)


def test_a_batch_shorter_than_the_share_is_counted_whole():
    x = np.random.default_rng(6).normal(size=(3, 5)).astype("float32")
    counts, k, _, _ = tap_stats(ops.convert_to_tensor(x), "share", hist_rows=8)
    assert np.array_equal(counts, bin_counts(x.reshape(-1), int(k), DEFAULT_BINS_PER_SIDE))


def test_a_group_of_batches_counts_the_first_samples_of_each():
    # A distribution runs a group of whole batches as one array: each batch's first samples are counted.
    x = np.random.default_rng(4).normal(size=(12, 5)).astype("float32")  # three batches of 4
    counts, k, lo, hi = tap_stats(ops.convert_to_tensor(x), "share", hist_rows=2, batch=4)
    first = np.concatenate([x[0:2], x[4:6], x[8:10]])
    assert np.array_equal(counts, bin_counts(first.reshape(-1), int(k), DEFAULT_BINS_PER_SIDE))
    assert float(lo) == x.min() and float(hi) == x.max()


@pytest.mark.parametrize("n", [4, 12, 10, 3])
def test_a_traced_probe_counts_the_first_samples_of_each_joined_batch(n):
    # The calibration probe runs with its batch axis open, on one batch or several joined (batches of 4 here,
    # and a short last one for n = 10): each batch's first two samples are counted, whatever n.
    from qstrat.passes.runner import BatchRunner

    i = keras.Input((5,))
    runner = BatchRunner(keras.Model(i, StatsTaps(["share"], hist_rows=2, batch=4)([i])))
    x = np.random.default_rng(5).normal(size=(n, 5)).astype("float32")
    counts, k, lo, hi = unpack_stats(runner([x]), ["share"])[0]
    first = x[(np.arange(n) % 4) < 2]
    assert len(first) == {4: 2, 12: 6, 10: 6, 3: 2}[n]
    assert np.array_equal(counts, bin_counts(first.reshape(-1), int(k), DEFAULT_BINS_PER_SIDE))
    assert float(lo) == x.min() and float(hi) == x.max()


@pytest.mark.parametrize("levels", [1, 2, 4])
def test_packed_statistics_of_many_batches_equal_the_observers_updated_batch_by_batch(levels, monkeypatch):
    """`PackedStats` sums each batch's packed outputs (ranges; histograms at each exponent met, aligned to the
    largest at the end, from empty tensors up; with ``levels`` sums held at most per histogram, the lowest two
    merged beyond that) and gives the observers what they get from every batch in turn: the same counts,
    exponent, range and size, exactly."""
    from qstrat.layers import probe
    from qstrat.layers.probe import PackedStats

    monkeypatch.setattr(probe, "LEVELS", levels)

    rng = np.random.default_rng(5)
    kinds = ["histogram", "range", "share", "histogram"]
    scales = [[1.0, 40.0, 0.01, 0.0, 3.0], [2.0, 0.5, 900.0, 1e-3, 1.0], [0.0, 0.0, 5.0, 0.25, 70.0]]
    packed, observers = PackedStats(kinds), []
    for b in range(5):
        xs = [(rng.standard_t(3, size=(4, 6, 3)) * s[b]).astype("float32") for s in (scales[0], scales[1], scales[2])]
        xs.append(np.zeros((4, 2), "float32") if b < 2 else xs[0] * -3)  # empty at first, then it grows
        outs = [ops.convert_to_numpy(t) for t in StatsTaps(kinds, hist_rows=2)([ops.convert_to_tensor(x) for x in xs])]
        assert packed.add(outs)
        for i, got in enumerate(unpack_stats(outs, kinds)):
            if b == 0:
                observers.append(MinMaxObserver() if kinds[i] == "range" else HistogramObserver())
            if kinds[i] == "range":
                observers[i].update_range(got[0], got[1], int(got[2]))
            else:
                observers[i].update_histogram(got[0], int(got[1]), got[2], got[3], int(np.sum(got[0])))
    assert len({int(k) for k in packed.k}) == 3  # the histograms ended at different exponents
    held = [len(h) for h in packed.levels]
    assert max(held) == levels  # the first histogram met five exponents: more than any ``levels`` here held
    for obs, kind, got in zip(observers, kinds, packed.per_tensor(), strict=True):
        one = MinMaxObserver() if kind == "range" else HistogramObserver()
        if kind == "range":
            one.update_range(got[0], got[1], int(got[2]))
        else:
            one.update_histogram(got[0], int(got[1]), got[2], got[3], int(np.sum(got[0])))
        want, have = obs.result(), one.result()
        assert float(want.min) == float(have.min) and float(want.max) == float(have.max)
        assert want.count == have.count
        if kind != "range":
            assert np.array_equal(want.counts, have.counts) and int(want.exponent) == int(have.exponent)


def test_packed_statistics_refuse_a_batch_that_is_not_finite():
    from qstrat.layers.probe import PackedStats

    packed = PackedStats(["range", "histogram"])
    good = [ops.convert_to_tensor(np.ones((2, 3), "float32")), ops.convert_to_tensor(np.ones((2, 3), "float32"))]
    outs = [ops.convert_to_numpy(t) for t in StatsTaps(packed.kinds)(good)]
    assert packed.add(outs)
    for bad in (np.nan, np.inf):
        lo = outs[0].copy()
        lo[1] = bad
        assert not packed.add([lo, *outs[1:]])
    (lo, hi, size), (counts, k, _, _) = packed.per_tensor()
    assert int(size) == 6 and counts.sum() == 6 and float(lo) == 1.0  # the good batch only
