"""Calibration data: batch counts, reading no more than asked, and clear errors for data the model cannot read."""

import keras
import numpy as np
import pytest

from qstrat.calibration.data import count_batches, iterate_batches
from qstrat.errors import CalibrationDataError

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


def _errors(data, specs, **kw):
    from qstrat.errors import CalibrationDataError

    with pytest.raises(CalibrationDataError) as info:
        list(iterate_batches(data, specs, **kw))
    return str(info.value)


def test_steps_never_reads_a_batch_more_than_asked_for():
    read = []

    class Files(keras.utils.PyDataset):
        def __len__(self):
            return 5

        def __getitem__(self, k):
            read.append(k)
            if k >= 2:
                raise OSError(f"file {k} is not there")
            return np.zeros((2, 4), "float32")

    specs = [("x", (None, 4), "float32")]
    assert len(list(iterate_batches(Files(), specs, steps=2))) == 2
    assert read == [0, 1]
    gen = (np.full((2, 4), k, "float32") for k in range(5))
    assert len(list(iterate_batches(gen, specs, steps=2))) == 2
    assert next(gen)[0, 0] == 2  # the generator's third batch is still there


def test_data_without_an_end_needs_calib_steps():
    class Endless(keras.utils.PyDataset):
        @property
        def num_batches(self):
            return None

        def __getitem__(self, k):
            return np.zeros((2, 4), "float32")

    specs = [("x", (None, 4), "float32")]
    assert "calib_steps" in _errors(Endless(), specs)
    assert len(list(iterate_batches(Endless(), specs, steps=3))) == 3


def test_values_the_input_dtype_cannot_hold_are_errors_not_silent_casts():
    specs = [("img", (None, 4), "float32")]
    huge = np.full((2, 4), 1e39)  # finite in float64, inf in float32
    said = _errors(huge, specs)
    assert "overflow" in said and "float32" in said and "'img'" in said
    masked = np.ma.masked_invalid(np.array([[np.nan, 1, 2, 3]] * 2))  # the model reads the NaN under the mask
    assert "NaN or Inf" in _errors(masked, specs)
    ids = [("tok", (None, 3), "int32")]
    said = _errors(np.full((2, 3), 2**32 + 3, np.int64), ids)
    assert "4294967299" in said and "int32" in said
    (ok,) = next(iterate_batches(np.full((2, 3), 7, np.int64), ids))
    assert ok.dtype == np.int32 and ok[0, 0] == 7


def test_a_dict_that_is_not_arrays_by_name_says_which_input():
    specs = [("a", (None, 4), "float32"), ("b", (None, 4), "float32")]
    said = _errors({"a": np.zeros((2, 4), "float32"), "b": [[0.0] * 4] * 2}, specs)
    assert "input 'b'" in said and "list" in said
    assert "empty dict" in _errors({}, specs)


def test_samples_of_another_shape_than_the_first_are_left_out_with_a_warning():
    from qstrat.calibration.data import take_samples

    specs = [("img", (None, None, None, 3), "float32")]
    sizes = [(2, 8, 8, 3), (2, 12, 10, 3), (2, 8, 8, 3)]
    batches = [np.full(s, k, "float32") for k, s in enumerate(sizes)]
    with pytest.warns(UserWarning, match="1 calibration batch"):
        (got,) = take_samples(iter(batches), specs, 10)
    assert got.shape == (4, 8, 8, 3) and sorted(set(got[:, 0, 0, 0].tolist())) == [0.0, 2.0]


def test_bfloat16_tensors_are_read_as_the_float32_values_they_hold():
    """Every bfloat16 value is a float32 value: the backend's own tensor (torch has no NumPy bfloat16) is read
    as float32, exactly."""
    specs = [("x", (None, 4), "float32")]
    values = np.array([[1.5, -2.0, 2.0**-7, 2.0**127]] * 2, "float32")  # all representable in bfloat16
    tensor = keras.ops.cast(keras.ops.convert_to_tensor(values), "bfloat16")
    (got,) = next(iterate_batches(tensor, specs))
    assert got.dtype == np.float32 and np.array_equal(got, values)
    (got,) = next(iterate_batches(iter([tensor]), specs))  # a batch of a stream, read the same way
    assert np.array_equal(got, values)


def test_inputs_of_different_lengths_within_a_streamed_batch_are_errors():
    specs = [("a", (None, 4), "float32"), ("b", (None, 2), "float32")]
    batches = iter([[np.zeros((16, 4), "float32"), np.zeros((10, 2), "float32")]])
    said = _errors(batches, specs)
    assert "calibration batch 0" in said and "'a' 16, 'b' 10" in said


def test_a_tf_data_pipeline_is_read_no_further_than_the_steps_asked_for():
    """tf.data reads ahead of what is taken from it (its injected prefetch); the steps end the pipeline."""
    import tensorflow as tf

    produced = []

    def note(k):
        produced.append(int(k))
        return k

    ds = tf.data.Dataset.range(10).map(lambda k: tf.py_function(note, [k], tf.int64))
    ds = ds.map(lambda k: tf.fill([2, 4], tf.cast(k, tf.float32)))
    got = list(iterate_batches(ds, [("x", (None, 4), "float32")], steps=2))
    assert [b[0][0, 0] for b in got] == [0.0, 1.0]
    assert sorted(set(produced)) == [0, 1]


def test_errors_name_the_caller_and_its_own_arguments():
    specs = [("x", (None, 4), "float32")]
    with pytest.raises(CalibrationDataError, match="^the analyze data is empty"):
        list(iterate_batches(np.zeros((0, 4), "float32"), specs, caller="analyze"))

    class Endless(keras.utils.PyDataset):
        num_batches = None

        def __getitem__(self, k):
            return np.zeros((2, 4), "float32")

    with pytest.raises(CalibrationDataError, match="the analyze data never ends .* Pass analyze steps"):
        list(iterate_batches(Endless(), specs, caller="analyze"))
    assert "the calibration data never ends" in _errors(Endless(), specs)


def test_a_ragged_tensor_is_asked_to_be_padded():
    import tensorflow as tf

    said = _errors(iter([tf.ragged.constant([[1.0, 2.0, 3.0, 4.0], [3.0]])]), [("x", (None, 4), "float32")])
    assert "ragged tensor" in said and ".to_tensor()" in said
