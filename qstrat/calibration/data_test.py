"""count_batches: the progress bar's length, known up front for arrays and PyDatasets."""

import keras
import numpy as np
import pytest

from qstrat.calibration.data import count_batches, iterate_batches

pytestmark = pytest.mark.portable


class Three(keras.utils.PyDataset):
    def __len__(self):
        return 3

    def __getitem__(self, k):
        return np.zeros((2, 4), "float32")


@pytest.mark.parametrize(
    "data,batch,steps,want",
    [
        (np.zeros((100, 4), "float32"), 32, None, 4),
        (np.zeros((100, 4), "float32"), 32, 2, 2),
        ([np.zeros((10, 4), "float32"), np.zeros((10, 2), "float32")], 4, None, 3),
        (Three(), 32, None, 3),
        ((np.zeros((2, 4), "float32") for _ in range(5)), 32, None, None),
        ((np.zeros((2, 4), "float32") for _ in range(5)), 32, 2, 2),
    ],
)
def test_count_batches_matches_iterate_batches(data, batch, steps, want):
    assert count_batches(data, batch, steps) == want
    if want is not None and not isinstance(data, list):
        specs = [("x", (None, 4), "float32")]
        assert sum(1 for _ in iterate_batches(data, specs, batch, steps)) == want


def test_take_samples_spreads_over_arrays_and_takes_the_first_samples_of_other_sources():
    from qstrat.calibration.data import take_samples

    x = np.arange(100, dtype="float32").reshape(100, 1)
    specs = [("x", (None, 1), "float32")]
    (spread,) = take_samples(x, specs, 10)
    rows = spread[:, 0].astype(int)
    assert len(rows) == 10 and np.all(np.diff(rows) > 0) and rows.max() >= 10  # a mix, in order
    assert np.array_equal(rows, np.sort(np.random.default_rng(0).permutation(100)[:10]))
    (again,) = take_samples(x, specs, 10)
    assert np.array_equal(again, spread)  # the same choice every time
    (first,) = take_samples(x, specs, 10, batch_size=4, spread=False)
    assert first[:, 0].tolist() == list(range(10))
    (gen,) = take_samples((x[i : i + 4] for i in range(0, 100, 4)), specs, 10)
    assert gen[:, 0].tolist() == list(range(10))
    (steps,) = take_samples(x, specs, 200, batch_size=8, steps=3)  # 3 batches of 8: the data holds 24
    assert sorted(steps[:, 0].astype(int).tolist()) == list(range(24))
