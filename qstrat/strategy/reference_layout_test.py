"""Strategy files in the reference tool's layout load, and quantize exactly as the same strategy in the seed's.

Each case is one table (layer class -> its quantizers, with the reference's
numeric method and round-mode codes); `reference_file` writes it in the
reference tool's layout and `seed_file` in the seed's, independently of the
converter under test. The two must give the same quantize info on a model.
"""

import json
import warnings

import keras
import numpy as np
import pytest
from keras import layers as L

import qstrat
from qstrat.errors import ConfigError
from qstrat.strategy import dump_quantize_strategy, load_strategy
from qstrat.strategy.reference_layout import is_reference_layout

pytestmark = pytest.mark.portable

METHODS = {0: "No_OF", 1: "Min_MSE", 2: "Min_KL", 3: "Percentile"}  # the reference doc, §3.1
ROUNDS = {0: "HALF_TO_EVEN", 1: "HALF_UP", 2: "HALF_AWAY_FROM_ZERO", 3: "FLOOR"}


@keras.saving.register_keras_serializable(package="qstrat_test")
class ChannelScale(L.Layer):
    """A user layer with one weight: what a custom_layer_type entry names."""

    def build(self, shape):
        self.scale = self.add_weight(name="scale", shape=(shape[-1],), initializer="ones")

    def call(self, x):
        return x * self.scale


def model():
    keras.utils.set_random_seed(4)
    i = keras.Input((10, 10, 3), name="image")
    x = L.Conv2D(6, 3, padding="same", activation="relu", name="conv")(i)
    x = ChannelScale(name="scale")(x)
    y = L.ReLU(name="relu")(L.DepthwiseConv2D(3, padding="same", name="dw")(x))
    x = L.GlobalAveragePooling2D(name="gap")(L.Add(name="add")([x, y]))
    net = keras.Model(i, L.Dense(3, name="head")(x))
    net.get_layer("scale").scale.assign(np.linspace(0.5, 2.0, 6).astype("float32"))
    return net


def P(bit=8, method=1, rnd=0, **extra):
    return ("Pof2SQuantizer", {"bit_width": bit, "method": method, "round_mode": rnd, "symmetry": True, **extra})


def T(method=0, rnd=0):
    return ("TQTQuantizer", {"bit_width": 8, "method": method, "round_mode": rnd, "symmetry": True})


def F(method=0, rnd=1, per_channel=False, **extra):
    return ("FSQuantizer", {"bit_width": 8, "method": method, "round_mode": rnd, "per_channel": per_channel, **extra})


def pof2s_case():
    w, a = P(8, 1, 0), P(8, 1, 1)
    conv = {"weights": [("kernel", w)], "biases": [("bias", w)], "activation": a}
    table = {
        "Conv2D": conv,
        "DepthwiseConv2D": {**conv, "weights": [("kernel", P(8, 1, 0, per_channel=False))]},
        "Dense": conv,
        "ReLU": {"output": a},
        "Add": {"output": a},
        "GlobalAveragePooling2D": {"output": a},
        "ChannelScale": {"weights": [("scale", w)], "output": a},  # the custom layer
    }
    return table, P(8, 0, 1), {"weight_bit": 6, "activation_method": 0}


def tqt_case():
    w, a = T(0, 0), T(0, 1)
    conv = {"weights": [("kernel", w)], "biases": [("bias", w)], "activation": a}
    table = {"Conv2D": conv, "DepthwiseConv2D": conv, "Dense": conv, "ReLU": {"output": a}, "Add": {"output": a}}
    table["ChannelScale"] = {"weights": [("scale", w)], "output": a}
    return table, P(8, 0, 1), {"activation_bit": 7}


def fs_case():
    k = F(0, 1, per_channel=True)
    table = {
        "Conv2D": {"weights": [("kernel", k)]},
        "DepthwiseConv2D": {"weights": [("kernel", F(0, 1, per_channel=True, channel_axis=2))]},
        "Dense": {"weights": [("kernel", k)]},
        "ChannelScale": {"weights": [("scale", F(0, 1))]},
    }
    return table, F(2, 1, method_percentile=99.9999), {"use_framework_quant": True, "weight_bit": 7}


CASES = {"pof2s": pof2s_case, "tqt": tqt_case, "fs": fs_case}
PIPELINES = {
    "optimize_pipeline_config": {"remove_dropout": True, "separate_conv_act": True, "fold_conv_bn": True},
    "quantize_pipeline_config": {"no_quant_in_conv_act": True, "no_quant_in_add_act": True},
    "refine_pipeline_config": {"include_bias_corr": False},
}


def reference_file(table, input_q, user, xcompiler=False):
    """The strategy in the reference tool's layout (dotted class names, quantizable_* pairs, integer codes)."""

    def q(spec):
        return {"quantizer_type": spec[0], "quantizer_params": dict(spec[1])}

    entries = []
    for cls, e in table.items():
        entry = {"layer_type": f"__main__.{cls}" if cls == "ChannelScale" else f"tensorflow.keras.layers.{cls}"}
        for key, qkey, items in (
            ("quantizable_weights", "weight_quantizers", e.get("weights", [])),
            ("quantizable_biases", "bias_quantizers", e.get("biases", [])),
        ):
            if items:
                entry[key], entry[qkey] = [n for n, _ in items], [q(s) for _, s in items]
        if "activation" in e:
            entry["quantizable_activations"], entry["activation_quantizers"] = ["activation"], [q(e["activation"])]
        if "output" in e:
            entry["quantizable_outputs"], entry["output_quantizers"] = ["0"], [q(e["output"])]
        entries.append(entry)
    quantize = {**PIPELINES["quantize_pipeline_config"], "quantize_with_xcompiler": xcompiler}
    return {
        "optimize_pipeline_config": PIPELINES["optimize_pipeline_config"],
        "quantize_pipeline_config": quantize,
        "refine_pipeline_config": PIPELINES["refine_pipeline_config"],
        "finalize_pipeline_config": {
            "output_format": "",
            "onnx_opset_version": 13,
            "output_dir": "./quantize_results/",
        },
        "quantize_registry_config": {
            "user_quantize_config": {"weight_method": None, **user},
            "custom_layer_type": ["__main__.ChannelScale"],
            "input_quantize_config": {"input_layers": [], "input_quantizer": q(input_q)},
            "layer_quantize_config": entries,
        },
    }


def seed_file(table, input_q, user):
    """The same strategy written in the seed's layout, by hand: names for the codes, targets, patterns."""
    framework = user.get("use_framework_quant")

    def q(spec):
        params = dict(spec[1])
        params["method"], params["round_mode"] = METHODS[params["method"]], ROUNDS[params["round_mode"]]
        if framework is not None and spec[0] == "FSQuantizer":
            params["use_framework_quantizer"] = framework
        return {"type": spec[0], "params": params}

    patterns = []
    for cls, e in table.items():
        targets = [
            {"target_name": n, "target_type": "weight", "quantizer_config": q(s)} for n, s in e.get("weights", [])
        ]
        targets += [{"target_name": n, "target_type": "bias", "quantizer_config": q(s)} for n, s in e.get("biases", [])]
        for key in ("activation", "output"):
            if key in e:
                targets.append({"target_name": "output", "target_type": "output", "quantizer_config": q(e[key])})
        patterns.append({"pattern_name": f"by_hand_{cls}", "layer_type": cls, "quant_config": targets})
    handy = {k: (METHODS[v] if k.endswith("_method") else v) for k, v in user.items() if k != "use_framework_quant"}
    return {
        "base": "",
        **PIPELINES,
        "refine_pipeline_config": {**PIPELINES["refine_pipeline_config"], "onnx_opset_version": 13},
        "quantize_registry_config": {
            "user_defined_quantize_config": {**handy, "weight_method": None},
            "input_quantize_config": {"input_layers": [], "quantizer_config": q(input_q)},
            "layer_quantize_config": patterns,
        },
    }


DATA = np.random.default_rng(2).uniform(-1, 1, (24, 10, 10, 3)).astype("float32")
CUSTOM = {"ChannelScale": ChannelScale}


def quantize_info(strategy):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = qstrat.Quantizer(model(), "pof2s", strategy, custom_objects=CUSTOM)
        qmodel = q.quantize_model(DATA, verbose=0, calib_batch_size=8)
    return qstrat.get_quantize_info(qmodel), qmodel


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_reference_file_quantizes_exactly_as_the_same_strategy_in_the_seed_layout(name):
    table, input_q, user = CASES[name]()
    reference = reference_file(table, input_q, user)
    assert is_reference_layout(reference) and not is_reference_layout(seed_file(table, input_q, user))
    got, qmodel = quantize_info(reference)
    want, _ = quantize_info(seed_file(table, input_q, user))
    assert json.dumps(got, sort_keys=True) == json.dumps(want, sort_keys=True)
    assert "scale" in got and "scale" in got["scale"]  # the custom layer's entry acted
    bit = user.get("weight_bit")
    if bit:  # the user_quantize_config override acted
        assert got["conv"]["kernel"]["bit_width"] == bit
    if name == "pof2s":
        assert got["relu"]["output"]["method"] == "No_OF"  # activation_method: 0, a reference code


def test_the_seed_dump_of_a_converted_file_reloads_to_the_same_strategy(tmp_path):
    table, input_q, user = pof2s_case()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = load_strategy("pof2s", reference_file(table, input_q, user), CUSTOM)
    dump_quantize_strategy(converted, tmp_path / "seed.json")
    assert load_strategy("pof2s", str(tmp_path / "seed.json"), CUSTOM) == converted


def test_settings_without_a_keras3_meaning_warn_and_are_changed():
    table, input_q, user = pof2s_case()
    ref = reference_file(table, input_q, {**user, "use_fixneuron_quant": 1}, xcompiler=True)
    ref["quantize_registry_config"]["layer_quantize_config"].append(
        {
            "layer_type": "tensorflow_model_optimization.vitis.layers.VitisSigmoid",
            "quantizable_outputs": ["0"],
            "output_quantizers": [{"quantizer_type": "Pof2SQuantizer", "quantizer_params": {"bit_width": 8}}],
        }
    )
    with pytest.warns(UserWarning) as record:
        s = load_strategy("pof2s", ref, CUSTOM)
    text = "\n".join(str(w.message) for w in record)
    assert "quantize_with_xcompiler: true became false" in text and s.quantize["quantize_with_xcompiler"] is False
    assert "use_fixneuron_quant dropped" in text
    assert "layer_quantize_config[7] (tensorflow_model_optimization.vitis.layers.VitisSigmoid) dropped" in text
    assert [p.layer_type for p in s.patterns][-1] == ("ChannelScale",)


def test_errors_name_the_path_in_the_users_file(tmp_path):
    table, input_q, user = pof2s_case()
    ref = reference_file(table, input_q, user)
    entries = ref["quantize_registry_config"]["layer_quantize_config"]
    entries.insert(
        0, {"layer_type": "tensorflow_model_optimization.vitis.layers.VitisSoftmax"}
    )  # dropped: indices shift
    entries[3]["weight_quantizers"][0]["quantizer_params"]["bit_width"] = 40
    path = tmp_path / "old.json"
    path.write_text(json.dumps(ref))
    with pytest.raises(
        ConfigError,
        match=r"old\.json: \$\.quantize_registry_config\.layer_quantize_config\[3\]"
        r"\.weight_quantizers\[0\]\.quantizer_params\.bit_width: expected an integer in \[1, 16\], got 40",
    ):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load_strategy("pof2s", str(path), CUSTOM)
    ref["finalize_pipeline_config"]["onnx_opset_version"] = 99
    with pytest.raises(ConfigError, match=r"\$\.finalize_pipeline_config\.onnx_opset_version"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load_strategy("pof2s", ref, CUSTOM)


def test_an_unknown_dotted_class_is_an_error_that_suggests_custom_objects():
    table, input_q, user = pof2s_case()
    ref = reference_file(table, input_q, user)
    with pytest.raises(
        ConfigError, match=r'custom_layer_type\[0\]: "__main__.ChannelScale" names no Keras 3 layer.*custom_objects'
    ):
        load_strategy("pof2s", ref)  # ChannelScale not passed
    ref["quantize_registry_config"]["custom_layer_type"] = []
    ref["quantize_registry_config"]["layer_quantize_config"][0]["layer_type"] = "tensorflow.keras.layers.Conv2DD"
    with pytest.raises(ConfigError, match=r'layer_quantize_config\[0\]\.layer_type: .*Conv2DD.*Did you mean "Conv2D"'):
        load_strategy("pof2s", ref, CUSTOM)


def test_the_convert_command_writes_the_seed_layout_with_a_report(tmp_path, capsys, monkeypatch):
    import sys

    from qstrat import cli

    table, input_q, user = pof2s_case()
    (tmp_path / "old.json").write_text(json.dumps(reference_file(table, input_q, user, xcompiler=True)))
    (tmp_path / "mylayers.py").write_text("from qstrat.strategy.reference_layout_test import ChannelScale\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("mylayers", None)
    rc = cli.main(
        [
            "strategy",
            "convert",
            str(tmp_path / "old.json"),
            "-o",
            str(tmp_path / "new.json"),
            "--custom-objects",
            "mylayers:ChannelScale",
        ]
    )
    text = capsys.readouterr().out
    assert rc == 0
    assert "finalize_pipeline_config.onnx_opset_version -> refine_pipeline_config.onnx_opset_version" in text
    assert (
        "pattern Conv2D: weight target kernel" in text
        and "changed: quantize_pipeline_config.quantize_with_xcompiler" in text
    )
    new = json.loads((tmp_path / "new.json").read_text())
    assert not is_reference_layout(new) and new["base"] == ""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = load_strategy("pof2s", str(tmp_path / "old.json"), CUSTOM)
    assert load_strategy("pof2s", str(tmp_path / "new.json"), CUSTOM) == converted
    args = ["strategy", "convert", str(tmp_path / "old.json"), "-o", str(tmp_path / "new2.json")]
    assert cli.main([*args, "--custom-objects", "mylayers:ChannelScale", "--json"]) == 0
    said = json.loads(capsys.readouterr().out)  # nothing else on stdout
    assert said["reference_layout"] and said["out"] == str(tmp_path / "new2.json")
    assert any("quantize_with_xcompiler" in line for line in said["changed"])
    assert json.loads((tmp_path / "new2.json").read_text()) == new
