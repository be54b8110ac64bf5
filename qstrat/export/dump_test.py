"""Golden dumps: the files hold the integers of every quantized tensor, equal to the integer reference's.

The digits CNN (real images) and a small model with the DPU layer versions,
per-channel weights, 16-bit activations and a 32-bit bias: every activation
file equals `qstrat.integer.run_integer`'s integers for the same input, bit
for bit; every weight file equals the quantized weight times 2^position; the
index describes each file; the float copies are the tensors before
quantization.
"""

import json
import os
import warnings

import keras
import numpy as np
import pytest
from keras import layers as L

import qstrat
from qstrat import zoo
from qstrat.errors import ConfigError, UnsupportedError
from qstrat.integer import run_integer
from qstrat.layers import FakeQuant, QuantizeWrapper

pytestmark = pytest.mark.portable


def quantize(model, x, strategy="pof2s", **keys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return qstrat.Quantizer(model, strategy).quantize_model(x, verbose=0, calib_batch_size=32, **keys)


def small_model():
    keras.utils.set_random_seed(1)
    i = keras.Input((10, 10, 2))
    x = L.Conv2D(6, 3, activation="relu", name="conv")(i)
    g = L.Activation("sigmoid", name="gate")(L.Conv2D(6, 1, name="pre")(x))
    y = L.AveragePooling2D(3, strides=1, name="avg")(L.Add(name="add")([x, g]))
    return keras.Model(i, L.Dense(3, name="head")(L.Flatten(name="flat")(y)))


def read(folder, name, meta):
    return np.fromfile(os.path.join(folder, name), dtype=np.dtype(meta["dtype"]).newbyteorder("<")).reshape(
        meta["shape"]
    )


def check_against_the_integer_reference(qmodel, x, folder, dump_float=False):
    index = qstrat.dump_model(qmodel, x, folder, dump_float=dump_float, batch_size=len(x))
    with open(os.path.join(folder, "dump_index.json")) as f:
        assert json.load(f) == index
    run = run_integer(qmodel, x)
    seen = 0
    for layer in qmodel.layers:
        if isinstance(layer, FakeQuant):
            for k, target in enumerate([layer.target or layer.name, *layer.more_targets]):
                stem = target.replace("/", "_")
                meta = index[f"{stem}.bin"]
                ints, pos = run.tensors[layer.name if k == 0 else f"{layer.name}@{k}"]
                assert np.array_equal(read(folder, f"{stem}.bin", meta), ints), target
                assert meta["position"] == int(np.asarray(pos))
                text = np.loadtxt(os.path.join(folder, f"{stem}.txt"), dtype=np.int64).reshape(meta["shape"])
                assert np.array_equal(text, ints)
                seen += 1
        elif isinstance(layer, QuantizeWrapper):
            for attr, q in layer.quantizers.items():
                meta = index[f"{layer.layer.name}_{attr}.bin"]
                w = getattr(layer.layer, attr).numpy()
                state = {k: np.asarray(v) for k, v in layer.state[attr].items()}
                pos = np.asarray(meta["position"], np.float64)
                if pos.ndim:
                    pos = pos.reshape([-1 if a == meta["channel_axis"] else 1 for a in range(w.ndim)])
                expected = q.reference(w, state).astype(np.float64) * np.exp2(pos)
                assert np.array_equal(read(folder, f"{layer.layer.name}_{attr}.bin", meta), expected)
                assert meta["kind"] == ("bias" if attr == "bias" else "weight")
                if dump_float:
                    got = np.fromfile(os.path.join(folder, meta["float_file"]), "<f4").reshape(w.shape)
                    assert np.array_equal(got, w)
                seen += 1
    assert seen == len([m for m in index.values()])
    return index


def test_digits_cnn_dump_equals_the_integer_reference(tmp_path):
    x_train, _, x_test, _ = zoo.digits_split()
    qmodel = quantize(zoo.digits_cnn(), x_train[:256])
    index = check_against_the_integer_reference(qmodel, x_test[:8], tmp_path / "golden")
    assert index["conv1_kernel.bin"]["dtype"] == "int8" and index["conv1_kernel.bin"]["bit_width"] == 8
    assert any(m["kind"] == "output" for m in index.values())


def test_wide_grids_per_channel_weights_and_dpu_layers(tmp_path):
    x = np.random.default_rng(0).normal(size=(64, 10, 10, 2)).astype("float32")
    qmodel = quantize(
        small_model(),
        x,
        weight_per_channel=True,
        layer_config={"pre": "int16"},
        bias_bit=32,
    )
    assert {"DPUHardSigmoid", "DPUAveragePooling2D"} <= {type(layer).__name__ for layer in qmodel.layers}
    index = check_against_the_integer_reference(qmodel, x[:4], tmp_path / "d", dump_float=True)
    assert index["pre_output.bin"]["dtype"] == "int16" and index["pre_output.bin"]["bit_width"] == 16
    assert index["conv_bias.bin"]["dtype"] == "int32"
    kernel = index["conv_kernel.bin"]
    assert isinstance(kernel["position"], list) and len(kernel["position"]) == 6 and kernel["channel_axis"] == 3
    # The float copy of an activation is what its quantizer read: the layer's output before quantization.
    head = next(layer for layer in qmodel.layers if isinstance(layer, FakeQuant) and layer.target == "head/output")
    floats = np.fromfile(tmp_path / "d" / index["head_output.bin"]["float_file"], "<f4").reshape(4, 3)
    ints = read(tmp_path / "d", "head_output.bin", index["head_output.bin"])
    state = {k: np.asarray(v) for k, v in head.state.items()}
    quantized = head.quantizer.reference(floats, state).astype(np.float64)
    assert np.array_equal(ints, quantized * 2.0 ** index["head_output.bin"]["position"])


def test_weights_only_without_data_and_bad_input(tmp_path):
    x = np.random.default_rng(0).normal(size=(32, 10, 10, 2)).astype("float32")
    qmodel = quantize(small_model(), x)
    index = qstrat.dump_model(qmodel, None, tmp_path / "w")
    assert index and {m["kind"] for m in index.values()} == {"weight", "bias"}
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        qstrat.dump_model(qmodel, x, tmp_path / "file")
    with pytest.raises(ConfigError, match="does not exist"):
        qstrat.dump_model(qmodel, x, tmp_path / "missing" / "deeper")
    fs = quantize(small_model(), x, "fs")
    with pytest.raises(UnsupportedError, match="power-of-2"):
        qstrat.dump_model(fs, x, tmp_path / "fs")
    assert not (tmp_path / "fs").exists()
