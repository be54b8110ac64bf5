"""Pattern matching against real Keras layers, precedence, and explain()."""

import keras
import pytest

from qstrat.errors import ConfigError
from qstrat.strategy import load_strategy
from qstrat.strategy.match import NodeView
from qstrat.strategy.resolve import explain, resolve_views
from qstrat.strategy.views import views_of_model

pytestmark = pytest.mark.portable

REG = "quantize_registry_config"


def pof2(name="", **params):
    return {"name": name, "type": "Pof2SQuantizer", "params": params}


def tgt(name, ttype="weight", q=None, shared=None):
    d = {"target_name": name, "target_type": ttype}
    if shared:
        d["shared_quantizer"] = shared
    else:
        d["quantizer_config"] = q if q is not None else pof2()
    return d


def scratch(*patterns, **user):
    return {"base": "", REG: {"layer_quantize_config": list(patterns), "user_defined_quantize_config": user}}


def pat(name, types="", targets=(), **extra):
    return {"pattern_name": name, "layer_type": types, "quant_config": list(targets), **extra}


class MyConv(keras.layers.Conv2D):
    """A user subclass: "Conv2D" patterns must match it."""


def model():
    i = keras.Input((16, 16, 3), name="image")
    x = keras.layers.Conv2D(8, 3, padding="same", name="conv1")(i)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU(name="relu1")(x)
    x = MyConv(8, 3, padding="same", dilation_rate=2, name="conv2")(x)
    y = keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(x)
    x = keras.layers.Add(name="add")([x, y])
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.Dense(4, name="head")(x)
    return keras.Model(i, x)


@pytest.fixture(scope="module")
def views():
    return views_of_model(model())


def matched(strategy_dict, views):
    s = load_strategy("pof2s", strategy_dict)
    return {k: v for k, v in resolve_views(s, views).items() if v.targets}


def test_views_follow_the_model(views):
    by = {v.name: v for v in views}
    assert [i.name for i in by["add"].inputs] == ["conv2", "dw"]
    assert by["conv1"].inputs[0].name == "image"


def test_layer_type_alternation_and_subclasses(views):
    got = matched(scratch(pat("p", "Conv2D|Dense", [tgt("kernel")])), views)
    assert set(got) == {"conv1", "conv2", "head"}  # conv2 is a MyConv, a Conv2D subclass
    got = matched(scratch(pat("p", "", [tgt("output", "output")])), views)
    assert set(got) == {v.name for v in views}  # "" matches any layer


def test_layer_name_regex_is_a_full_match(views):
    got = matched(scratch(pat("p", "", [tgt("output", "output")], layer_name=r"conv\d")), views)
    assert set(got) == {"conv1", "conv2"}
    got = matched(scratch(pat("p", "", [tgt("output", "output")], layer_name="conv")), views)
    assert got == {}


def test_layer_params_constraints(views):
    got = matched(scratch(pat("p", "Conv2D", [tgt("kernel")], layer_params={"dilation_rate": [2, 2]})), views)
    assert set(got) == {"conv2"}
    got = matched(
        scratch(pat("p", "Conv2D", [tgt("kernel")], layer_params={"kernel_size": [3, 3], "padding": "same"})), views
    )
    assert set(got) == {"conv1", "conv2"}


def test_two_level_nested_inputs_apply_their_own_quant_config():
    i = keras.Input((8, 8, 3))
    a = keras.layers.Conv2D(4, 3, name="c_in")(i)
    b = keras.layers.BatchNormalization(name="bn")(a)
    c = keras.layers.Conv2D(4, 3, name="c_out")(b)
    d = keras.layers.Conv2D(4, 3, name="c_other")(c)  # input is not a BN: no match
    m = keras.Model(i, d)
    nested = pat(
        "conv_bn_conv",
        "Conv2D",
        [tgt("kernel", q=pof2(bit_width=6))],
        layer_inputs=[
            {
                "layer_type": "BatchNormalization",
                "quant_config": [tgt("output", "output", pof2(bit_width=5))],
                "layer_inputs": [
                    {"layer_type": "Conv2D", "quant_config": [tgt("output", "output", pof2(bit_width=7))]}
                ],
            }
        ],
    )
    r = resolve_views(load_strategy("pof2s", scratch(nested)), views_of_model(m))
    assert r["c_out"].target("kernel").params["bit_width"] == 6
    assert r["bn"].target("output").params["bit_width"] == 5
    assert r["c_in"].target("output").params["bit_width"] == 7
    assert not r["c_other"].targets and "no pattern" in r["c_other"].skip_reason


def test_pattern_references_nest(views):
    s = scratch(
        pat("bn_relu", "ReLU", [], layer_inputs=[{"layer_type": "BatchNormalization"}]),
        pat("conv_after", "Conv2D", [tgt("kernel", q=pof2(bit_width=3))], layer_inputs=[{"pattern": "bn_relu"}]),
    )
    got = matched(s, views)
    assert set(got) == {"conv2"} and got["conv2"].target("kernel").params["bit_width"] == 3


def test_shared_quantizer_used_by_two_targets(views):
    s = scratch(
        pat(
            "add_inputs",
            "Add",
            [],
            layer_inputs=[
                {"layer_type": "Conv2D", "quant_config": [tgt("output", "output", pof2("shared_in", bit_width=8))]},
                {"layer_type": "DepthwiseConv2D", "quant_config": [tgt("output", "output", shared="shared_in")]},
            ],
        )
    )
    got = matched(s, views)
    a, b = got["conv2"].target("output"), got["dw"].target("output")
    assert a.shared_key == b.shared_key == "add_inputs@add/shared_in"
    assert a.params == b.params


def test_name_rule_beats_type_rule_and_later_beats_earlier(views):
    s = scratch(
        pat("name_rule", "", [tgt("kernel", q=pof2(bit_width=16))], layer_name="conv1"),  # earlier, but by name
        pat("type_rule", "Conv2D", [tgt("kernel", q=pof2(bit_width=8, method="Min_MSE"))]),
        pat("later_type_rule", "Conv2D", [tgt("kernel", q=pof2(bit_width=6))]),
    )
    got = matched(s, views)
    k1, k2 = got["conv1"].target("kernel"), got["conv2"].target("kernel")
    assert k1.params["bit_width"] == 16 and k1.sources["bit_width"].endswith("(name_rule)")
    assert k1.params["method"] == "Min_MSE"  # fields merge: the name rule did not set method
    assert k2.params["bit_width"] == 6 and k2.sources["bit_width"].endswith("(later_type_rule)")


def test_handy_keys_sit_between_type_and_name_rules(views):
    s = scratch(
        pat("type_rule", "Conv2D|Dense", [tgt("kernel", q=pof2(bit_width=8)), tgt("output", "output", pof2())]),
        pat("first_last", "", [tgt("kernel", q=pof2(bit_width=16))], layer_name="conv1|head"),
        weight_bit=4,
        activation_bit=6,
    )
    got = matched(s, views)
    assert got["conv2"].target("kernel").params["bit_width"] == 4
    assert got["conv1"].target("kernel").params["bit_width"] == 16
    assert got["conv2"].target("output").params["bit_width"] == 6


def test_a_name_rule_that_changes_the_quantizer_type_still_gets_the_handy_keys_it_does_not_set(views):
    fs = {"name": "", "type": "FSQuantizer", "params": {}}
    s = scratch(
        pat("type_rule", "Conv2D|Dense", [tgt("kernel", q=pof2(bit_width=8))]),
        pat("to_fs", "", [tgt("kernel", q=fs)], layer_name="conv2"),
        pat("to_fs_6", "", [tgt("kernel", q={**fs, "params": {"bit_width": 6}})], layer_name="head"),
        weight_bit=4,
    )
    got = matched(s, views)
    kernel = got["conv2"].target("kernel")
    assert kernel.quantizer_type == "FSQuantizer" and kernel.params["bit_width"] == 4
    assert kernel.sources["bit_width"] == "user_defined_quantize_config.weight_bit"
    assert got["head"].target("kernel").params["bit_width"] == 6  # the name rule's own field wins
    assert got["conv1"].target("kernel").params["bit_width"] == 4


def test_layer_config_ignore_layers_and_unsigned_rule(views):
    s = load_strategy(
        "pof2s", layer_config={"conv1": "int16", "head": "float32"}, ignore_layers=["dw"], activation_unsigned=True
    )
    r = resolve_views(s, views)
    assert {t.params["bit_width"] for t in r["conv1"].targets} == {16}
    assert not r["head"].quantized and "float32" in r["head"].skip_reason
    assert not r["dw"].quantized and "ignore_layers" in r["dw"].skip_reason
    assert r["relu1"].target("output").params["unsigned"] is True  # ReLU-like
    assert r["add"].target("output").params.get("unsigned") is False  # not ReLU-like: unchanged


@pytest.mark.portable
@pytest.mark.parametrize("kw,unsigned", [({}, True), ({"threshold": 0.5}, True), ({"negative_slope": 0.3}, False)])
def test_activation_unsigned_only_where_the_relu_writes_no_negative_value(kw, unsigned):
    """A leaky ReLU (negative_slope) writes negative values: an unsigned grid would clip them all to 0."""
    i = keras.Input((4,), name="x")
    model = keras.Model(i, keras.layers.ReLU(name="act", **kw)(keras.layers.Dense(4, name="d")(i)))
    r = resolve_views(load_strategy("pof2s", activation_unsigned=True), views_of_model(model))
    assert r["act"].target("output").params["unsigned"] is unsigned


def test_layer_config_never_narrows_a_wider_bias(views):
    r = resolve_views(load_strategy("pof2s", layer_config={"conv1": "int16"}, bias_bit=32), views)
    assert r["conv1"].target("bias").params["bit_width"] == 32 and r["conv1"].target("kernel").params["bit_width"] == 16
    assert r["conv2"].target("bias").params["bit_width"] == 32


def test_input_layers_get_the_input_quantizer(views):
    r = resolve_views(load_strategy("pof2s", input_bit=6), views)
    out = r["image"].target("output")
    assert out.target_type == "input" and out.params["bit_width"] == 6 and out.params["method"] == "Min_MSE"


def test_target_disabled_by_a_later_rule(views):
    s = scratch(
        pat("all", "Conv2D", [tgt("kernel"), tgt("output", "output")]),
        {
            "pattern_name": "no_out",
            "layer_type": "",
            "layer_name": "conv1",
            "quant_config": [{"target_name": "output", "target_type": "output", "quantizer_config": None}],
        },
    )
    got = matched(s, views)
    assert [t.target_name for t in got["conv1"].targets] == ["kernel"]
    assert [t.target_name for t in got["conv2"].targets] == ["kernel", "output"]


def test_explain_says_where_each_field_comes_from():
    m = model()
    s = load_strategy("pof2s", weight_bit=4)
    text = explain(s, "conv1", m)
    assert "kernel (weight): Pof2SQuantizer <- layer_quantize_config[0] (conv_dense)" in text
    assert "bit_width          = 4" in text and "<- user_defined_quantize_config.weight_bit" in text
    assert "epsilon" in text and "quantizer default" in text
    assert "not quantized (no pattern" in explain(s, keras.layers.Embedding(10, 4, name="emb"))
    with pytest.raises(ConfigError, match='no layer named "nope"'):
        explain(s, "nope", m)


def test_merged_params_are_checked_when_built(views):
    s = scratch(pat("p", "Conv2D", [tgt("kernel", q=pof2(narrow_range=True))]), weight_unsigned=True)
    r = resolve_views(load_strategy("pof2s", s), views)
    with pytest.raises(
        ConfigError,
        match=r"narrow_range.*Set by: narrow_range <- layer_quantize_config\[0\] \(p\), unsigned <- user_defined_quantize_config\.weight_unsigned",
    ):
        r["conv1"].target("kernel").build()


def test_plain_node_views_work_without_a_model():
    layer = keras.layers.Dense(3, name="d")
    r = resolve_views(load_strategy("pof2s"), [NodeView("d", layer)])
    assert [t.target_name for t in r["d"].targets] == ["kernel", "bias", "output"]


def test_custom_quantizer_and_custom_layer_classes_in_a_strategy():
    from keras import ops

    from qstrat.quantizers import Quantizer, register_quantizer

    @register_quantizer(name="HalfQuantizerForTest", replace=True)
    class Half(Quantizer):
        accepted = ("bit_width",)

        def state_spec(self, shape):
            return {}

        def __call__(self, x, state, training=False):
            return ops.multiply(x, 0.5)

        def state_from_tensor(self, tensor):
            return {}

        def state_from_stats(self, stats):
            return {}

    class Gate(keras.layers.Layer):
        def call(self, x):
            return x

    s = load_strategy(
        "pof2s",
        scratch(
            pat(
                "gates", "Gate", [tgt("output", "output", {"type": "HalfQuantizerForTest", "params": {"bit_width": 3}})]
            )
        ),
        custom_types={"Gate": Gate},
    )
    r = resolve_views(
        s, [NodeView("g", Gate(name="g")), NodeView("d", keras.layers.Dense(2, name="d"))], {"Gate": Gate}
    )
    q = r["g"].target("output").build()
    assert isinstance(q, Half) and q.params.bit_width == 3
    assert not r["d"].quantized
    with pytest.raises(ConfigError, match='unknown layer type "Gate"'):
        load_strategy("pof2s", scratch(pat("gates", "Gate", [])))


def test_weight_targets_apply_only_where_the_weight_exists():
    i = keras.Input((8, 8, 3))
    m = keras.Model(i, keras.layers.Conv2D(4, 3, use_bias=False, name="nobias")(i))
    r = resolve_views(load_strategy("pof2s"), views_of_model(m))
    assert [t.target_name for t in r["nobias"].targets] == ["kernel", "output"]
