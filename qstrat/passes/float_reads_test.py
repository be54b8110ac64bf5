"""Layers with quantized weights that read float values no quantizer grids: warned, noted, and fixed by naming."""

import warnings

import keras
import numpy as np
import pytest
from keras import layers as L

import qstrat
from qstrat.layers import FakeQuant


@pytest.mark.portable
def test_a_weighted_layer_reading_a_float_tensor_no_quantizer_grids_warns_until_input_layers_names_it():
    """uint8 pixels -> Rescaling (no pattern) -> Flatten (keeps its input's grid) -> Dense: the Dense would
    compute on float values. It warns and notes it; named in input_layers, the Dense's input is quantized."""
    i = keras.Input((4, 4, 1), dtype="uint8", name="pixels")
    y = L.Dense(3, name="head")(L.Flatten(name="flat")(L.Rescaling(1 / 255, name="scale")(i)))
    model = keras.Model(i, y)
    x = np.random.default_rng(0).integers(0, 256, (16, 4, 4, 1)).astype("uint8")
    q = qstrat.Quantizer(model, "pof2s")
    with pytest.warns(UserWarning, match=r"head reads scale: layers with quantized weights read float values"):
        qmodel = q.quantize_model(x, verbose=0)
    assert "reads scale's output in float" in q.report.layers["head"].notes[-1]
    assert not any(isinstance(layer, FakeQuant) for layer in qmodel.layers[:3])  # pixels, scale, flat: no grid
    q = qstrat.Quantizer(model, "pof2s")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        qmodel = q.quantize_model(x, verbose=0, input_layers=["head"])
    assert [type(layer).__name__ for layer in qmodel.layers].count("FakeQuant") == 2  # head's input and output


@pytest.mark.portable
def test_layers_that_move_values_keep_the_grid_and_a_lambda_in_the_middle_is_named():
    """Cropping and GlobalMaxPooling have no pof2s pattern but write their input's grid values: no warning
    for what reads them. A Lambda in the middle writes float values: the Dense after it is named."""
    i = keras.Input((8, 8, 2), name="img")
    x = L.Conv2D(4, 3, name="c1")(i)
    x = L.Conv2D(4, 3, name="c2")(L.Cropping2D(1, name="crop")(x))
    x = L.GlobalMaxPooling2D(name="gmp")(x)
    y = L.Dense(3, name="tail")(L.Lambda(lambda t: t * 2.0, name="twice")(L.Dense(4, name="mid")(x)))
    model = keras.Model(i, y)
    data = np.random.default_rng(0).normal(size=(16, 8, 8, 2)).astype("float32")
    q = qstrat.Quantizer(model, "pof2s")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q.quantize_model(data, verbose=0)
    reads = [str(w.message) for w in caught if "read float values" in str(w.message)]
    assert len(reads) == 1 and reads[0].startswith("tail reads twice:")
    assert not any("reads" in n for name in ("c2", "mid") for n in q.report.layers[name].notes)
