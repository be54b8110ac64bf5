"""BatchRunner: the same outputs as predict_on_batch, for any batch size, with one trace on TensorFlow."""

import keras
import numpy as np
import pytest

from qstrat.passes.runner import BatchRunner


def _model():
    a, b = keras.Input((6, 6, 2), name="a"), keras.Input((3,), name="b")
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3, activation="relu")(a))
    y = keras.layers.Concatenate()([x, keras.layers.Dense(4)(b)])
    return keras.Model([a, b], [keras.layers.Dense(2)(y), x])


@pytest.mark.portable
def test_outputs_equal_predict_on_batch_for_every_batch_size():
    model = _model()
    runner = BatchRunner(model)
    rng = np.random.default_rng(0)
    for n in (5, 32, 1, 17):
        batch = [rng.normal(size=(n, 6, 6, 2)).astype("float32"), rng.normal(size=(n, 3)).astype("float32")]
        got = runner(batch)
        want = model.predict_on_batch(batch)
        assert len(got) == 2
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g, np.asarray(w))


def test_tensorflow_traces_once_whatever_the_batch_sizes():
    if keras.backend.backend() != "tensorflow":
        pytest.skip("tracing is TensorFlow's")
    runner = BatchRunner(_model())
    rng = np.random.default_rng(0)
    for n in (32, 7, 1, 32, 12):
        runner([rng.normal(size=(n, 6, 6, 2)).astype("float32"), rng.normal(size=(n, 3)).astype("float32")])
    assert runner._fn.experimental_get_tracing_count() == 1
