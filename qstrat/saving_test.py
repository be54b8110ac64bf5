"""qstrat.load_model: one clear error per bad file, and the layer count that sizes the room for deep graphs."""

import keras
import numpy as np
import pytest

import qstrat
from qstrat.errors import QstratError
from qstrat.saving import count_saved_layers

portable = pytest.mark.portable


def _model():
    i = keras.Input((3,))
    inner = keras.Sequential([keras.layers.Dense(4), keras.layers.ReLU()], name="inner")
    return keras.Model(i, keras.layers.Dense(2)(inner(i)))


@portable
def test_count_saved_layers_counts_nested_models(tmp_path):
    path = tmp_path / "m.keras"
    _model().save(path)
    # Outer: InputLayer, Sequential, Dense; inner Sequential: InputLayer, Dense, ReLU.
    assert count_saved_layers(str(path)) == 6
    (tmp_path / "junk.keras").write_text("not a zip")
    assert count_saved_layers(str(tmp_path / "junk.keras")) == 0


@portable
def test_load_model_round_trips_a_float_model(tmp_path):
    model = _model()
    path = tmp_path / "m.keras"
    model.save(path)
    x = np.random.default_rng(0).normal(size=(5, 3)).astype("float32")
    again = qstrat.load_model(path)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(again(x)), keras.ops.convert_to_numpy(model(x)))


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.keras", None, "no such model file"),
        ("folder.keras", "dir", "is a folder"),
        ("bad.keras", "not a zip", "not a .keras model"),
        ("model.onnx", "x", "unknown model format"),
    ],
)
def test_bad_files_get_one_clear_error(tmp_path, name, content, message):
    path = tmp_path / name
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_text(content)
    with pytest.raises(QstratError, match=message):
        qstrat.load_model(path)


def test_a_custom_class_missing_at_load_names_custom_objects(tmp_path):
    @keras.saving.register_keras_serializable(package="saving_test")
    class Twice(keras.layers.Layer):
        def call(self, x):
            return 2 * x

    i = keras.Input((3,))
    path = tmp_path / "custom.keras"
    keras.Model(i, Twice()(i)).save(path)
    keras.saving.get_custom_objects().pop("saving_test>Twice")
    with pytest.raises(QstratError, match="custom_objects"):
        qstrat.load_model(path)
    assert qstrat.load_model(path, custom_objects={"saving_test>Twice": Twice}) is not None


@portable
def test_a_quantized_model_with_a_lambda_loads_with_safe_mode_off(tmp_path):
    """A Lambda's function is saved as bytecode: Keras refuses it unless safe_mode=False, which load_model takes
    and its error names."""
    i = keras.Input((6,))
    x = keras.layers.Lambda(lambda t: t * 2.0 + 1.0, name="affine")(keras.layers.Dense(4, name="d")(i))
    model = keras.Model(i, keras.layers.Dense(2, name="head")(x))
    x = np.random.default_rng(0).normal(size=(16, 6)).astype("float32")
    qmodel = qstrat.Quantizer(model, "pof2s").quantize_model(x, verbose=0)
    qmodel.save(tmp_path / "q.keras")
    with pytest.raises(QstratError, match=r"For a file you trust: qstrat.load_model\(path, safe_mode=False\)"):
        qstrat.load_model(tmp_path / "q.keras")
    loaded = qstrat.load_model(tmp_path / "q.keras", safe_mode=False)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), qmodel.predict(x, verbose=0))
