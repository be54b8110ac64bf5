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
