"""Strategy loading: built-ins, merging, overrides, round trips and error messages."""

import json
import os

import pytest

from qstrat.errors import ConfigError
from qstrat.strategy import builtin_dict, dump_quantize_strategy, load_strategy, parse_strategy, set_quantize_strategy
from qstrat.strategy.keys import SECTIONS

pytestmark = pytest.mark.portable

REG = "quantize_registry_config"


def pattern(name, types="Conv2D", targets=(), **extra):
    return {"pattern_name": name, "layer_type": types, "quant_config": list(targets), **extra}


def pof2(name="", **params):
    return {"name": name, "type": "Pof2SQuantizer", "params": {"bit_width": 8, **params}}


def target(name, ttype="weight", q=None, shared=None):
    d = {"target_name": name, "target_type": ttype}
    if shared:
        d["shared_quantizer"] = shared
    else:
        d["quantizer_config"] = q or pof2()
    return d


def custom(patterns=(), **sections):
    return {**sections, REG: {"layer_quantize_config": list(patterns)}}


@pytest.mark.parametrize("name", ["pof2s", "fs", "tqt", "pof2s_tqt", "8bit", "8bit_tqt"])
def test_builtins_round_trip_exactly(name, tmp_path):
    s = load_strategy(name)
    first = tmp_path / "a.json"
    dump_quantize_strategy(s, first)
    again = load_strategy(name, str(first))
    second = tmp_path / "b.json"
    dump_quantize_strategy(again, second)
    assert first.read_text() == second.read_text()
    assert parse_strategy(json.loads(first.read_text())) == s
    assert [p for p in os.listdir(tmp_path) if p.startswith(".strategy-")] == []  # no temp files left


def test_builtin_files_are_already_canonical():
    for name in ("pof2s", "fs", "tqt"):
        raw = builtin_dict(name)
        assert load_strategy(name).to_dict() == raw, name


def test_aliases_and_reference_defaults():
    assert load_strategy("pof2s_tqt") == load_strategy("tqt")
    s = load_strategy("pof2s")
    assert s.optimize["cle_steps"] == 10 and s.optimize["cle_balance_method"] == "max"
    assert s.optimize["cle_weight_threshold"] == 0.1 and s.optimize["fold_conv_bn"] is True
    assert s.refine["align_concat"] and s.refine["adjust_dpu_shift_cut"] and not s.refine["include_fast_ft"]
    fs = load_strategy("fs")
    assert fs.optimize["fold_conv_bn"] is False and fs.optimize["include_cle"] is True
    conv = s.pattern("conv_dense").quant_config
    assert conv[0].quantizer.params["method"] == "Min_MSE" and conv[2].quantizer.params["round_mode"] == "HALF_UP"
    assert conv[0].quantizer.params["round_mode"] == "HALF_AWAY_FROM_ZERO"  # the DPU's weight rounding
    assert "reference tool" in s.pattern("conv_transpose").comment
    assert load_strategy("tqt").pattern("conv_dense").quant_config[0].quantizer.type == "TQTQuantizer"


def test_every_section_has_every_key():
    s = load_strategy("pof2s")
    for section, attr in (
        ("optimize_pipeline_config", "optimize"),
        ("quantize_pipeline_config", "quantize"),
        ("refine_pipeline_config", "refine"),
    ):
        assert set(SECTIONS[section]) <= set(getattr(s, attr))


def test_precedence_builtin_then_custom_then_overrides():
    s = load_strategy("pof2s", {"optimize_pipeline_config": {"cle_steps": 3}}, cle_steps=7)
    assert s.optimize["cle_steps"] == 7
    s = load_strategy("pof2s", {"optimize_pipeline_config": {"cle_steps": 3}})
    assert s.optimize["cle_steps"] == 3 and s.optimize["include_cle"] is True  # key-wise merge


def test_patterns_merge_by_name():
    base = load_strategy("pof2s")
    replaced = pattern("conv_dense", "Conv2D", [target("kernel", q=pof2(bit_width=4))])
    added = pattern("mine", "Dense", [target("kernel")])
    s = load_strategy("pof2s", custom([replaced, added]))
    names = [p.pattern_name for p in s.patterns]
    assert names == [p.pattern_name for p in base.patterns] + ["mine"]
    assert s.pattern("conv_dense").layer_type == ("Conv2D",)


def test_keyword_overrides_are_routed_and_checked():
    s = load_strategy("pof2s", weight_bit=4, include_cle=False, align_pool=False, ignore_layers=["head"])
    assert s.user["weight_bit"] == 4 and s.optimize["include_cle"] is False and s.refine["align_pool"] is False
    assert s.user["ignore_layers"] == ("head",)
    assert load_strategy("pof2s", replace_relu6=True).optimize["convert_relu6_to_relu"] is True  # legacy name
    with pytest.raises(ConfigError, match='unknown strategy key "weight_bits". Did you mean "weight_bit"'):
        load_strategy("pof2s", weight_bits=4)
    with pytest.raises(ConfigError, match=r"weight_bit: expected an integer in \[1, 16\], got 40"):
        load_strategy("pof2s", weight_bit=40)


def test_scratch_base_and_other_bases():
    s = load_strategy("pof2s", {"base": ""})
    assert s.patterns == () and s.optimize["cle_steps"] == 10 and s.optimize["fold_conv_bn"] is False
    assert load_strategy("pof2s", {"base": "fs"}).base == "fs"


def test_dump_verbose_levels(tmp_path):
    s = load_strategy("pof2s", weight_bit=6)
    v0 = s.to_dict(0)
    assert set(v0) == {"_comment", "base", REG} and set(v0[REG]) == {"user_defined_quantize_config"}
    assert "optimize_pipeline_config" in s.to_dict(1) and "layer_quantize_config" not in s.to_dict(1)[REG]
    # A verbose-0 dump is a valid custom strategy that carries the user settings.
    assert load_strategy("pof2s", v0).user["weight_bit"] == 6


def test_error_names_the_json_path_value_and_fix():
    # Start from scratch so the pattern index in the path is the one written here.
    bad = custom(
        [
            pattern("p0", "Dense"),
            pattern("p1", "Dense"),
            pattern("p2", "Dense"),
            pattern("p3", "Conv2D", [target("kernel", q={"type": "Pof2SQuantizer", "params": {"bit_width": "8"}})]),
        ],
        base="",
    )
    with pytest.raises(ConfigError) as info:
        load_strategy("pof2s", bad)
    assert str(info.value) == (
        "$.quantize_registry_config.layer_quantize_config[3].quant_config[0].quantizer_config.params.bit_width: "
        'expected an integer in [1, 16], got "8" (a string). Write 8 without quotes.'
    )


@pytest.mark.parametrize(
    "strategy,match",
    [
        (
            {"optimize_pipeline_config": {"include_cel": True}},
            r'\$\.optimize_pipeline_config: unknown key "include_cel"\. Did you mean "include_cle"\?',
        ),
        (
            {"optimize_pipeline_config": {"cle_steps": "10"}},
            r'cle_steps: expected an integer in \[1, 1000\], got "10" \(a string\)\. Write 10 without quotes',
        ),
        (
            {"optimize_pipeline_config": {"cle_balance_method": "mean"}},
            r'cle_balance_method: expected one of "max", "avg", got "mean"',
        ),
        (
            {"quantize_pipeline_config": {"quantize_with_xcompiler": True}},
            r"needs the external Vitis AI compiler, which qstrat does not call",
        ),
        (
            {"quantize_pipline_config": {}},
            r'\$: unknown key "quantize_pipline_config"\. Did you mean "quantize_pipeline_config"',
        ),
        (
            {REG: {"user_defined_quantize_config": {"weight_bits": 4}}},
            r'unknown key "weight_bits"\. Did you mean "weight_bit"',
        ),
        (
            {REG: {"user_defined_quantize_config": {"activation_round_mode": "HALF_EVEN"}}},
            r'activation_round_mode: expected one of .* Did you mean "HALF_TO_EVEN"',
        ),
        (
            {REG: {"user_defined_quantize_config": {"layer_config": {"conv1": "int4"}}}},
            r'layer_config\.conv1: expected one of "int8", "int16"',
        ),
        (
            {REG: {"user_defined_quantize_config": {"ignore_layers": "head"}}},
            r'ignore_layers: expected a list, got "head"',
        ),
        (custom([pattern("x", "Conv2d")]), r'layer_type: unknown layer type "Conv2d"\. Did you mean "Conv2D"'),
        (custom([pattern("x", "Conv2D|")]), r"empty alternative in layer_type"),
        (custom([pattern("x", "Conv2D", layer_name="conv[")]), r"layer_name: not a valid regular expression"),
        (
            custom([pattern("x", "Conv2D", layer_params={"kernal_size": [3, 3]})]),
            r'layer_params\.kernal_size: "kernal_size" is not a config key of Conv2D\. Did you mean "kernel_size"',
        ),
        (
            custom([pattern("x", "Conv2D", [target("kernel", ttype="weights")])]),
            r'target_type: expected one of "weight", "bias", "output", "input", got "weights" \(a string\)\. Did you mean "weight"',
        ),
        (
            custom([pattern("x", "Conv2D", [target("kernel", shared="w")])]),
            r'quant_config\[0\]\.shared_quantizer: no quantizer in this pattern is named "w"',
        ),
        (
            custom([pattern("x", "Conv2D", [target("kernel", q=pof2("w")), target("bias", shared="W")])]),
            r'no quantizer in this pattern is named "W"\. Did you mean "w"',
        ),
        (
            custom([pattern("x", "Conv2D", [target("kernel", q=pof2("w")), target("bias", q=pof2("w"))])]),
            r'quantizer name "w" is already used',
        ),
        (
            custom([pattern("x", "Conv2D", layer_inputs=[{"pattern": "y"}])]),
            r'layer_inputs\[0\]\.pattern: no pattern is named "y"',
        ),
        (
            custom(
                [
                    pattern("a", "Conv2D", layer_inputs=[{"pattern": "b"}]),
                    pattern("b", "ReLU", layer_inputs=[{"pattern": "a"}]),
                ]
            ),
            r"patterns refer to each other in a cycle: a -> b -> a",
        ),
        (custom([pattern("a", "Conv2D", layer_inputs=[{"pattern": "a"}])]), r"cycle: a -> a"),
        (
            custom([pattern("x", "Dense"), pattern("x", "Conv2D")], base=""),
            r'"x" is already the name of \$\.quantize_registry_config\.layer_quantize_config\[0\]',
        ),
        (custom([{"layer_type": "Dense"}]), r'missing key "pattern_name"'),
        (
            custom([pattern("x", "Dense", [target("kernel", q={"type": "Pof2Quantizer"})])]),
            r'quantizer_config\.type: expected a registered quantizer type, got "Pof2Quantizer" .*Did you mean "Pof2SQuantizer"',
        ),
        (
            custom(
                [pattern("x", "Dense", [target("kernel", q={"type": "TQTQuantizer", "params": {"per_channel": True}})])]
            ),
            r"params\.per_channel: TQTQuantizer learns one threshold per tensor",
        ),
        (
            custom(
                [pattern("x", "Dense", [target("kernel", q={"type": "FSQuantizer", "quantizer_type": "FSQuantizer"})])]
            ),
            r'both "type" and "quantizer_type" are given',
        ),
        (
            custom([pattern("x", "Dense", [target("input_x", ttype="input")])]),
            r'"input" \(every input\) or "input_<i>"',
        ),
        ({"base": "pof2"}, r'\$\.base: expected a built-in strategy name, got "pof2" .*Did you mean "pof2s"'),
        ([1, 2], r"expected an object, got \[1, 2\]"),
    ],
)
def test_error_messages(strategy, match):
    with pytest.raises(ConfigError, match=match):
        load_strategy("pof2s", strategy)


def test_both_quantizer_spellings_are_accepted():
    spelled = {"quantizer_type": "FSQuantizer", "quantizer_params": {"bit_width": 6, "per_channel": False}}
    s = load_strategy("pof2s", custom([pattern("mine", "Dense", [target("kernel", q=spelled)])]))
    q = s.pattern("mine").quant_config[0].quantizer
    assert q.type == "FSQuantizer" and q.params["bit_width"] == 6
    assert s.pattern("mine").to_dict()["quant_config"][0]["quantizer_config"]["type"] == "FSQuantizer"


def test_file_errors_name_the_file_and_line(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('{\n  "base": "pof2s",\n  "optimize_pipeline_config": {"cle_steps": 3,}\n}\n')
    with pytest.raises(ConfigError, match=r"bad\.json:3:\d+: not valid JSON"):
        load_strategy("pof2s", str(p))
    with pytest.raises(ConfigError, match="cannot read the strategy file"):
        load_strategy("pof2s", str(tmp_path / "missing.json"))
    p.write_text('{"optimize_pipeline_config": {"cle_steps": 0}}')
    with pytest.raises(
        ConfigError,
        match=r"bad\.json: \$\.optimize_pipeline_config\.cle_steps: expected an integer in \[1, 1000\], got 0",
    ):
        load_strategy("pof2s", str(p))


def test_loaded_strategy_is_immutable():
    s = load_strategy("pof2s")
    with pytest.raises(TypeError):
        s.optimize["cle_steps"] = 3
    with pytest.raises(AttributeError):
        s.base = "fs"


def test_set_quantize_strategy_round_trips_every_verbosity(tmp_path):
    from qstrat.strategy import set_quantize_strategy

    s = load_strategy("pof2s", weight_bit=6, ignore_layers=["x"])
    for verbose in (0, 1, 2):
        p = tmp_path / f"v{verbose}.json"
        dump_quantize_strategy(s, p, verbose)
        assert set_quantize_strategy(s, str(p)) == s
        assert set_quantize_strategy(load_strategy("pof2s"), json.loads(p.read_text())).user["weight_bit"] == 6
    assert set_quantize_strategy(s, {"base": "fs"}).base == "fs"


def test_a_strategy_made_before_stands_in_for_the_built_in_or_the_custom_strategy():
    import keras

    import qstrat

    s = load_strategy("fs", weight_bit=4, ignore_layers=["x"])
    assert load_strategy(s) == s and load_strategy("pof2s", s) == s  # its own base, whatever the first argument
    assert load_strategy(s, activation_bit=6) == load_strategy(
        "fs", weight_bit=4, ignore_layers=["x"], activation_bit=6
    )
    assert load_strategy(s, {"base": "pof2s"}).base == "pof2s"
    i = keras.Input((4,))
    model = keras.Model(i, keras.layers.Dense(2)(i))
    assert qstrat.Quantizer(model, s).strategy == s
    assert qstrat.Quantizer(model, custom_quantize_strategy=s).strategy == s


def test_a_long_value_in_an_error_is_cut_short():
    with pytest.raises(ConfigError) as err:
        load_strategy(["pof2s"] * 1000)
    assert len(str(err.value)) < 700


def test_errors_in_a_users_patterns_cite_the_index_in_the_users_file(tmp_path):
    bad_quantizer = {"type": "Pof2SQuantizer", "params": {"bit_width": "8"}}
    user = {
        "quantize_registry_config": {
            "layer_quantize_config": [
                {"pattern_name": "mine_a", "layer_type": "Conv2D", "quant_config": []},
                {
                    "pattern_name": "mine_b",
                    "layer_type": "Conv2D",
                    "quant_config": [
                        {"target_name": "kernel", "target_type": "weight", "quantizer_config": bad_quantizer}
                    ],
                },
            ]
        }
    }
    path = tmp_path / "user.json"
    path.write_text(json.dumps(user))
    with pytest.raises(
        ConfigError, match=r"user\.json: \$\.quantize_registry_config\.layer_quantize_config\[1\]\.quant_config"
    ):
        load_strategy("pof2s", str(path))
    # A pattern that replaces a built-in one by name is cited at its own index too.
    user["quantize_registry_config"]["layer_quantize_config"][1]["pattern_name"] = "conv_dense"
    with pytest.raises(
        ConfigError, match=r"^\$\.quantize_registry_config\.layer_quantize_config\[1\]\.quant_config\[0\]"
    ):
        load_strategy("pof2s", user)
    s = load_strategy("pof2s")
    with pytest.raises(ConfigError, match=r"^\$\.quantize_registry_config\.layer_quantize_config\[1\]\."):
        set_quantize_strategy(s, user)
