"""The quantize pass's partition keys, convert_datatype and shared quantizer state, end to end."""

import warnings

import keras
import numpy as np
import pytest
from keras import layers as L
from keras import ops

import qstrat
from qstrat.errors import ConfigError
from qstrat.layers import FakeQuant, QuantizeWrapper
from qstrat.passes.weight_calibration import joint_tensor
from qstrat.quantizers import Pof2SQuantizer

pytestmark = pytest.mark.portable


def np_(t):
    return ops.convert_to_numpy(t)


def chain():
    """conv_a -> relu_a -> conv_b -> relu_b, with a skip from relu_a to an Add after relu_b, then a head."""
    keras.utils.set_random_seed(1)
    i = keras.Input((8, 8, 3), name="image")
    a = L.ReLU(name="relu_a")(L.Conv2D(4, 3, padding="same", name="conv_a")(i))
    b = L.ReLU(name="relu_b")(L.Conv2D(4, 3, padding="same", name="conv_b")(a))
    c = L.ReLU(name="relu_c")(L.Conv2D(4, 3, padding="same", name="conv_c")(b))
    x = L.Add(name="add")([c, a])
    return keras.Model(i, L.Dense(2, name="head")(L.GlobalAveragePooling2D(name="gap")(x)))


def images(n=32, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (n, 8, 8, 3)).astype("float32")


def quantized_names(qmodel):
    return set(qstrat.get_quantize_info(qmodel))


# ---- input_layers / output_layers ---------------------------------------------------------------


def test_output_layers_leave_everything_after_them_in_float():
    q = qstrat.Quantizer(chain(), "pof2s")
    qmodel = q.quantize_model(images(), verbose=0, output_layers=["relu_b"], include_bias_corr=False)
    assert quantized_names(qmodel) == {"image", "conv_a", "relu_a", "conv_b", "relu_b"}
    for name in ("conv_c", "relu_c", "add", "gap", "head"):
        assert q.report.layers[name].status == "skipped"
        assert "between user_defined_quantize_config.input_layers and output_layers" in q.report.layers[name].reason
    assert not isinstance(qmodel.get_layer("head"), QuantizeWrapper)


def test_input_layers_start_the_part_and_what_enters_it_is_quantized():
    """conv_a starts the part: only the model input is left out, and conv_a reads it through an input quantizer."""
    q = qstrat.Quantizer(chain(), "pof2s")
    qmodel = q.quantize_model(images(), verbose=0, input_layers=["conv_a"], include_bias_corr=False)
    info = qstrat.get_quantize_info(qmodel)
    assert "image" not in info and q.report.layers["image"].status == "skipped"
    assert info["conv_a"]["input_0"]["target_type"] == "input"
    assert info["conv_a"]["input_0"]["quantizer"] == "Pof2SQuantizer"
    assert {"conv_b", "conv_c", "relu_a", "head"} <= set(info)
    fqs = [layer for layer in qmodel.layers if isinstance(layer, FakeQuant)]
    assert sum(fq.target == "conv_a/input_0" for fq in fqs) == 1


@pytest.mark.parametrize("kind", ["conv_relu", "separable"])
def test_an_input_layer_the_optimize_stage_split_starts_the_part_whole(kind):
    """A conv with a fused ReLU becomes conv + ReLU, a SeparableConv2D its depthwise and pointwise halves;
    both halves answer to the layer's name, and the part starts at the first, which reads the input quantizer."""
    i = keras.Input((8, 8, 3), name="image")
    x = L.Conv2D(4, 3, name="conv_a")(i)
    if kind == "conv_relu":
        x = L.Conv2D(4, 3, activation="relu", name="named")(x)
    else:
        x = L.SeparableConv2D(4, 3, name="named")(x)
    model = keras.Model(i, L.Dense(2, name="head")(L.GlobalAveragePooling2D(name="gap")(x)))
    q = qstrat.Quantizer(model, "pof2s")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*never reaches.*")
        qmodel = q.quantize_model(images(), verbose=0, input_layers=["named"], include_bias_corr=False)
    info = qstrat.get_quantize_info(qmodel)
    first = "named" if kind == "conv_relu" else "named_depthwise"
    assert first in info and info[first]["input_0"]["target_type"] == "input"
    assert "conv_a" not in info and "image" not in info
    fqs = [layer for layer in qmodel.layers if isinstance(layer, FakeQuant)]
    assert sum(fq.target.endswith("/input_0") for fq in fqs) == 1  # one quantizer where the part starts


def test_a_skip_connection_around_the_input_layer_keeps_its_path_in_the_part():
    """input_layers=["conv_b"]: the walk back from the output also reaches relu_a through the skip to the Add,
    so conv_a, relu_a and the model input stay in the part (the reference's definition); conv_b reads relu_a's
    quantized output, so it needs no input quantizer of its own."""
    q = qstrat.Quantizer(chain(), "pof2s")
    qmodel = q.quantize_model(images(), verbose=0, input_layers=["conv_b"], include_bias_corr=False)
    info = qstrat.get_quantize_info(qmodel)
    assert {"image", "conv_a", "relu_a", "conv_b", "conv_c", "head"} <= set(info)
    assert "input_0" not in info["conv_b"]


def test_an_input_layer_the_walk_never_reaches_warns():
    with pytest.warns(UserWarning, match="input_layers names 'conv_c', which the walk back"):
        qstrat.Quantizer(chain(), "pof2s").quantize_model(
            images(), verbose=0, input_layers=["conv_c"], output_layers=["relu_a"], include_bias_corr=False
        )


def test_input_and_output_layers_together_cut_a_middle_part():
    q = qstrat.Quantizer(chain(), "pof2s")
    qmodel = q.quantize_model(
        images(),
        verbose=0,
        input_layers=["conv_b"],
        output_layers=["relu_c"],
        include_bias_corr=False,
        include_cle=False,  # CLE rescales weights: float-equivalent, not bit for bit
    )
    info = qstrat.get_quantize_info(qmodel)
    assert set(info) == {"conv_b", "relu_b", "conv_c", "relu_c"}
    assert info["conv_b"]["input_0"]["target_type"] == "input"
    # Outside the part the layers are the float ones, quantizers on: the first block's output is float exactly.
    x = images(8, seed=3)
    net = chain()
    float_a = keras.Model(net.inputs, net.get_layer("relu_a").output)
    q_a = keras.Model(qmodel.inputs, qmodel.get_layer("relu_a").output)
    assert np.array_equal(np_(q_a(x)), np_(float_a(x)))
    qstrat.layers.set_quantizers_enabled(qmodel, False)  # and with the part's quantizers bypassed, the float model
    assert np.array_equal(np_(qmodel(x)), np_(net(x)))


def test_without_partition_keys_everything_is_quantized_as_before():
    q = qstrat.Quantizer(chain(), "pof2s")
    qmodel = q.quantize_model(images(), verbose=0, include_bias_corr=False)
    assert {"image", "conv_a", "conv_b", "conv_c", "head"} <= quantized_names(qmodel)
    assert not any("input_" in k for targets in qstrat.get_quantize_info(qmodel).values() for k in targets)


def test_output_layers_naming_no_layer_is_an_error_with_a_suggestion():
    with pytest.raises(ConfigError, match='output_layers: no layer.*"relu_bb"|output_layers: no layer.*relu_bb'):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qstrat.Quantizer(chain(), "pof2s").quantize_model(images(), verbose=0, output_layers=["relu_bb"])


# ---- convert_datatype ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_convert_datatype_casts_the_optimized_model_and_needs_no_data(dtype):
    model = keras.Sequential(
        [keras.Input((8, 8, 3)), L.Conv2D(4, 3, name="conv"), L.BatchNormalization(name="bn"), L.ReLU(name="relu")]
    )
    model.get_layer("bn").set_weights([np.full(4, v, np.float32) for v in (1.5, 0.2, 0.1, 2.0)])
    q = qstrat.Quantizer(model, "pof2s")
    folded = q.optimize_model(fold_conv_bn=True)
    converted = q.quantize_model(None, verbose=0, convert_datatype=dtype)
    names = [layer.name for layer in converted.layers]
    assert "bn" not in names  # folded first
    conv = converted.get_layer("conv")
    assert conv.compute_dtype == dtype
    for got, want in zip(conv.weights, folded.get_layer("conv").weights, strict=True):
        assert got.dtype == dtype
        assert np.array_equal(np_(got), np_(ops.cast(want, dtype)))  # exactly the folded weights, cast
    assert not any(isinstance(layer, (FakeQuant, QuantizeWrapper)) for layer in converted.layers)
    assert "convert_datatype" in q.report.layers["conv"].reason
    assert np.isfinite(np.asarray(np_(converted(images(4))), np.float32)).all()


def test_convert_datatype_keeps_ignored_and_layer_config_layers_and_warns_about_quantizer_keys():
    q = qstrat.Quantizer(chain(), "pof2s")
    with pytest.warns(UserWarning, match="quantizes nothing, so these settings do nothing: weight_bit"):
        converted = q.quantize_model(
            None,
            verbose=0,
            convert_datatype="float16",
            weight_bit=4,
            ignore_layers=["head"],
            layer_config={"conv_a": "float32", "conv_b": "bfloat16"},
        )
    dtypes = {name: converted.get_layer(name).compute_dtype for name in ("conv_a", "conv_b", "conv_c", "head")}
    assert dtypes == {"conv_a": "float32", "conv_b": "bfloat16", "conv_c": "float16", "head": "float32"}


# ---- shared quantizer state ---------------------------------------------------------------------


def twins():
    """Two parallel convs with the same channel count feeding an Add."""
    keras.utils.set_random_seed(2)
    i = keras.Input((8, 8, 3), name="image")
    a = L.Conv2D(4, 3, padding="same", name="conv_a")(i)
    b = L.Conv2D(4, 3, padding="same", name="conv_b")(i)
    model = keras.Model(i, L.Add(name="add")([a, b]))
    model.get_layer("conv_b").kernel.assign(np_(model.get_layer("conv_b").kernel) * 5.0)  # different ranges
    model.get_layer("conv_b").bias.assign(np.linspace(-3, 3, 4).astype("float32"))
    return model


def q(name="", qtype="Pof2SQuantizer", **params):
    return {"name": name, "type": qtype, "params": {"bit_width": 8, "per_channel": False, **params}}


def sharing_strategy(qtype="Pof2SQuantizer", output_type="Pof2SQuantizer", **output_params):
    """conv_a's weight, bias and output quantizers shared with conv_b (refine/convert_test.py uses it too)."""
    first = [
        {"target_name": "kernel", "target_type": "weight", "quantizer_config": q("w", qtype)},
        {"target_name": "bias", "target_type": "bias", "quantizer_config": q("b", qtype)},
        {"target_name": "output", "target_type": "output", "quantizer_config": q("o", output_type, **output_params)},
    ]
    second = [
        {"target_name": "kernel", "target_type": "weight", "shared_quantizer": "w"},
        {"target_name": "bias", "target_type": "bias", "shared_quantizer": "b"},
        {"target_name": "output", "target_type": "output", "shared_quantizer": "o"},
    ]
    pattern = {
        "pattern_name": "twin_convs",
        "layer_type": "Add",
        "layer_inputs": [
            {"layer_type": "Conv2D", "quant_config": first},
            {"layer_type": "Conv2D", "quant_config": second},
        ],
        "quant_config": [],
    }
    return {"base": "", "quantize_registry_config": {"layer_quantize_config": [pattern]}}


def test_shared_weight_bias_and_output_quantizers_have_one_state():
    model = twins()
    qmodel = qstrat.Quantizer(model, "pof2s", sharing_strategy()).quantize_model(images(), verbose=0)
    wa, wb = qmodel.get_layer("quant_conv_a"), qmodel.get_layer("quant_conv_b")
    for attr in ("kernel", "bias"):
        assert wa.state[attr]["pos"] is wb.state[attr]["pos"]  # one variable
        # Its value is the position of both tensors together: conv_b's larger kernel decides it.
        joint = joint_tensor([np_(model.get_layer(n).weights[attr == "bias"]) for n in ("conv_a", "conv_b")], None)
        want = Pof2SQuantizer(bit_width=8, per_channel=False).state_from_tensor(joint)["pos"]
        assert float(np_(wa.state[attr]["pos"])) == float(want)
        alone = Pof2SQuantizer(bit_width=8, per_channel=False).state_from_tensor(
            np_(model.get_layer("conv_a").weights[attr == "bias"])
        )["pos"]
        assert float(want) != float(alone)  # sharing changed conv_a's position: the test can fail
    info = qstrat.get_quantize_info(qmodel)
    for attr in ("kernel", "bias", "output"):
        assert info["conv_a"][attr]["quantize_pos"] == info["conv_b"][attr]["quantize_pos"]
    fqs = [layer for layer in qmodel.layers if isinstance(layer, FakeQuant)]
    assert len(fqs) == 1  # the two outputs share one FakeQuant layer


def test_shared_state_survives_save_and_load(tmp_path):
    qmodel = qstrat.Quantizer(twins(), "pof2s", sharing_strategy()).quantize_model(images(), verbose=0)
    path = tmp_path / "shared.keras"
    qmodel.save(path)
    loaded = qstrat.load_model(path)
    wa, wb = loaded.get_layer("quant_conv_a"), loaded.get_layer("quant_conv_b")
    assert wa.shared_states["kernel"] is wb.shared_states["kernel"]
    assert wa.state["kernel"]["pos"] is wb.state["kernel"]["pos"]
    x = images(8, seed=5)
    assert np.array_equal(np_(loaded(x)), np_(qmodel(x)))


def test_shared_trained_threshold_is_one_variable_trained_by_both_targets():
    qmodel = qstrat.Quantizer(twins(), "pof2s", sharing_strategy("TQTQuantizer")).quantize_model(images(), verbose=0)
    wa, wb = qmodel.get_layer("quant_conv_a"), qmodel.get_layer("quant_conv_b")
    log_th = wa.state["kernel"]["log_th"]
    assert log_th is wb.state["kernel"]["log_th"]
    assert sum(v is log_th for v in qmodel.trainable_variables) == 1
    before = float(np_(log_th))
    qmodel.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
    x = images(16, seed=6)
    qmodel.fit(x, np.zeros(np_(qmodel(x)).shape, "float32"), epochs=2, batch_size=16, verbose=0)
    assert float(np_(log_th)) != before
    assert float(np_(wa.state["kernel"]["log_th"])) == float(np_(wb.state["kernel"]["log_th"]))


def test_targets_that_share_a_quantizer_but_get_different_settings_are_an_error():
    with pytest.raises(
        ConfigError,
        match=r"shares the quantizer .*bit_width: 8 there .*16 here \(user_defined_quantize_config.layer_config.conv_b\)",
    ):
        qstrat.Quantizer(twins(), "pof2s", sharing_strategy()).quantize_model(
            images(), verbose=0, layer_config={"conv_b": "int16"}
        )


def test_a_quantizer_shared_by_a_weight_and_an_output_is_an_error():
    s = sharing_strategy()
    second = s["quantize_registry_config"]["layer_quantize_config"][0]["layer_inputs"][1]["quant_config"]
    second[2] = {"target_name": "output", "target_type": "output", "shared_quantizer": "w"}
    with pytest.raises(ConfigError, match="serves either weights and biases"):
        qstrat.Quantizer(twins(), "pof2s", s).quantize_model(images(), verbose=0)


def test_joint_tensor_puts_channels_on_the_quantizer_axis():
    a = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    b = -np.arange(5 * 4, dtype=np.float32).reshape(5, 4)
    j = joint_tensor([a, b], -1)
    assert j.shape[-1] == 4
    for c in range(4):
        assert sorted(j[..., c].ravel()) == sorted(np.concatenate([a[..., c].ravel(), b[..., c]]))
    k = joint_tensor([np.moveaxis(a, -1, -2), np.moveaxis(b[None], -1, -2)], -2)
    assert k.shape[-2] == 4 and sorted(k[..., 1, :].ravel()) == sorted(j[..., 1].ravel())
    with pytest.raises(ConfigError, match="one channel count"):
        joint_tensor([a, b[:, :3]], -1)


# ---- fusion rules -----------------------------------------------------------------------------------


def conv_bn_relu():
    keras.utils.set_random_seed(2)
    i = keras.Input((8, 8, 3), name="image")
    x = L.ReLU(name="relu")(L.BatchNormalization(name="bn")(L.Conv2D(4, 3, padding="same", name="conv")(i)))
    return keras.Model(i, L.Dense(2, name="head")(L.GlobalAveragePooling2D(name="gap")(x)))


def test_no_quant_in_conv_bn_act_acts_on_a_batch_norm_left_in_place_and_warns_where_none_is():
    model, x = conv_bn_relu(), images()
    unfolded = {"fold_conv_bn": False, "convert_bn_to_dwconv": False}

    def outputs(**keys):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            qmodel = qstrat.Quantizer(model, "pof2s").quantize_model(x, verbose=0, include_bias_corr=False, **keys)
        own = sorted(la.name for la in qmodel.layers if la.name in ("conv_output_q", "bn_output_q"))
        return own, [str(w.message) for w in seen if "no_quant_in_conv_bn_act" in str(w.message)]

    assert outputs(**unfolded) == ([], [])  # fused: only the ReLU's output is quantized
    assert outputs(**unfolded, no_quant_in_conv_bn_act=False) == (["bn_output_q", "conv_output_q"], [])
    assert outputs() == ([], [])
    own, warned = outputs(no_quant_in_conv_bn_act=False)  # the BN is folded into the conv: nothing to act on
    assert own == [] and len(warned) == 1 and "does nothing here" in warned[0]


def test_an_integer_precision_or_a_percentile_that_reaches_no_quantizer_warns():
    i = keras.Input((8, 8, 1), name="img")
    h = L.MaxPooling2D(name="mp")(L.ReLU(name="r")(L.Conv2D(4, 3, name="c")(i)))
    model = keras.Model(i, L.Dense(3, name="d")(L.Flatten(name="flat")(h)))
    x = np.random.default_rng(0).normal(size=(16, 8, 8, 1)).astype("float32")

    def warned(**keys):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            qstrat.Quantizer(model, "pof2s").quantize_model(x, verbose=0, include_bias_corr=False, **keys)
        return [str(w.message) for w in seen if "does nothing" in str(w.message)]

    flat = warned(layer_config={"flat": "int16"})  # a Flatten passes its input's grid on: nothing to widen
    assert len(flat) == 1 and "layer_config.flat = 'int16' does nothing" in flat[0] and "of its own" in flat[0]
    assert warned(layer_config={"r": "int16"}) == []  # the ReLU's output quantizer is widened
    ignored = warned(layer_config={"c": "int16"}, ignore_layers=["c"])
    assert len(ignored) == 1 and "ignore_layers" in ignored[0]
    pct = warned(weight_method_percentile=99.0)
    assert len(pct) == 1 and 'no weight quantizer here uses method "Percentile"' in pct[0]
    assert warned(weight_method="Percentile", weight_method_percentile=99.0) == []
