"""keras.applications models export and run in ONNX Runtime; the CLI writes the file.

MobileNetV2 (alpha 0.35) and ResNet50 with random weights and the
BatchNormalization statistics of real images. Power-of-2 with half-to-even
activations must be bit-identical in ONNX Runtime (both models); float scales
(MobileNetV2) must run and
stay on the Keras model's output shape (random-weight networks amplify the
one-step differences that float-scale rounding allows, so their outputs are
compared tensor by tensor in onnx_export_test.py instead).
"""

import warnings

import keras
import numpy as np
import onnx
import pytest

import qstrat
from qstrat import cli, zoo
from qstrat.export.onnx_export_test import keras_out, run

# ResNet50 with pof2s alone: an fs export of it would check only that it runs and its output shape, at half a
# minute of CI; its layer types (max pooling and zero padding among them) are in onnx_export_test.py's model,
# whose fs export is compared there tensor by tensor.
BUILDERS = {
    "MobileNetV2": (
        lambda: keras.applications.MobileNetV2(input_shape=(96, 96, 3), alpha=0.35, weights=None),
        96,
        ("pof2s", "fs"),
    ),
    "ResNet50": (lambda: keras.applications.ResNet50(input_shape=(32, 32, 3), weights=None), 32, ("pof2s",)),
}
KEYS = {"pof2s": {"export_rounding": "onnx"}, "fs": {}}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_applications_export_and_run(name, tmp_path):
    build, size, strategies = BUILDERS[name]
    model = build()
    x = (zoo.color_images(8, size) / 127.5 - 1).astype("float32")
    zoo.real_statistics(model, x)
    for strategy in strategies:
        keys = KEYS[strategy]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qmodel = qstrat.Quantizer(model, strategy).quantize_model(x, verbose=0, include_bias_corr=False, **keys)
        path = tmp_path / f"{strategy}.onnx"
        report = qstrat.export_onnx(qmodel, path)
        onnx.checker.check_model(onnx.load(path), full_check=True)
        assert len(report.quantizers) > 50
        y, yk = run(path, x), keras_out(qmodel, x)
        assert y.shape == yk.shape == (8, 1000) and np.all(np.isfinite(y))
        if strategy == "pof2s":
            assert np.array_equal(y, yk)
            assert np.array_equal(run(path, x, optimize=False), yk)


def test_cli_exports_a_saved_quantized_model(tmp_path, capsys):
    i = keras.Input((8, 8, 1), name="img")
    x = keras.layers.Conv2D(4, 3, activation="relu", name="c")(i)
    m = keras.Model(i, keras.layers.Dense(3, name="d")(keras.layers.GlobalAveragePooling2D(name="g")(x)))
    data = np.random.default_rng(0).normal(size=(16, 8, 8, 1)).astype("float32")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qmodel = qstrat.Quantizer(m, "pof2s").quantize_model(data, verbose=0)
    qmodel.save(tmp_path / "q.keras")
    np.save(tmp_path / "x.npy", data)
    out = tmp_path / "q.onnx"
    rc = cli.main(
        ["export", str(tmp_path / "q.keras"), "--format", "onnx", "-o", str(out), "--data", str(tmp_path / "x.npy")]
    )
    assert rc == 0 and out.exists()
    text = capsys.readouterr().out
    assert "round ties differently from ONNX" in text and "elements round differently" in text
    assert cli.main(["export", str(tmp_path / "q.keras"), "--format", "onnx", "-o", str(tmp_path / "q.txt")]) == 2
    assert "must end in .onnx" in capsys.readouterr().err
