"""The qstrat command: quantize a saved model from the shell, show strategies, clear errors."""

import json

import keras
import numpy as np
import pytest

from qstrat import cli, get_quantize_info, load_model


def small_model(path):
    i = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, activation="relu", name="c")(i)
    x = keras.layers.GlobalAveragePooling2D(name="g")(x)
    model = keras.Model(i, keras.layers.Dense(3, name="d")(x))
    rng = np.random.default_rng(0)  # fixed weights: the mixed-precision test expects a raise to help
    model.set_weights([rng.normal(scale=0.5, size=w.shape).astype("float32") for w in model.get_weights()])
    model.save(path)


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
    assert "not a .keras model (a .keras file is a zip archive" in capsys.readouterr().err
    small_model(tmp_path / "m.keras")
    np.save(tmp_path / "c.npy", np.full((4, 8, 8, 1), np.nan, "float32"))
    assert cli.main(["quantize", str(tmp_path / "m.keras"), "--calib", str(tmp_path / "c.npy")]) == 2
    assert "NaN or Inf" in capsys.readouterr().err
    assert (
        cli.main(["quantize", str(tmp_path / "m.keras"), "--calib", str(tmp_path / "c.npy"), "--set", "weight_bits=4"])
        == 2
    )
    assert 'Did you mean "weight_bit"' in capsys.readouterr().err


def test_counts_data_files_and_formats_are_checked_with_clear_words(tmp_path, capsys):
    args = _model_and_data(tmp_path)
    for flag in ("--batch-size", "--calib-steps"):
        with pytest.raises(SystemExit) as exit_:
            cli.main([*args, flag, "0"])
        assert exit_.value.code == 2
        assert f"argument {flag}: must be a positive integer, got '0'" in capsys.readouterr().err
    model = str(tmp_path / "m.keras")
    assert cli.main(["quantize", model, "--calib", model]) == 2
    assert "m.keras: a model file, not data" in capsys.readouterr().err
    assert cli.main(["export", model, "--format", "onnx", "-o", str(tmp_path / "x.tflite")]) == 2
    assert "an ONNX file must end in .onnx" in capsys.readouterr().err


@pytest.mark.parametrize("wrapped", [False, True])
def test_ctrl_c_ends_the_command_with_one_line(tmp_path, capsys, monkeypatch, wrapped):
    """Status 130 and one line, also where the interrupt came inside an import, which wraps it in another error."""

    def interrupted(args):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as exc:
            if wrapped:
                raise RuntimeError("Error calling __set_name__") from exc
            raise

    monkeypatch.setattr(cli, "cmd_quantize", interrupted)
    assert cli.main(_model_and_data(tmp_path)) == 130
    assert capsys.readouterr().err == "qstrat: interrupted.\n"


def _model_and_data(tmp_path):
    small_model(tmp_path / "m.keras")
    np.save(tmp_path / "c.npy", np.random.default_rng(0).normal(size=(8, 8, 8, 1)).astype("float32"))
    return ["quantize", str(tmp_path / "m.keras"), "--calib", str(tmp_path / "c.npy")]


def _no_temporary_files(folder):
    return [p.name for p in folder.rglob("*") if "tmp" in p.name or p.name.startswith(".qstrat-")] == []


@pytest.mark.parametrize(
    "out,message",
    [
        ("missing/q.keras", "does not exist. Create it first"),
        ("", "is a folder"),
        ("q.h5", "Use --out q.keras"),
        ("q", "Use --out q.keras"),
    ],
)
def test_a_bad_out_path_is_refused_before_any_work(tmp_path, capsys, monkeypatch, out, message):
    import qstrat

    called = []
    monkeypatch.setattr(qstrat.Quantizer, "quantize_model", lambda *a, **k: called.append(1))
    monkeypatch.chdir(tmp_path)
    rc = cli.main([*_model_and_data(tmp_path), "--out", out or str(tmp_path)])
    assert rc == 2 and message in capsys.readouterr().err
    assert called == []  # refused before quantizing
    assert _no_temporary_files(tmp_path)


def test_a_calib_key_for_a_npy_file_is_an_error(tmp_path, capsys):
    args = _model_and_data(tmp_path)
    assert cli.main([*args, "--calib-key", "images"]) == 2
    assert "--calib-key images picks an array of a .npz, and a .npy holds one array" in capsys.readouterr().err


def _damaged(folder):
    """Data files np.load cannot read, each named for how: (path, the reason the error gives)."""
    (folder / "empty.npy").write_bytes(b"")
    (folder / "truncated.npz").write_bytes(b"PK\x03\x04garbage")
    np.savez(folder / "objects.npz", x=np.array([1, "a", None], dtype=object))
    rng = np.random.default_rng(0)
    np.savez_compressed(folder / "flipped.npz", x=rng.normal(size=(8, 8, 8, 1)).astype("float32"))
    raw = bytearray((folder / "flipped.npz").read_bytes())
    raw[len(raw) // 3 : len(raw) // 3 + 64] = bytes(64)  # inside the compressed array: read only when taken
    (folder / "flipped.npz").write_bytes(bytes(raw))
    return {
        "empty.npy": "EOFError",
        "truncated.npz": "BadZipFile",
        "objects.npz": "ValueError",
        "flipped.npz": "BadZipFile: Bad CRC",
    }


def test_a_damaged_data_file_is_a_clear_error(tmp_path, capsys):
    args = _model_and_data(tmp_path)
    for name, reason in _damaged(tmp_path).items():
        assert cli.main([*args[:3], str(tmp_path / name)]) == 2, name
        err = capsys.readouterr().err
        assert f"{name}: cannot read calibration data ({reason}" in err and "Traceback" not in err, err
        assert "Give a .npy or .npz file" in err


def test_a_calib_key_for_a_model_of_several_inputs_is_an_error(tmp_path, capsys):
    a, b = keras.Input((4,), name="a"), keras.Input((4,), name="b")
    keras.Model([a, b], keras.layers.Dense(2)(keras.layers.Concatenate()([a, b]))).save(tmp_path / "two.keras")
    np.savez(tmp_path / "ab.npz", a=np.zeros((4, 4), "float32"), b=np.ones((4, 4), "float32"))
    rc = cli.main(["quantize", str(tmp_path / "two.keras"), "--calib", str(tmp_path / "ab.npz"), "--calib-key", "a"])
    assert rc == 2
    assert "--calib-key a picks one array, for a model with one input; this one has 2 (a, b)" in capsys.readouterr().err


def test_a_strategy_file_without_the_json_suffix_is_read_as_a_file(tmp_path, capsys, monkeypatch):
    args = _model_and_data(tmp_path)
    (tmp_path / "mine.strategy").write_text(
        '{"quantize_registry_config": {"user_defined_quantize_config": {"weight_bit": 4}}}'
    )
    monkeypatch.chdir(tmp_path)
    assert cli.main([*args, "--strategy", "mine.strategy", "--out", "q.keras"]) == 0
    assert get_quantize_info(load_model(tmp_path / "q.keras"))["c"]["kernel"]["bit_width"] == 4


def test_the_input_model_is_never_the_output(tmp_path, capsys, monkeypatch):
    import qstrat

    called = []
    monkeypatch.setattr(qstrat.Quantizer, "quantize_model", lambda *a, **k: called.append(1))
    args = _model_and_data(tmp_path)
    before = (tmp_path / "m.keras").read_bytes()
    monkeypatch.chdir(tmp_path)
    assert cli.main([*args, "--out", "./m.keras"]) == 2  # the same file by another name
    err = capsys.readouterr().err
    assert "the file this command reads" in err and "--out" in err and "m_q.keras" in err
    assert called == [] and (tmp_path / "m.keras").read_bytes() == before
    strategy = tmp_path / "s.json"
    mine = '{"quantize_registry_config": {"user_defined_quantize_config": {"weight_bit": 4}}}'
    strategy.write_text(mine)
    assert cli.main(["strategy", "convert", str(strategy), "-o", str(strategy)]) == 2
    assert "the file this command reads" in capsys.readouterr().err
    assert strategy.read_text() == mine  # as the user wrote it, not the full dump


def test_a_failed_save_leaves_no_temporary_file_and_keeps_the_old_one(tmp_path, capsys, monkeypatch):
    import keras

    args = _model_and_data(tmp_path)
    out = tmp_path / "q.keras"
    out.write_bytes(b"the user's earlier file")
    saves = []

    def failing_save(self, path, *a, **k):
        saves.append(path)
        with open(path, "wb") as fh:
            fh.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(keras.Model, "save", failing_save)
    assert cli.main([*args, "--out", str(out)]) == 2
    assert "q.keras: cannot save the model (disk full); nothing was written" in capsys.readouterr().err
    assert saves, "the save was reached"
    assert out.read_bytes() == b"the user's earlier file"
    assert _no_temporary_files(tmp_path)


def test_npz_arrays_are_matched_to_inputs_by_name(tmp_path, capsys):
    a, b = keras.Input((4,), name="a"), keras.Input((4,), name="b")
    x = keras.layers.Concatenate()([keras.layers.Dense(4)(a), keras.layers.Dense(4)(b)])
    keras.Model([a, b], keras.layers.Dense(2)(x)).save(tmp_path / "two.keras")
    rng = np.random.default_rng(0)
    A, B = rng.normal(size=(16, 4)).astype("float32"), (100 * rng.normal(size=(16, 4))).astype("float32")
    np.savez(tmp_path / "named.npz", b=B, a=A)
    model = cli.load_model(str(tmp_path / "two.keras"))
    got = cli.load_calib(str(tmp_path / "named.npz"), None, [t.name for t in model.inputs])
    assert set(got) == {"a", "b"} and np.array_equal(got["a"], A) and np.array_equal(got["b"], B)
    np.savez(tmp_path / "wrong.npz", x=A, y=B)
    rc = cli.main(["quantize", str(tmp_path / "two.keras"), "--calib", str(tmp_path / "wrong.npz")])
    assert rc == 2 and "the arrays are named x, y, but the model's inputs are a, b" in capsys.readouterr().err


def test_two_arrays_for_a_one_input_model_is_a_clear_error(tmp_path, capsys):
    small_model(tmp_path / "m.keras")
    x = np.zeros((4, 8, 8, 1), "float32")
    np.savez(tmp_path / "two.npz", x=x, y=np.zeros((4, 3), "float32"))
    rc = cli.main(["quantize", str(tmp_path / "m.keras"), "--calib", str(tmp_path / "two.npz")])
    err = capsys.readouterr().err
    assert rc == 2 and "2 arrays (x, y) for a model with one input" in err and "--calib-key" in err


def test_custom_objects_are_loaded_from_module_and_name(tmp_path, capsys, monkeypatch):
    (tmp_path / "userlayers.py").write_text(
        "import keras\nclass Doubler(keras.layers.Layer):\n    def call(self, x):\n        return x * 2.0\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import userlayers

    i = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, name="c")(userlayers.Doubler(name="dbl")(i))
    keras.Model(i, keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(x))).save(tmp_path / "m.keras")
    np.save(tmp_path / "c.npy", np.ones((4, 8, 8, 1), "float32"))
    args = ["quantize", str(tmp_path / "m.keras"), "--calib", str(tmp_path / "c.npy")]
    assert cli.main(args) == 2 and "--custom-objects" in capsys.readouterr().err
    assert cli.main([*args, "--custom-objects", "userlayers:Doubler"]) == 0
    assert cli.main([*args, "--custom-objects", "userlayers:Tripler"]) == 2
    assert 'has no attribute "Tripler"' in capsys.readouterr().err


def test_help_answers_without_importing_keras():
    import subprocess
    import sys

    code = "import sys, qstrat_cli\ntry:\n    qstrat_cli.main(['--help'])\nexcept SystemExit:\n    pass\nprint('keras' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "usage: qstrat" in done.stdout and done.stdout.strip().endswith("False"), done.stdout + done.stderr
    assert done.stderr == ""


def test_warnings_reach_the_user_without_source_lines(tmp_path, capsys):
    import warnings

    import qstrat

    small_model(tmp_path / "m.keras")
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).normal(size=(20, 8, 8, 1)).astype("float32"))
    args = ["quantize", str(tmp_path / "m.keras"), "--calib", str(tmp_path / "calib.npz"), "--batch-size", "8"]
    with warnings.catch_warnings():
        warnings.simplefilter("always", qstrat.PendingKeyWarning)
        assert (
            cli.main([*args, "--set", "convert_layernorm_to_dpu_version=true", "--out", str(tmp_path / "q.keras")]) == 0
        )
    err = capsys.readouterr().err
    assert "qstrat: warning: " in err and "quantize_pipeline_config.convert_layernorm_to_dpu_version = true" in err
    assert "warnings.warn" not in err and "api.py" not in err


def test_inspect_and_analyze_from_the_shell(tmp_path, capsys):
    small_model(tmp_path / "m.keras")
    x = np.random.default_rng(0).normal(size=(24, 8, 8, 1)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    assert cli.main(["inspect", str(tmp_path / "m.keras"), "--set", "weight_bit=4"]) == 0
    out = capsys.readouterr().out
    assert "c " in out and "kernel (Pof2SQuantizer, 4-bit)" in out
    assert cli.main(["inspect", str(tmp_path / "m.keras"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[1]["name"] == "c" and [q["target"] for q in rows[1]["quantizers"]] == ["kernel", "bias"]
    assert cli.main(["inspect", "--supported"]) == 0
    assert capsys.readouterr().out.startswith("| layer type | pof2s | fs | tqt |")
    q = tmp_path / "q.keras"
    assert cli.main(["quantize", str(tmp_path / "m.keras"), "--calib", str(tmp_path / "x.npy"), "--out", str(q)]) == 0
    capsys.readouterr()
    html, js = tmp_path / "r.html", tmp_path / "r.json"
    args = ["analyze", str(tmp_path / "m.keras"), str(q), "--data", str(tmp_path / "x.npy")]
    assert cli.main([*args, "--html", str(html), "--json-out", str(js)]) == 0
    out = capsys.readouterr().out
    assert "outputs against the float model: SQNR" in out and f"wrote {html}" in out
    assert html.read_text().count("<svg") > 2 and json.loads(js.read_text())["samples"] == 24
    assert cli.main([*args, "--json", "--no-alone"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["passes"] == {"statistics": 3, "alone": 0, "weight/activation split": 0, "left out": 0}
    assert cli.main([*args, "--html", str(tmp_path / "r.htm")]) == 2  # refused before any work
    assert "ending in .html" in capsys.readouterr().err


def test_every_command_speaks_json(tmp_path, capsys):
    small_model(tmp_path / "m.keras")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(24, 8, 8, 1)).astype("float32"))
    q = tmp_path / "q.keras"
    base = ["quantize", str(tmp_path / "m.keras"), "--calib", str(tmp_path / "x.npy"), "--out", str(q)]
    assert cli.main([*base, "--json", "--target-sqnr", "60", "--max-raised", "1"]) == 0
    d = json.loads(capsys.readouterr().out)  # nothing else on stdout
    assert d["out"] == str(q) and {r["node"] for r in d["layers"]} >= {"c", "g", "d"}
    mixed = d["mixed_precision"]
    assert mixed["layer_config"] == {n: "int16" for n in mixed["raised"]} and mixed["raised"]
    assert get_quantize_info(load_model(str(q)))[mixed["raised"][0]]
    assert cli.main(["export", str(q), "--format", "onnx", "-o", str(tmp_path / "q.onnx"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["out"] == str(tmp_path / "q.onnx")
    assert cli.main(["strategy", "keys", "--json"]) == 0
    keys = json.loads(capsys.readouterr().out)
    assert "include_cle" in {k["name"] for k in keys["optimize_pipeline_config"]}


def test_inspect_supported_speaks_json_and_strategy_show_reads_any_file(tmp_path, capsys, monkeypatch):
    assert cli.main(["inspect", "--supported", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert table["strategies"] == ["pof2s", "fs", "tqt"] and table["model inputs"]["pof2s"] == "quantized"
    assert "kernel (weight)" in table["layers"]["Conv2D"]["pof2s"]
    (tmp_path / "mine").write_text('{"quantize_registry_config": {"user_defined_quantize_config": {"weight_bit": 4}}}')
    monkeypatch.chdir(tmp_path)
    assert cli.main(["strategy", "show", "mine"]) == 0  # a file, as --strategy reads one: no .json needed
    shown = json.loads(capsys.readouterr().out)
    assert shown["quantize_registry_config"]["user_defined_quantize_config"]["weight_bit"] == 4
    assert cli.main(["inspect", "--supported", "--strategy", "mine", "--json"]) == 0  # read the same way
    assert json.loads(capsys.readouterr().out)["strategies"] == ["mine"]


def test_options_that_do_not_apply_are_refused_before_any_work(tmp_path, capsys, monkeypatch):
    import qstrat

    called = []
    monkeypatch.setattr(qstrat.Quantizer, "quantize_model", lambda *a, **k: called.append(1))
    args = _model_and_data(tmp_path)
    assert cli.main([*args, "--max-raised", "0.5"]) == 2
    assert "--max-raised: mixed precision's budget, used with --target-sqnr DB only" in capsys.readouterr().err
    assert cli.main([*args, "--raise-to", "float32", "--max-raised", "0.5"]) == 2
    assert "--max-raised and --raise-to: mixed precision's budget" in capsys.readouterr().err
    assert called == []
    model, out = str(tmp_path / "m.keras"), str(tmp_path / "m.tflite")
    for extra, words in (
        (["--format", "tflite", "-o", out, "--opset", "13"], "--opset applies with --format onnx only"),
        (["--format", "onnx", "-o", out[:-6] + "onnx", "--int8-io"], "--int8-io applies with --format tflite only"),
        (["--format", "onnx", "-o", out[:-6] + "onnx", "--data-key", "x"], "--data-key applies with --data only"),
    ):
        assert cli.main(["export", model, *extra]) == 2
        assert words in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.npy", "m.keras"]  # nothing written


def test_analyze_checks_the_float_model_and_matplotlib_before_any_pass(tmp_path, capsys, monkeypatch):
    import qstrat.inspect
    from qstrat.errors import QstratError
    from qstrat.inspect import html

    args = _model_and_data(tmp_path)
    q = tmp_path / "q.keras"
    assert cli.main([*args, "--out", str(q)]) == 0
    capsys.readouterr()
    i = keras.Input((4,))
    keras.Model(i, keras.layers.Dense(3)(i)).save(tmp_path / "other.keras")
    rc = cli.main(["analyze", str(tmp_path / "other.keras"), str(q), "--data", str(tmp_path / "c.npy")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "the float model takes inputs of shapes [(None, 4)] and the quantized model [(None, 8, 8, 1)]" in err

    def no_matplotlib():
        raise QstratError("the HTML report draws its plots with matplotlib, which is not installed")

    called = []
    monkeypatch.setattr(html, "_pyplot", no_matplotlib)
    monkeypatch.setattr(qstrat.inspect, "analyze", lambda *a, **k: called.append(1))
    analyze = ["analyze", str(tmp_path / "m.keras"), str(q), "--data", str(tmp_path / "c.npy")]
    assert cli.main([*analyze, "--html", str(tmp_path / "r.html")]) == 2
    assert "matplotlib, which is not installed" in capsys.readouterr().err and called == []


def test_errors_from_the_api_name_the_flags_too(tmp_path, capsys):
    args = _model_and_data(tmp_path)
    assert cli.main([*args, "--target-sqnr", "30", "--max-raised", "5"]) == 2
    err = capsys.readouterr().err
    assert "max_raised must be a fraction in (0, 1], got 5.0" in err
    assert err.rstrip().endswith("(On the command line: max_raised is --max-raised.)")
    q = str(tmp_path / "q.keras")
    assert cli.main([*args, "--out", q]) == 0
    capsys.readouterr()
    assert cli.main(["export", q, "--format", "onnx", "-o", str(tmp_path / "q.onnx"), "--opset", "99"]) == 2
    assert "(On the command line: opset is --opset.)" in capsys.readouterr().err
    assert cli.in_flags("export", "calib_data_x and --opset") == "calib_data_x and --opset"  # whole names only
    assert cli.in_flags("inspect", "calib_data") == "calib_data"
