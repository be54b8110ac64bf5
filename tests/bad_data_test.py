"""Calibration data a model reads in its own way: images of several sizes, token ids, data read once.

Each case is built in code; each works, or gets an error that names the
batch or the call and says what to do.
"""

import keras
import numpy as np
import pytest
from keras import ops

import qstrat
from qstrat.errors import CalibrationDataError

L = keras.layers
portable = pytest.mark.portable


def np_(t):
    return ops.convert_to_numpy(t)


def two_input_model():
    a, b = keras.Input((4,), name="a"), keras.Input((4,), name="b")
    x = L.Concatenate()([L.Dense(8, name="da")(a), L.Dense(8, name="db")(b)])
    return keras.Model([a, b], L.Dense(3, name="head")(x))


@portable
def test_images_of_several_sizes_calibrate_a_model_with_free_dimensions():
    i = keras.Input((None, None, 3), name="img")
    x = L.GlobalAveragePooling2D()(L.Conv2D(4, 3, padding="same", activation="relu", name="conv")(i))
    model = keras.Model(i, L.Dense(2, name="head")(x))
    rng = np.random.default_rng(0)
    sizes = [(4, 8, 8, 3), (4, 12, 10, 3), (4, 8, 8, 3)]
    batches = [rng.normal(size=s).astype("float32") for s in sizes]
    q = qstrat.Quantizer(model, "pof2s")
    with pytest.warns(UserWarning, match="another sample shape"):  # bias correction measures the 8x8 ones
        qmodel = q.quantize_model(Listed(batches), verbose=0)
    for b in batches:
        assert np.all(np.isfinite(np_(qmodel.predict(b, verbose=0))))


class Listed(keras.utils.PyDataset):
    """A PyDataset over a list of batches: read again after calibration, so bias correction runs."""

    def __init__(self, batches):
        super().__init__()
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, k):
        return self.batches[k]


def test_data_the_float_model_itself_fails_on_is_named_by_batch():
    i = keras.Input((3,), dtype="int32", name="tok")
    x = L.GlobalAveragePooling1D()(L.Embedding(10, 4, name="emb")(i))
    model = keras.Model(i, L.Dense(2, name="head")(x))
    ids = np.full((8, 3), 185, "int32")  # past the vocabulary of 10
    with pytest.raises(CalibrationDataError, match=r"calibration batch 0: the float model itself fails"):
        qstrat.Quantizer(model, "pof2s").quantize_model(ids, verbose=0)


@portable
def test_mixed_precision_refuses_a_generator_before_any_work():
    model = two_input_model()
    rng = np.random.default_rng(0)
    A, B = rng.normal(size=(64, 4)).astype("float32"), rng.normal(size=(64, 4)).astype("float32")
    gen = ({"a": A[k : k + 8], "b": B[k : k + 8]} for k in range(0, 64, 8))
    with pytest.raises(CalibrationDataError, match="generator can be read only once"):
        qstrat.Quantizer(model, "pof2s").quantize_model(gen, target_sqnr=30.0, verbose=0)
    assert next(gen)["a"].shape == (8, 4)  # nothing was read


@portable
def test_an_input_that_holds_one_value_throughout_is_warned_of():
    """All-zero data calibrates every quantizer on zeros (the outputs collapse): said, naming the input. Data
    that varies in one input of two is warned of for the other alone."""
    import warnings

    model = two_input_model()
    rng = np.random.default_rng(0)
    a, b = (rng.normal(size=(32, *t.shape[1:])).astype("float32") for t in model.inputs)
    with pytest.warns(UserWarning, match=r"input 'b' holds one value \(0\) in every sample") as said:
        qstrat.Quantizer(model, "pof2s").quantize_model([a, np.zeros_like(b)], verbose=0)
    assert not [w for w in said if "input 'a'" in str(w.message)]
    assert {w.filename for w in said if "one value" in str(w.message)} == {__file__}  # the caller's line
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        qstrat.Quantizer(model, "pof2s").quantize_model([a, b], verbose=0)
    assert not [w for w in said if "one value" in str(w.message)]
