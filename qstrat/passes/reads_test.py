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


def _rule(name, types, target, bits):
    q = {"type": "Pof2SQuantizer", "params": {"bit_width": bits}}
    rule = {
        "pattern_name": name,
        "layer_type": types,
        "quant_config": [{"target_name": target, "target_type": "input", "quantizer_config": q}],
    }
    return {"quantize_registry_config": {"layer_quantize_config": [rule]}}


@pytest.mark.portable
def test_an_input_target_on_a_tensor_already_quantized_is_reported_as_not_there_and_warns_when_it_differs():
    """pof2s quantizes relu1's output at 8 bits; a 4-bit input target on conv2 would read that tensor again:
    it is not inserted, so the report, inspect_model and get_quantize_info do not list it, and it warns."""
    i = keras.Input((6, 6, 2), name="img")
    x = L.ReLU(name="relu1")(L.Conv2D(3, 3, name="conv1")(i))
    model = keras.Model(i, L.Flatten()(L.Conv2D(2, 3, name="conv2")(x)))
    data = np.random.default_rng(0).normal(size=(16, 6, 6, 2)).astype("float32")
    rule = _rule("conv2_in4", "Conv2D", "input", 4)
    rule["quantize_registry_config"]["layer_quantize_config"][0]["layer_name"] = "conv2"
    q = qstrat.Quantizer(model, "pof2s", rule)
    with pytest.warns(UserWarning, match=r"conv2.input \(input 0, already quantized by relu1\)"):
        qmodel = q.quantize_model(data, verbose=0)
    assert not any(t.startswith("input") for t in q.report.layers["conv2"].targets)
    assert "relu1's output quantizer already quantizes input 0" in " ".join(q.report.layers["conv2"].notes)
    assert "input" not in qstrat.get_quantize_info(qmodel)["conv2"]
    assert [layer.name for layer in qmodel.layers if isinstance(layer, FakeQuant)] == [
        "img_output_q",
        "relu1_output_q",
        "conv2_output_q",
    ]


@pytest.mark.portable
def test_an_input_index_the_layer_does_not_have_warns_with_the_numbering():
    i = keras.Input((4,), name="x")
    model = keras.Model(i, L.Add(name="add")([L.Dense(4, name="a")(i), L.Dense(4, name="b")(i)]))
    q = qstrat.Quantizer(model, "pof2s", _rule("add_in", "Add", "input_2", 4))
    with pytest.warns(UserWarning, match=r"'add' reads 2 input\(s\), numbered from 0 \(input_0 to input_1\)"):
        q.quantize_model(np.random.default_rng(0).normal(size=(8, 4)).astype("float32"), verbose=0)
    assert "input_2: no such input (it has 2)" in q.report.layers["add"].notes
