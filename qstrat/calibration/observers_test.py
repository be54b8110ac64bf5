"""Observers stream, merge exactly, keep constant memory and reject bad data clearly."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qstrat.calibration import HistogramObserver, MinMaxObserver, MovingAverageObserver, PositionVoteObserver
from qstrat.errors import CalibrationDataError, UnsupportedError
from qstrat.quantizers import Pof2SQuantizer
from qstrat.quantizers.stats import coarsen, histogram_of_rows

pytestmark = pytest.mark.portable


def batches(seed, n, shape=(16, 5), growth=3.0):
    rng = np.random.default_rng(seed)
    return [(rng.standard_t(4, size=shape) * (1 + growth * i / n)).astype(np.float32) for i in range(n)]


def feed(obs, bs):
    for b in bs:
        obs.update(b)
    return obs


def same_hist(a, b):
    return (
        np.array_equal(a.counts, b.counts)
        and np.array_equal(a.exponent, b.exponent)
        and np.array_equal(a.min, b.min)
        and np.array_equal(a.max, b.max)
        and a.count == b.count
    )


def test_minmax_tracks_extremes_per_tensor_and_per_channel():
    bs = batches(0, 5)
    allx = np.concatenate(bs)
    r = feed(MinMaxObserver(), bs).result()
    assert float(r.min) == allx.min() and float(r.max) == allx.max() and r.count == allx.size
    r = feed(MinMaxObserver(axis=-1), bs).result()
    assert np.array_equal(r.max, allx.max(axis=0)) and r.min.shape == (5,)


def test_two_halves_equal_one_pass():
    bs = batches(1, 6)
    whole = np.concatenate(bs)
    for make in (MinMaxObserver, HistogramObserver, lambda: HistogramObserver(axis=1)):
        one = make()
        one.update(whole)
        two = feed(make(), bs)
        a, b = one.result(), two.result()
        if hasattr(a, "counts"):
            assert same_hist(a, b)
        else:
            assert np.array_equal(a.min, b.min) and np.array_equal(a.max, b.max) and a.count == b.count


def test_histogram_rebinning_is_exact():
    bs = batches(2, 10, growth=50.0)  # the range grows many times over
    obs = feed(HistogramObserver(bins_per_side=512), bs)
    direct = histogram_of_rows(np.concatenate(bs).reshape(1, -1), bins_per_side=512).channel(0)
    assert same_hist(obs.result(), direct)
    assert obs.result().counts.sum() == sum(b.size for b in bs)


def test_coarsen_merges_aligned_runs():
    c = np.arange(16)  # 8 bins per side
    assert np.array_equal(coarsen(c, 1), [0, 0, 0, 0, 1, 5, 9, 13, 17, 21, 25, 29, 0, 0, 0, 0])
    assert coarsen(c, 10).sum() == c.sum() and coarsen(c, 10)[7] == c[:8].sum()


@given(
    seed=st.integers(0, 10_000),
    n=st.integers(2, 12),
    cuts=st.lists(st.integers(0, 12), min_size=1, max_size=4),
    axis=st.sampled_from([None, 1]),
    kind=st.sampled_from(["minmax", "hist", "votes"]),
)
def test_merging_shards_equals_one_pass(seed, n, cuts, axis, kind):
    bs = batches(seed, n, growth=20.0)
    q = Pof2SQuantizer(method="Min_MSE", per_channel=axis is not None, channel_axis=axis or -1)

    def make():
        if kind == "minmax":
            return MinMaxObserver(axis=axis)
        if kind == "hist":
            return HistogramObserver(bins_per_side=256, axis=axis)
        return PositionVoteObserver(lambda b: q.state_from_tensor(b)["pos"], axis=axis)

    single = feed(make(), bs)
    edges = sorted({min(c, n) for c in cuts} | {0, n})
    shards = [feed(make(), bs[a:b]) for a, b in zip(edges[:-1], edges[1:], strict=True)]
    merged = make()
    for s in shards[::-1]:  # merge order must not matter either
        merged.merge(s)
    a, b = single.result(), merged.result()
    if kind == "hist":
        assert same_hist(a, b)
    elif kind == "minmax":
        assert np.array_equal(a.min, b.min) and np.array_equal(a.max, b.max) and a.count == b.count
    else:
        assert np.array_equal(a, b)


def test_moving_average_merge_continues_the_sequence():
    bs = batches(3, 9)
    one = feed(MovingAverageObserver(0.9), bs)
    first, second = feed(MovingAverageObserver(0.9), bs[:4]), feed(MovingAverageObserver(0.9), bs[4:])
    merged = first.merge(second)
    assert np.allclose(one.result().max, merged.result().max, rtol=1e-12)
    assert np.allclose(one.result().min, merged.result().min, rtol=1e-12)
    assert merged.steps == 9


def test_memory_does_not_grow_with_batches():
    for obs in (HistogramObserver(), MinMaxObserver(), MovingAverageObserver(0.99), HistogramObserver(axis=-1)):
        obs.update(batches(4, 1)[0])
        size = obs.nbytes
        feed(obs, batches(5, 50, growth=100.0))
        assert obs.nbytes == size, type(obs).__name__


def test_reset_clears_state():
    obs = feed(HistogramObserver(), batches(6, 3))
    obs.reset()
    with pytest.raises(UnsupportedError, match="no data observed yet"):
        obs.result()


@pytest.mark.parametrize(
    "bad,match", [(np.nan, "1 of 80 values are NaN or Inf"), (np.inf, "1 of 80 values are NaN or Inf")]
)
def test_nan_and_inf_are_rejected(bad, match):
    x = batches(7, 1)[0]
    x[3, 2] = bad
    for obs in (MinMaxObserver(name="conv1/output"), HistogramObserver(name="conv1/output")):
        with pytest.raises(CalibrationDataError, match=f"conv1/output: {match}"):
            obs.update(x)


def test_empty_and_mismatched_batches_are_rejected():
    obs = MinMaxObserver(axis=-1, name="dense")
    with pytest.raises(CalibrationDataError, match="the batch is empty"):
        obs.update(np.zeros((0, 4), np.float32))
    obs.update(np.ones((2, 4), np.float32))
    with pytest.raises(CalibrationDataError, match="batch has 5 channels on axis -1, earlier batches had 4"):
        obs.update(np.ones((2, 5), np.float32))
    with pytest.raises(CalibrationDataError, match="channel axis -1 does not exist"):
        MinMaxObserver(axis=-1).update(np.float32(3.0))
    with pytest.raises(CalibrationDataError, match="expected a numeric array"):
        MinMaxObserver().update(np.array(["a", "b"]))


def test_merge_rejects_different_observers():
    with pytest.raises(UnsupportedError, match="cannot merge"):
        MinMaxObserver().merge(HistogramObserver())
    with pytest.raises(UnsupportedError, match="bins per side"):
        feed(HistogramObserver(256), batches(8, 1)).merge(feed(HistogramObserver(512), batches(9, 1)))
    with pytest.raises(UnsupportedError, match="power of two"):
        HistogramObserver(1000)


def test_all_zero_batches_then_data():
    obs = HistogramObserver()
    obs.update(np.zeros(100, np.float32))
    obs.update(np.array([0.5, -0.25], np.float32))
    r = obs.result()
    assert r.counts.sum() == 102 and float(r.max) == 0.5 and int(r.exponent) == 0
