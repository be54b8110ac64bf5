"""Strategy files, custom quantizers and output paths that cannot work get a clear error before any work.

Each case is built in code: a strategy file that is not text, layer types
that name nothing, rules that match no layer, quantizer state that breaks
the contract, paths the model cannot be saved or exported to, and budgets
that are not numbers.
"""

import math
import warnings

import keras
import numpy as np
import pytest
from keras import ops

import qstrat
from qstrat.errors import CalibrationDataError, ConfigError, UnsupportedError
from qstrat.quantizers import StateSpec
from qstrat.saving import save_model
from qstrat.strategy import dump_quantize_strategy, load_strategy

L = keras.layers
portable = pytest.mark.portable


def small_model():
    i = keras.Input((8, 8, 1), name="x")
    x = L.GlobalAveragePooling2D(name="g")(L.Conv2D(4, 3, activation="relu", name="conv1")(i))
    return keras.Model(i, L.Dense(3, name="d")(x))


def data(n=16):
    return np.random.default_rng(0).normal(size=(n, 8, 8, 1)).astype("float32")


def rule(**extra):
    return {
        "quantize_registry_config": {
            "layer_quantize_config": [
                {
                    "pattern_name": "mine",
                    "layer_type": "Conv2D",
                    "quant_config": [
                        {
                            "target_name": "kernel",
                            "target_type": "weight",
                            "quantizer_config": {"type": "Pof2SQuantizer", "params": {"bit_width": 4}},
                        }
                    ],
                    **extra,
                }
            ]
        }
    }


@portable
def test_a_strategy_file_that_is_not_text_is_named(tmp_path):
    path = tmp_path / "bin.json"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match=r"bin.json: not a text file \(byte 0 is not UTF-8\)"):
        load_strategy("pof2s", str(path))


@portable
def test_a_strategy_nested_past_any_use_is_a_config_error(tmp_path):
    """Merging and parsing walk a strategy recursively: 2000 nested layer_inputs were a RecursionError."""
    pattern = {"layer_type": "Conv2D"}
    for _ in range(2000):
        pattern = {"layer_type": "Conv2D", "layer_inputs": [pattern]}
    deep = {"quantize_registry_config": {"layer_quantize_config": [{"pattern_name": "deep", **pattern}]}}
    where = r"\$\.quantize_registry_config\.layer_quantize_config\[0\]\.layer_inputs\[0\]"
    with pytest.raises(ConfigError, match=rf"{where}.*: nested more than 100 levels deep"):
        load_strategy("pof2s", deep)
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ConfigError, match="deep.json: nested too deep to read"):
        load_strategy("pof2s", str(path))
    chain = {"layer_type": "Conv2D"}
    for _ in range(10):
        chain = {"layer_type": "Conv2D", "layer_inputs": [chain]}
    load_strategy("pof2s", {"quantize_registry_config": {"layer_quantize_config": [{"pattern_name": "ok", **chain}]}})


@portable
@pytest.mark.parametrize(
    "layer_type,said",
    [
        ("keras.layers.Conv2d", r'keras.layers has no Conv2d. Did you mean "Conv2D"'),
        ("os.getcwd", r'"os.getcwd" is not a Keras layer class'),
        ("os.path", r'"os.path" is not a Keras layer class'),
    ],
)
def test_a_dotted_layer_type_is_checked_when_the_strategy_loads(layer_type, said):
    with pytest.raises(ConfigError, match=said):
        load_strategy("pof2s", rule(layer_type=layer_type))


@portable
def test_a_dotted_layer_type_of_a_module_not_installed_matches_by_class_name():
    custom = rule(layer_type="some_module_not_here.layers.Conv2D")
    load_strategy("pof2s", custom)
    qmodel = qstrat.Quantizer(small_model(), "pof2s", custom).quantize_model(data(), verbose=0)
    assert qstrat.get_quantize_info(qmodel)["conv1"]["kernel"]["bit_width"] == 4


@portable
def test_a_name_rule_that_matches_no_layer_warns():
    with pytest.warns(UserWarning, match=r'layer_name "conv_1" matches no layer .* Did you mean "conv1"'):
        qmodel = qstrat.Quantizer(small_model(), "pof2s", rule(layer_name="conv_1")).quantize_model(data(), verbose=0)
    assert qstrat.get_quantize_info(qmodel)["conv1"]["kernel"]["bit_width"] == 8  # the rule did nothing
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*matches no layer.*")
        qstrat.Quantizer(small_model(), "pof2s", rule(layer_name="conv1")).quantize_model(data(), verbose=0)


@portable
@pytest.mark.parametrize(("value", "kind"), [("3", "text"), (3, "a number")])
def test_a_layer_params_value_of_another_kind_than_the_layers_hold_warns(value, kind):
    """Conv2D holds kernel_size as [3, 3]: "3" and 3 equal no layer's, so the rule would silently do nothing."""
    with pytest.warns(UserWarning, match=rf"layer_params.kernel_size: .* is {kind}, but Conv2D layers hold .*\[3, 3\]"):
        qmodel = qstrat.Quantizer(small_model(), "pof2s", rule(layer_params={"kernel_size": value})).quantize_model(
            data(), verbose=0
        )
    assert qstrat.get_quantize_info(qmodel)["conv1"]["kernel"]["bit_width"] == 8  # the rule did nothing
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*layer_params.*")
        qmodel = qstrat.Quantizer(small_model(), "pof2s", rule(layer_params={"kernel_size": [3, 3]})).quantize_model(
            data(), verbose=0
        )
    assert qstrat.get_quantize_info(qmodel)["conv1"]["kernel"]["bit_width"] == 4


def _abs_max(returns):
    class AbsMax(qstrat.BaseQuantizer):
        accepted = ("bit_width",)

        def state_spec(self, shape):
            return {"scale": StateSpec(shape=(), initial=1.0)}

        def __call__(self, x, state, training=False):
            s = ops.convert_to_tensor(state["scale"])
            return ops.clip(ops.round(x / s), self.grid.qmin, self.grid.qmax) * s

        def state_from_tensor(self, tensor):
            return returns

        def state_from_stats(self, stats):
            return {"scale": np.float32(0.1)}

    return AbsMax


@portable
@pytest.mark.parametrize(
    "returns,said",
    [
        ({}, "no value for scale"),
        ({"scale": 1.0, "zero": 0.0}, "keys not in state_spec: zero"),
        ({"scale": np.ones(7, "float32")}, r"state 'scale' has shape \(7,\); its state_spec says \(\)"),
        ({"scale": np.float32("nan")}, "state 'scale' holds NaN or Inf"),
        ({"scale": "big"}, "state 'scale' is not numbers"),
        ([1.0], "returned a list, not a dict"),
    ],
)
def test_quantizer_state_that_breaks_the_contract_is_named(returns, said):
    qstrat.register_quantizer(_abs_max(returns), name="ContractProbe", replace=True)
    s = {
        "base": "",
        "quantize_registry_config": {
            "layer_quantize_config": [
                {
                    "pattern_name": "p",
                    "layer_type": "Conv2D",
                    "quant_config": [
                        {
                            "target_name": "kernel",
                            "target_type": "weight",
                            "quantizer_config": {"type": "ContractProbe", "params": {"bit_width": 8}},
                        }
                    ],
                }
            ]
        },
    }
    with pytest.raises(ConfigError, match=r"AbsMax.state_from_tensor \(conv1.kernel\): " + said):
        qstrat.Quantizer(small_model(), custom_quantize_strategy=s).quantize_model(data(), verbose=0)


@portable
def test_register_quantizer_needs_a_name_that_is_a_string():
    for name in (5, "", "  "):
        with pytest.raises(ConfigError, match="register_quantizer name"):
            qstrat.register_quantizer(_abs_max({}), name=name)


@portable
@pytest.mark.parametrize("value", [math.nan, math.inf, "30"])
def test_a_target_sqnr_that_is_not_a_finite_number_is_refused_before_any_work(value):
    with pytest.raises(ConfigError, match="target_sqnr must be a"):
        qstrat.Quantizer(small_model(), "pof2s").quantize_model(data(), target_sqnr=value, verbose=0)


@portable
def test_save_model_checks_the_path_first(tmp_path):
    qmodel = qstrat.Quantizer(small_model(), "pof2s").quantize_model(data(), verbose=0)
    for path, said in (
        (tmp_path / "q.h5", r"does not end in .keras.* Use .*q.keras"),
        (tmp_path / "q", r"does not end in .keras"),
        (tmp_path / "missing" / "q.keras", "does not exist"),
        (tmp_path, "is a folder"),
    ):
        with pytest.raises(ConfigError, match=said):
            save_model(qmodel, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written


@portable
def test_a_folder_nothing_can_be_written_in_is_refused_before_any_work(tmp_path, monkeypatch):
    """The check creates a file there: asking the system (os.access) says yes to root, and on a read-only
    filesystem. /proc takes no new file, whoever asks."""
    import errno

    from qstrat.errors import QstratError
    from qstrat.files import write_atomically

    s = load_strategy("pof2s")
    with pytest.raises(ConfigError, match="cannot write in the folder /proc"):
        dump_quantize_strategy(s, "/proc/s.json")
    qmodel = qstrat.Quantizer(small_model(), "pof2s").quantize_model(data(), verbose=0)
    with pytest.raises(ConfigError, match="cannot write in the folder /proc"):
        save_model(qmodel, "/proc/q.keras")
    # Failing after the check (the disk full meanwhile): a qstrat error naming the file, and nothing left.
    (tmp_path / "s.json").write_text("the user's earlier file")

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("os.replace", full)
    with pytest.raises(QstratError, match=r"s.json: cannot write the file \(No space left on device\)"):
        write_atomically(str(tmp_path / "s.json"), b"new")
    with pytest.raises(QstratError, match=r"q.keras: cannot save the model \(No space left on device\)"):
        save_model(qmodel, tmp_path / "q.keras")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json"]
    assert (tmp_path / "s.json").read_text() == "the user's earlier file"


@portable
def test_dump_quantize_strategy_checks_the_path_and_verbose(tmp_path):
    s = load_strategy("pof2s")
    with pytest.raises(ConfigError, match="is a folder"):
        dump_quantize_strategy(s, tmp_path)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="does not exist"):
        dump_quantize_strategy(s, tmp_path / "afile" / "s.json")
    with pytest.raises(ConfigError, match="0, 1 or 2"):
        dump_quantize_strategy(s, tmp_path / "s.json", verbose=7)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@portable
def test_export_onnx_refuses_a_float_model_and_checks_its_data(tmp_path):
    from qstrat.export.onnx_export import export_onnx

    before = tmp_path / "prev.onnx"
    before.write_bytes(b"the user's earlier export")
    with pytest.raises(UnsupportedError, match="no qstrat quantizers: quantize it first"):
        export_onnx(small_model(), before)
    assert before.read_bytes() == b"the user's earlier export"
    qmodel = qstrat.Quantizer(small_model(), "pof2s").quantize_model(data(), verbose=0)
    with pytest.raises(CalibrationDataError, match=r"export_onnx data, input 'x': expected shape"):
        export_onnx(qmodel, tmp_path / "q.onnx", data=np.zeros((4, 5, 5, 3), "float32"))
    with pytest.raises(CalibrationDataError, match=r"export_onnx data, input 'x': .* NaN or Inf"):
        export_onnx(qmodel, tmp_path / "q.onnx", data=np.full((4, 8, 8, 1), np.nan, "float32"))
    with pytest.raises(ConfigError, match="export_onnx path: expected a file path, got NoneType"):
        export_onnx(qmodel, None)
    for opset in ("13", 13.0, True):
        with pytest.raises(ConfigError, match=r"opset: expected an ONNX opset from 13 to 23 \(an int\), or None"):
            export_onnx(qmodel, tmp_path / "q.onnx", opset)
    assert not (tmp_path / "q.onnx").exists()
    assert export_onnx(qmodel, tmp_path / "q.onnx", np.int64(17)).opset == 17


@portable
def test_loading_a_model_with_an_unknown_quantizer_leads_with_qstrat_s_message(tmp_path):
    import zipfile

    from qstrat.errors import QstratError

    qmodel = qstrat.Quantizer(small_model(), "pof2s").quantize_model(data(), verbose=0)
    save_model(qmodel, tmp_path / "q.keras")
    with zipfile.ZipFile(tmp_path / "q.keras") as src, zipfile.ZipFile(tmp_path / "bad.keras", "w") as out:
        for name in src.namelist():
            body = src.read(name)
            if name == "config.json":
                body = body.decode().replace('"Pof2SQuantizer"', '"AbsMaxQuantizer"', 1).encode()
            out.writestr(name, body)
    with pytest.raises(QstratError) as info:
        qstrat.load_model(tmp_path / "bad.keras")
    said = str(info.value)
    assert said.startswith(f"{tmp_path / 'bad.keras'}: cannot load the Keras model: ")
    assert 'expected a registered quantizer type, got "AbsMaxQuantizer"' in said and "deserialized" not in said
    with pytest.raises(QstratError, match="expected the path of a model file, got NoneType"):
        qstrat.load_model(None)


@portable
def test_an_empty_output_dir_is_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    qstrat.Quantizer(small_model(), "pof2s").quantize_model(data(), verbose=0, output_format="keras", output_dir="")
    assert [p.name for p in tmp_path.iterdir()] == ["quantized_model.keras"]


@portable
def test_a_new_output_dir_is_made_only_when_the_file_is_written(tmp_path):
    out = tmp_path / "runs" / "a"
    bad = data()
    bad[3, 2, 2, 0] = np.nan
    with pytest.raises(CalibrationDataError, match="NaN"):
        qstrat.Quantizer(small_model(), "pof2s").quantize_model(
            bad, verbose=0, output_format="keras", output_dir=str(out)
        )
    assert list(tmp_path.iterdir()) == []  # the failed run left no empty folder
    qstrat.Quantizer(small_model(), "pof2s").quantize_model(
        data(), verbose=0, output_format="keras", output_dir=str(out)
    )
    assert [p.name for p in out.iterdir()] == ["quantized_model.keras"]
