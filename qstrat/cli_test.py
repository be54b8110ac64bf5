"""The qstrat command: quantize a saved model from the shell, show strategies, clear errors."""

import json

import keras
import numpy as np

from qstrat import cli, get_quantize_info


def small_model(path):
    i = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, activation="relu", name="c")(i)
    x = keras.layers.GlobalAveragePooling2D(name="g")(x)
    keras.Model(i, keras.layers.Dense(3, name="d")(x)).save(path)


def test_quantize_writes_a_model_and_prints_the_report(tmp_path, capsys):
    small_model(tmp_path / "m.keras")
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).normal(size=(20, 8, 8, 1)).astype("float32"))
    out = tmp_path / "q.keras"
    rc = cli.main(
        [
            "quantize",
            str(tmp_path / "m.keras"),
            "--calib",
            str(tmp_path / "calib.npz"),
            "--strategy",
            "pof2s",
            "--set",
            "weight_bit=4",
            "--set",
            "activation_round_mode=HALF_TO_EVEN",
            "--out",
            str(out),
            "--batch-size",
            "8",
        ]
    )
    assert rc == 0 and out.exists()
    text = capsys.readouterr().out
    assert "c " in text and "quantized" in text and "kernel (Pof2SQuantizer, 4-bit)" in text
    assert "optimize stage:" in text and "activation 'relu' moved to c_relu" in text
    assert "bias correction: 2 layers corrected" in text
    info = get_quantize_info(keras.models.load_model(out))
    assert info["c"]["kernel"]["bit_width"] == 4 and info["g"]["output"]["round_mode"] == "HALF_TO_EVEN"


def test_strategy_show_and_keys(capsys):
    assert cli.main(["strategy", "show", "pof2s_tqt"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["base"] == "tqt" and shown["quantize_registry_config"]["layer_quantize_config"]
    assert cli.main(["strategy", "keys"]) == 0
    assert "`include_cle`" in capsys.readouterr().out


def test_errors_are_one_clear_line(tmp_path, capsys):
    assert cli.main(["quantize", str(tmp_path / "none.keras"), "--calib", "x.npz"]) == 2
    assert "no such model file" in capsys.readouterr().err
    bad = tmp_path / "bad.keras"
    bad.write_bytes(b"not a zip")
    assert cli.main(["quantize", str(bad), "--calib", "x.npz"]) == 2
    assert "cannot load the Keras model" in capsys.readouterr().err
    small_model(tmp_path / "m.keras")
    np.save(tmp_path / "c.npy", np.full((4, 8, 8, 1), np.nan, "float32"))
    assert cli.main(["quantize", str(tmp_path / "m.keras"), "--calib", str(tmp_path / "c.npy")]) == 2
    assert "NaN or Inf" in capsys.readouterr().err
    assert (
        cli.main(["quantize", str(tmp_path / "m.keras"), "--calib", str(tmp_path / "c.npy"), "--set", "weight_bits=4"])
        == 2
    )
    assert 'Did you mean "weight_bit"' in capsys.readouterr().err
