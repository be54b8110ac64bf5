"""ONNX QDQ export against ONNX Runtime, on every Keras backend.

The exported file is run in ONNX Runtime's default session and with graph
optimizations off, and compared with the Keras quantized model:
- power-of-2 with half-to-even activations: bit-identical (0 mismatches);
- float scales: at most one output step apart, on at most 0.1% of elements;
- DPU rounding (half up): the report's mismatch count equals a recount by ONNX
  Runtime on the same quantizer inputs.
"""

import json
import os
import warnings

import keras
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from keras import ops

import qstrat
from qstrat.api_test import zoo_model
from qstrat.errors import ConfigError, UnsupportedError
from qstrat.export.onnx_export import export_onnx
from qstrat.export.onnx_report import QDQ_INT8_OPTION, SaturationWarning
from qstrat.export.qdq import grid_of, pair_sum_bound
from qstrat.graph import capture
from qstrat.layers import FakeQuant
from qstrat.layers.bias_axis import keras_adds_channels_first_bias_last

pytestmark = pytest.mark.portable

EVEN = {"activation_round_mode": "HALF_TO_EVEN", "input_round_mode": "HALF_TO_EVEN"}


def session(path, optimize=True, int8=False):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if int8:
        so.add_session_config_entry(QDQ_INT8_OPTION, "1")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def run(path, x, **kw):
    s = session(path, **kw)
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def keras_out(qmodel, x):
    return ops.convert_to_numpy(qmodel.predict(x, batch_size=32, verbose=0))


@pytest.fixture(scope="module")
def data():
    return np.random.default_rng(0).normal(size=(64, 16, 16, 3)).astype("float32")


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(3)
    return zoo_model()


def quantize(model, data, strategy, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return qstrat.Quantizer(model, strategy).quantize_model(data, calib_batch_size=16, verbose=0, **kw)


def assert_exports_exactly(m, x, path, **keys):
    """pof2s with ONNX's rounding: the file computes the Keras model's outputs bit for bit."""
    qmodel = quantize(m, x, "pof2s", export_rounding="onnx", **keys)
    export_onnx(qmodel, path)
    assert np.array_equal(run(path, x), keras_out(qmodel, x))
    return qmodel


def output_step(qmodel) -> float:
    info = qstrat.get_quantize_info(qmodel)["head"]["output"]
    return float(2.0 ** -info["quantize_pos"]) if "quantize_pos" in info else float(info["scale"])


@pytest.mark.parametrize("per_channel", [False, True])
def test_pof2s_with_half_to_even_activations_is_bit_identical(model, data, tmp_path, per_channel):
    qmodel = quantize(model, data, "pof2s", weight_per_channel=per_channel, **EVEN)
    path = tmp_path / "q.onnx"
    report = export_onnx(qmodel, path)
    onnx.checker.check_model(onnx.load(path), full_check=True)
    assert not report.inexact() and report.opset == 13
    y = keras_out(qmodel, data)
    for optimize in (True, False):
        assert np.array_equal(run(path, data, optimize=optimize), y)
    # Exact 2^-pos scales, weights stored as int8 on their own axis.
    m = onnx.load(path)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    w = inits["conv1/kernel/quantized"]
    assert w.dtype == np.int8 and w.shape == (8, 3, 3, 3)
    scale = inits["conv1/kernel/scale"]
    assert np.all(np.log2(scale) == np.round(np.log2(scale)))
    assert scale.shape == ((8,) if per_channel else ())
    dq = next(n for n in m.graph.node if n.name == "conv1/kernel/DequantizeLinear")
    assert [a.i for a in dq.attribute if a.name == "axis"] == ([0] if per_channel else [])


def test_node_names_come_from_the_keras_layers(model, data, tmp_path):
    qmodel = quantize(model, data, "pof2s")
    export_onnx(qmodel, tmp_path / "q.onnx")
    names = {n.name for n in onnx.load(tmp_path / "q.onnx").graph.node}
    for layer in ("conv1", "shared_conv", "shared_conv@1", "dw", "convt", "head", "cat", "up", "maxpool"):
        assert layer in names or layer + "/MatMul" in names, layer
    assert {"relu1/output/QuantizeLinear", "conv1/kernel/DequantizeLinear"} <= names
    assert not any(n.startswith("quant_") for n in names)


def quantized_tensors(qmodel, path, x):
    """{target: (keras value, ONNX Runtime value, step)} for every quantized tensor, run in both."""
    nodes = [n for n in capture(qmodel).nodes if isinstance(n.op, FakeQuant)]
    probe = keras.Model(qmodel.inputs, [_fq_output(n) for n in nodes])
    ks = probe.predict(x, verbose=0)
    m = onnx.load(path)
    targets = [n.op.target if "@" not in n.name else n.op.more_targets[int(n.name.split("@")[1]) - 1] for n in nodes]
    for t in targets:
        m.graph.output.append(onnx.ValueInfoProto(name=f"{t}/DequantizeLinear"))
    every = str(path) + ".all.onnx"
    onnx.save(m, every)
    s = session(every)
    outs = s.run([f"{t}/DequantizeLinear" for t in targets], {s.get_inputs()[0].name: x})
    out = {}
    for n, t, k, o in zip(nodes, targets, ks, outs, strict=True):
        grid = grid_of(n.op.quantizer, {key: v.numpy() for key, v in n.op.state.items()}, t)
        if o.shape != k.shape:  # stored channels-first inside the ONNX graph
            o = np.moveaxis(o, 1, -1)
        out[t] = (k, o, np.asarray(grid._broadcast(k.ndim)[0]))
    return out


def _fq_output(node):
    return node.op._inbound_nodes[int(node.name.split("@")[1]) if "@" in node.name else 0].output_tensors[0]


@pytest.mark.parametrize("per_channel", [False, True])
def test_fs_is_within_one_step_on_a_thousandth_of_elements(model, data, tmp_path, per_channel):
    """Every quantized tensor (fs quantizes layer inputs; the model's output is not on a grid)."""
    qmodel = quantize(model, data, "fs", weight_per_channel=per_channel)
    path = tmp_path / "q.onnx"
    export_onnx(qmodel, path)
    tensors = quantized_tensors(qmodel, path, data)
    info = qstrat.get_quantize_info(qmodel)
    assert len(tensors) == sum(
        t["target_type"] in ("input", "output") for layer in info.values() for t in layer.values()
    )
    off = total = 0
    for target, (k, o, step) in tensors.items():
        # One step, plus the float32 rounding of each value: the framework fake-quant's values can sit
        # two ulps off the grid (qdq.Grid.ulp_off).
        assert np.all(np.abs(k - o) <= step + 2 * (np.spacing(np.abs(k)) + np.spacing(np.abs(o)))), target
        steps = np.abs(k - o) / step
        off, total = off + int(np.sum(steps > 0.5)), total + k.size
    assert off <= 0.001 * total
    y = keras_out(qmodel, data)
    assert np.argmax(run(path, data), -1).tolist() == np.argmax(y, -1).tolist()


def test_dpu_rounding_mismatch_count_equals_a_recount_by_onnx_runtime(model, data, tmp_path):
    """Each quantizer's inputs, from Keras, through a one-node QDQ model in ONNX Runtime."""
    qmodel = quantize(model, data, "pof2s")
    report = export_onnx(qmodel, tmp_path / "q.onnx", data=data)
    counted = {r["target"]: r["mismatches"] for r in report.rounding_mismatch}
    assert report.inexact() and sum(counted.values()) > 0
    nodes = [n for n in capture(qmodel).nodes if isinstance(n.op, FakeQuant)]
    probe = keras.Model(qmodel.inputs, [n.in_tensors[0] for n in nodes])
    inputs = probe.predict(data, verbose=0)
    checked = 0
    for n, x in zip(nodes, inputs, strict=True):
        target = n.op.target if "@" not in n.name else n.op.more_targets[int(n.name.split("@")[1]) - 1]
        if target not in counted:
            continue
        grid = grid_of(n.op.quantizer, {k: v.numpy() for k, v in n.op.state.items()}, target)
        ours = ops.convert_to_numpy(n.op.quantizer(ops.convert_to_tensor(x), n.op.state))
        assert _ort_qdq(x, grid, tmp_path).__ne__(ours).sum() == counted[target], target
        checked += 1
    assert checked == len(counted)


def _ort_qdq(x, grid, tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    s = numpy_helper.from_array(np.asarray(grid.scale, np.float32), "s")
    z = numpy_helper.from_array(np.asarray(grid.zero_point).astype(grid.storage()), "z")
    g = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
        ],
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))],
        [s, z],
    )
    assert not grid.per_channel and not grid.clipped
    path = tmp_path / "qdq.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=7), path)
    return session(path).run(None, {"x": x.astype(np.float32)})[0]


def test_metadata_names_the_strategy_and_the_data(model, data, tmp_path):
    qmodel = quantize(model, data, "pof2s")
    export_onnx(qmodel, tmp_path / "q.onnx", data=data[:8], metadata={"owner": "me"})
    props = {p.key: p.value for p in onnx.load(tmp_path / "q.onnx").metadata_props}
    assert props["owner"] == "me" and props["qstrat.version"] == qstrat.__version__
    assert json.loads(props["qstrat.strategy"])["quantize_pipeline_config"]["calib_position_policy"] == "global"
    assert props["qstrat.data_fingerprint"].startswith("sha256:") and len(props["qstrat.data_fingerprint"]) == 71
    assert len(json.loads(props["qstrat.quantizers"])) > 20


def test_a_failed_export_leaves_no_file(model, data, tmp_path, monkeypatch):
    qmodel = quantize(model, data, "pof2s")
    path = tmp_path / "q.onnx"
    path.write_bytes(b"old")

    def fail(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx.ModelProto, "SerializeToString", fail)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(qmodel, path)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["q.onnx"]
    with pytest.raises(ConfigError, match="does not exist"):
        export_onnx(qmodel, tmp_path / "missing" / "q.onnx")


def test_normalization_constants_stay_constants(tmp_path):
    i = keras.Input((6,), name="x")
    norm = keras.layers.Normalization(name="norm")
    x = np.random.default_rng(0).normal(3, 2, (64, 6)).astype("float32")
    norm.adapt(x)
    m = keras.Model(i, keras.layers.Dense(3, name="fc")(norm(i)))
    assert_exports_exactly(m, x, tmp_path / "n.onnx")
    assert [v.name for v in onnx.load(tmp_path / "n.onnx").graph.input] == ["x"]


def test_unsupported_layers_are_named_before_anything_is_written(tmp_path):
    i = keras.Input((8,), name="x")
    m = keras.Model(i, keras.layers.Dense(4, name="fc")(keras.layers.LayerNormalization(name="ln")(i)))
    qmodel = quantize(m, np.ones((4, 8), "float32"), "pof2s")
    with pytest.raises(UnsupportedError, match=r"ln \(LayerNormalization"):
        export_onnx(qmodel, tmp_path / "x.onnx")
    # keras.ops operations other than arithmetic with one constant are refused (two tensors would need their
    # layouts matched, which the layers the optimize stage makes of them do).
    m = keras.Model(i, keras.layers.Dense(4, name="fc")(keras.ops.sin(i)))
    qmodel = quantize(m, np.ones((4, 8), "float32"), "pof2s", convert_tf_op_to_keras=False)
    with pytest.raises(UnsupportedError, match="keras.ops operation"):
        export_onnx(qmodel, tmp_path / "x.onnx")
    assert not os.listdir(tmp_path)


def test_keras_ops_with_a_constant_operand_export_as_keras_computes_them(tmp_path):
    i = keras.Input((4, 4, 3), name="x")
    y = keras.layers.Conv2D(3, 1, name="c")(i)
    y = keras.ops.add(2.0, keras.ops.multiply(y, 0.5))  # scalars, either side
    y = keras.ops.subtract(y, np.array([0.25, -1.0, 3.0], "float32"))  # a per-channel array
    y = keras.ops.subtract(np.array([1.0, 2.0, 4.0], "float32"), y)  # the constant first
    m = keras.Model(i, keras.layers.Dense(2, name="fc")(keras.layers.Flatten(name="f")(y)))
    assert_exports_exactly(
        m, np.random.default_rng(0).normal(size=(32, 4, 4, 3)).astype("float32"), tmp_path / "o.onnx"
    )


# ---- integer kernels on x86 without VNNI ---------------------------------------------------------------


def saturating_model(weight_bit):
    """A bias-free Dense whose weights are all at the top of the grid, fed inputs at the top of theirs."""
    i = keras.Input((64,), name="x")
    fc = keras.layers.Dense(16, use_bias=False, name="fc")
    m = keras.Model(i, keras.layers.Dense(4, name="head")(fc(i)))
    fc.set_weights([np.full((64, 16), 1.98, "float32")])  # 1.98 * 2^6 = 126.7: the top of the 8-bit grid
    x = np.random.default_rng(1).uniform(0.9, 1.0, (128, 64)).astype("float32")
    return quantize(m, x, "pof2s", weight_bit=weight_bit, include_bias_corr=False, include_cle=False, **EVEN), x


def test_the_saturation_bound_is_the_two_largest_same_sign_weights():
    w = np.array([[127, 127, -3], [100, -128, -100], [1, 2, 3]], np.int8)  # channels on axis 0
    assert pair_sum_bound(w, 0, 255).tolist() == [255 * 254, 255 * 228, 255 * 5]
    assert pair_sum_bound(w.T, 1, 128).tolist() == [128 * 254, 128 * 228, 128 * 5]


def test_a_model_built_to_saturate_is_flagged_and_seven_bit_weights_are_safe(tmp_path):
    qmodel, x = saturating_model(8)
    with pytest.warns(SaturationWarning, match=QDQ_INT8_OPTION):
        report = export_onnx(qmodel, tmp_path / "s8.onnx")
    (risk,) = report.saturation_risk
    assert risk["layer"] == "fc" and risk["bound"] == 255 * 254 and risk["channels"] == 16
    # With the session option every CPU computes it exactly; the default session may not (CPU-dependent).
    y = keras_out(qmodel, x)
    assert np.array_equal(run(tmp_path / "s8.onnx", x, int8=True), y)
    assert np.array_equal(run(tmp_path / "s8.onnx", x, optimize=False), y)

    qmodel7, x = saturating_model(7)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SaturationWarning)
        report = export_onnx(qmodel7, tmp_path / "s7.onnx")
    assert report.saturation_risk == []
    assert np.array_equal(run(tmp_path / "s7.onnx", x), keras_out(qmodel7, x))  # the default session, any CPU


# ---- the refine keys: quantize_model writes the file --------------------------------------------------------


def test_quantize_model_writes_the_onnx_file_the_strategy_asks_for(model, data, tmp_path):
    q = qstrat.Quantizer(model, "pof2s")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qmodel = q.quantize_model(
            data, verbose=0, output_format="onnx", output_dir=str(tmp_path / "out"), onnx_opset_version=17, **EVEN
        )
    path = tmp_path / "out" / "quantized_model.onnx"
    assert q.output_path == str(path) and onnx.load(path).opset_import[0].version == 17
    assert np.array_equal(run(path, data), keras_out(qmodel, data))
    saved = json.loads((tmp_path / "out" / "quantized_model_export_report.json").read_text())
    assert saved["opset"] == 17 and saved["rounding_mismatch"] == []
    props = {p.key: p.value for p in onnx.load(path).metadata_props}
    assert json.loads(props["qstrat.strategy"])["refine_pipeline_config"]["output_format"] == "onnx"
    from qstrat.export.rounding import calibration_fingerprint

    assert props["qstrat.calib_fingerprint"] == calibration_fingerprint(data)  # all of it, not the 256 checked


def test_an_unwritable_output_dir_fails_before_calibration(model, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    calls = []

    def data():
        calls.append(1)
        yield np.zeros((2, 16, 16, 3), "float32")

    with pytest.raises(ConfigError, match="output_dir"):
        qstrat.Quantizer(model, "pof2s").quantize_model(
            data(), verbose=0, output_format="keras", output_dir=str(blocker)
        )
    assert calls == []


def test_export_rounding_sets_each_activations_round_mode_as_the_runtime_rounds(model, data):
    def modes(qmodel):
        info = qstrat.get_quantize_info(qmodel)
        return {(layer, t): v["round_mode"] for layer, ts in info.items() for t, v in ts.items() if t != "kernel"}

    onnx_modes = modes(quantize(model, data, "pof2s", export_rounding="onnx"))
    activations = {k: v for k, v in onnx_modes.items() if k[1] != "bias"}
    assert set(activations.values()) == {"HALF_TO_EVEN"}
    tfl = modes(quantize(model, data, "pof2s", export_rounding="tflite"))
    # TFLite requantizes Add in fixed point (half up) and averages half away from zero; a ReLU fused into its
    # producer rounds as that producer does; convolutions, dense layers, Multiply and the input: half to even.
    assert {k for k, v in tfl.items() if k[1] != "bias" and v == "HALF_UP"} == {("add", "output")}
    away = {k for k, v in tfl.items() if k[1] != "bias" and v == "HALF_AWAY_FROM_ZERO"}
    assert away == {("avgpool", "output"), ("gap", "output")}
    assert tfl[("relu1", "output")] == tfl[("image", "output")] == "HALF_TO_EVEN"
    assert {v for k, v in tfl.items() if k[1] == "bias"} == {"HALF_AWAY_FROM_ZERO"}  # stored as integers: kept
    with pytest.raises(ConfigError, match="contradicts export_rounding"):
        quantize(model, data, "pof2s", export_rounding="onnx", activation_round_mode="HALF_UP")


def test_a_shared_quantizer_tflite_rounds_two_ways_is_an_error():
    """conv_a's output quantizer shared with the Add after it: TFLite rounds a conv half to even, an Add half up."""
    from qstrat.passes.quantize_test import q

    i = keras.Input((8, 8, 3), name="image")
    a = keras.layers.Conv2D(3, 3, padding="same", name="conv_a")(i)
    m = keras.Model(i, keras.layers.Add(name="add")([a, i]))
    pattern = {
        "pattern_name": "conv_then_add",
        "layer_type": "Add",
        "layer_inputs": [
            {
                "layer_type": "Conv2D",
                "quant_config": [{"target_name": "output", "target_type": "output", "quantizer_config": q("o")}],
            },
            {"layer_type": "InputLayer", "quant_config": []},
        ],
        "quant_config": [{"target_name": "output", "target_type": "output", "shared_quantizer": "o"}],
    }
    strategy = {"quantize_registry_config": {"layer_quantize_config": [pattern]}}
    x = np.random.default_rng(0).normal(size=(8, 8, 8, 3)).astype("float32")
    with pytest.raises(ConfigError, match='shares the quantizer "o"'):
        qstrat.Quantizer(m, "pof2s", strategy).quantize_model(x, verbose=0, export_rounding="tflite")


# ---- grids and layouts beyond 8-bit per-tensor ---------------------------------------------------------------


def test_wide_weights_are_int32_and_opset_21_runs_with_its_session_option(model, data, tmp_path):
    qmodel = quantize(model, data, "pof2s", weight_bit=12, **EVEN)
    report = export_onnx(qmodel, tmp_path / "w12.onnx")
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(tmp_path / "w12.onnx").graph.initializer}
    assert report.opset == 13 and inits["conv1/kernel/quantized"].dtype == np.int32
    assert np.abs(inits["conv1/kernel/quantized"]).max() > 127  # the 12-bit grid is used
    y = keras_out(qmodel, data)
    assert np.array_equal(run(tmp_path / "w12.onnx", data), y)
    with pytest.warns(UserWarning, match="opset 21 or later"):
        report = export_onnx(qmodel, tmp_path / "o21.onnx", 21)
    assert report.notes and report.opset == 21
    assert np.array_equal(run(tmp_path / "o21.onnx", data, int8=True), y)
    assert np.array_equal(run(tmp_path / "o21.onnx", data, optimize=False), y)


@pytest.mark.parametrize("bits", [16, None])
def test_a_dense_whose_input_no_integer_kernel_takes_computes_in_float_in_the_default_session(bits, tmp_path):
    """ONNX Runtime would make a MatMul of int8 weights on a 16-bit (or float) input a MatMulNBits, which rounds
    that input to 8 bits on the fly: its weights are written as int32, which it leaves to an exact float MatMul."""
    keras.utils.set_random_seed(6)
    i = keras.Input((12,), name="x")
    model = keras.Model(i, keras.layers.Dense(5, name="fc")(keras.layers.Dense(7, name="first")(i)))
    x = np.random.default_rng(1).normal(size=(64, 12)).astype("float32")
    keys = {"activation_bit": 16, "input_bit": 16} if bits else {"ignore_layers": ["first"]}  # None: fc reads floats
    qmodel = quantize(model, x, "pof2s", **EVEN, **keys)
    export_onnx(qmodel, tmp_path / "d.onnx")
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(tmp_path / "d.onnx").graph.initializer}
    assert inits["fc/kernel/quantized"].dtype == np.int32 and np.abs(inits["fc/kernel/quantized"]).max() <= 127
    y = keras_out(qmodel, x)
    assert np.array_equal(run(tmp_path / "d.onnx", x), y)  # the default session, every optimization on
    assert np.array_equal(run(tmp_path / "d.onnx", x, optimize=False), y)


def test_list_outputs_are_named_as_keras_names_them(tmp_path):
    i = keras.Input((8,), name="x")
    h = keras.layers.Dense(6, activation="relu", name="h")(i)
    model = keras.Model(i, [keras.layers.Dense(3, name="logits")(h), keras.layers.Dense(2, name="aux")(h)])
    x = np.random.default_rng(0).normal(size=(32, 8)).astype("float32")
    for keys in ({}, {"ignore_layers": ["aux"]}):  # aux's output: its quantizer's, then its own value
        qmodel = quantize(model, x, "pof2s", **EVEN, **keys)
        export_onnx(qmodel, tmp_path / "l.onnx")
        s = session(tmp_path / "l.onnx")
        assert [o.name for o in s.get_outputs()] == list(qmodel.output_names)
        got, want = s.run(None, {"x": x})[0], qmodel.predict(x, verbose=0)[0]  # the logits: on their grid
        np.testing.assert_array_equal(got, ops.convert_to_numpy(want))
    assert list(qmodel.output_names) == ["logits_output_q", "aux"]


def test_narrow_grids_are_clipped_to_the_grid_not_the_type(tmp_path):
    """4-bit activations: QuantizeLinear alone would saturate at the int8 ends."""
    i = keras.Input((32,), name="x")
    m = keras.Model(i, keras.layers.Dense(8, name="fc")(i))
    x = np.random.default_rng(0).normal(size=(256, 32)).astype("float32")
    qmodel = quantize(m, x[:64], "pof2s", activation_bit=4, input_bit=4, **EVEN)
    export_onnx(qmodel, tmp_path / "a4.onnx")
    wide = x * 4  # far outside the calibrated range: the grid's clipping decides
    assert np.array_equal(run(tmp_path / "a4.onnx", wide), keras_out(qmodel, wide))


def test_per_channel_rescaling_after_a_convolution_keeps_its_axis(tmp_path):
    i = keras.Input((8, 4, 4), name="x")
    y = keras.layers.Rescaling([1.0, 2.0, 0.5, 4.0], name="r")(keras.layers.Conv2D(4, 1, name="c")(i))
    m = keras.Model(i, keras.layers.Flatten(name="f")(y))
    assert_exports_exactly(
        m, np.random.default_rng(0).normal(size=(16, 8, 4, 4)).astype("float32"), tmp_path / "r.onnx"
    )


def test_float_scales_rounding_half_to_even_are_still_counted(tmp_path):
    """ONNX divides by the scale; Keras multiplies by its reciprocal: 0.1 is not a power of two."""
    i = keras.Input((1000,), name="x")
    spec = {"type": "FSQuantizer", "params": {"round_mode": "HALF_TO_EVEN", "symmetry": True, "per_channel": False}}
    fq = FakeQuant(spec, target="x", name="x_q")
    m = keras.Model(i, fq(i))
    fq.state["scale"].assign(0.1)
    x = (np.arange(-500, 500, dtype=np.float32) * np.float32(0.1) + np.float32(0.05))[None]  # near every tie
    report = export_onnx(m, tmp_path / "fs.onnx", data=x)
    assert [q["target"] for q in report.inexact()] == ["x"]
    (counted,) = report.rounding_mismatch
    grid = grid_of(fq.quantizer, {k: v.numpy() for k, v in fq.state.items()}, "x")
    recount = int(np.sum(_ort_qdq(x, grid, tmp_path) != ops.convert_to_numpy(m(x))))
    assert counted["mismatches"] == recount > 0


def test_inputs_given_by_name_are_matched_by_name(tmp_path):
    a, z = keras.Input((8,), name="alpha"), keras.Input((8,), name="zeta")
    m = keras.Model([z, a], keras.layers.Dense(2, name="fc")(keras.layers.Concatenate(name="cat")([z, a])))
    rng = np.random.default_rng(0)
    xz, xa = rng.normal(size=(64, 8)).astype("float32"), (rng.normal(size=(64, 8)) * 7).astype("float32")
    qmodel = quantize(m, [xz, xa], "pof2s")
    by_list = export_onnx(qmodel, tmp_path / "l.onnx", data=[xz, xa]).rounding_mismatch
    by_name = export_onnx(qmodel, tmp_path / "n.onnx", data={"alpha": xa, "zeta": xz}).rounding_mismatch
    assert by_list == by_name


def test_a_dense_on_a_sequence_is_checked_whatever_its_bias(tmp_path):
    """MatMul on a 3-D input becomes an integer kernel in ONNX Runtime even with an int8 bias."""
    i = keras.Input((5, 64), name="x")
    fc = keras.layers.Dense(16, name="fc")
    m = keras.Model(i, keras.layers.Dense(4, name="head")(fc(i)))
    fc.set_weights([np.full((64, 16), 1.98, "float32"), np.zeros(16, "float32")])
    x = np.random.default_rng(1).uniform(0.9, 1.0, (32, 5, 64)).astype("float32")
    qmodel = quantize(m, x, "pof2s", include_bias_corr=False, include_cle=False, **EVEN)
    with pytest.warns(SaturationWarning):
        report = export_onnx(qmodel, tmp_path / "seq.onnx")
    risk = {r["layer"]: r for r in report.saturation_risk}
    assert risk["fc"]["bound"] == 255 * 254 and risk["fc"]["channels"] == 16
    assert np.array_equal(run(tmp_path / "seq.onnx", x, int8=True), keras_out(qmodel, x))


def test_quantize_model_checks_the_onnx_export_before_calibrating(model):
    calls = []

    def data():
        calls.append(1)
        yield np.zeros((2, 16, 16, 3), "float32")

    with pytest.raises(ConfigError, match="onnx_opset_version"):
        qstrat.Quantizer(model, "pof2s").quantize_model(
            data(), verbose=0, output_format="onnx", activation_bit=16, output_dir="/tmp"
        )
    assert calls == []


def _settings_case(case):
    if case == "bilinear":
        i = keras.Input((4, 4, 2))
        x = keras.layers.UpSampling2D(interpolation="bilinear", name="odd")(keras.layers.Conv2D(2, 1)(i))
        return (
            keras.Model(i, x),
            np.ones((2, 4, 4, 2), "float32"),
            r'odd \(UpSampling2D with interpolation "bilinear"\)',
        )
    i = keras.Input((6,))
    x = keras.layers.Activation("mish", name="odd")(keras.layers.Dense(4)(i))
    return keras.Model(i, x), np.ones((2, 6), "float32"), r'odd \(Activation with activation "mish"\)'


@pytest.mark.portable
@pytest.mark.parametrize("case", ["bilinear", "mish"])
def test_layer_settings_with_no_export_are_refused_before_calibrating(case, tmp_path):
    """A supported layer whose settings have no ONNX export is refused before the data is read, with the
    reason export_onnx gives for the calibrated model."""
    model, x, match = _settings_case(case)
    calls = []

    def data():
        calls.append(1)
        yield x

    with pytest.raises(qstrat.UnsupportedError, match=match):
        qstrat.Quantizer(model, "pof2s").quantize_model(
            data(), verbose=0, output_format="onnx", output_dir=str(tmp_path)
        )
    assert calls == [] and os.listdir(tmp_path) == []
    qmodel = qstrat.Quantizer(model, "pof2s").quantize_model(x, verbose=0)
    why = match.split("(", 1)[1]
    with pytest.raises(qstrat.UnsupportedError, match=why):
        export_onnx(qmodel, tmp_path / "m.onnx")


def test_convert_datatype_saves_a_keras_file_and_refuses_onnx(model, data, tmp_path):
    q = qstrat.Quantizer(model, "pof2s")
    q.quantize_model(data, verbose=0, convert_datatype="float16", output_format="keras", output_dir=str(tmp_path))
    assert q.output_path == str(tmp_path / "quantized_model.keras") and os.path.exists(q.output_path)
    with pytest.raises(ConfigError, match="convert_datatype"):
        q.quantize_model(data, verbose=0, convert_datatype="float16", output_format="onnx", output_dir=str(tmp_path))
    assert q.output_path is None


def test_dpu_layer_versions_export_bit_for_bit(tmp_path):
    """The DPU versions (hard sigmoid, x * hard sigmoid, LeakyReLU 26/256, window sums times k/2^n) are
    plain ONNX ops between QDQ pairs, computing what Keras computes: with ONNX's rounding, every output
    equals the Keras model's, with and without ONNX Runtime's graph optimizations."""
    keras.utils.set_random_seed(5)
    i = keras.Input((9, 9, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", name="c")(i)
    gate = keras.layers.Activation("sigmoid", name="gate")(x)
    swish = keras.layers.Activation("swish", name="swish")(x)
    hard = keras.layers.ReLU(6.0, name="hs_relu")(x + 3.0) / 6.0
    leaky = keras.layers.LeakyReLU(0.1, name="leaky")(x)
    y = keras.layers.Add(name="mix")([gate, swish, hard, leaky])
    y = keras.layers.AveragePooling2D(3, strides=1, name="avg")(y)  # 7x7 left: 3x3 windows, 7/64
    y = keras.layers.GlobalAveragePooling2D(name="gap")(y)  # 7x7: 21/1024
    m = keras.Model(i, keras.layers.Dense(4, name="head")(y))
    x_data = np.random.default_rng(1).normal(size=(32, 9, 9, 3)).astype("float32")
    qmodel = assert_exports_exactly(m, x_data, tmp_path / "dpu.onnx")
    kinds = {type(layer).__name__ for layer in qmodel.layers}
    assert {"DPUHardSigmoid", "DPUAveragePooling2D", "DPUGlobalAveragePooling2D"} <= kinds
    assert np.array_equal(run(tmp_path / "dpu.onnx", x_data, optimize=False), keras_out(qmodel, x_data))
    nodes = {n.name: n.op_type for n in onnx.load(tmp_path / "dpu.onnx").graph.node}
    assert nodes["gate"] == "Mul" and nodes["avg"] == "Mul" and nodes["gap"] == "Mul"


@pytest.mark.parametrize("head", ["dense", "conv_transpose"])
def test_fs_exports_a_layer_of_one_output_channel(head, tmp_path):
    """A per-channel weight of one channel (a regression head) exports as its one grid, not along another axis."""
    i = keras.Input((6, 6, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu")(i)
    if head == "dense":
        y = keras.layers.Dense(1, name="head")(keras.layers.GlobalAveragePooling2D()(x))
    else:
        y = keras.layers.Conv2DTranspose(1, 3, strides=2, name="head")(x)
    model = keras.Model(i, y)
    x = np.random.default_rng(1).normal(size=(32, 6, 6, 3)).astype("float32")
    qmodel = quantize(model, x, "fs", weight_per_channel=True)
    path = tmp_path / "q.onnx"
    export_onnx(qmodel, path)
    kernels = [i for i in onnx.load(path).graph.initializer if i.name.endswith("/kernel/scale")]
    assert [tuple(k.dims) for k in kernels] == [(4,), ()]  # per channel, then the head's one scale
    # The head reads its input on a grid where ONNX Runtime may round an element one step the other way (a
    # float scale, README "Export"): its output moves by at most that step times the head's summed |weights|.
    info = qstrat.get_quantize_info(qmodel)["head"]
    kernel = ops.convert_to_numpy(qmodel.get_layer("quant_head").quantized_weight("kernel"))
    # Plus float32 summation in another order: at most (terms) * 2^-24 * sum |w| * the largest input on the grid.
    step, terms = info["input_0"]["scale"], kernel.size
    zp = info["input_0"]["zero_point"]
    largest = max(abs(-128 - zp), abs(127 - zp)) * step  # the int8 grid's farthest value from zero
    bound = step * np.abs(kernel).sum() + terms * 2.0**-24 * np.abs(kernel).sum() * largest
    got, want = run(path, x, optimize=False), keras_out(qmodel, x)
    assert got.shape == want.shape and np.max(np.abs(got - want)) <= bound


@pytest.mark.portable
def test_dict_outputs_are_named_by_their_keys_and_an_int_input_passed_on_stays_int(tmp_path):
    """ONNX Runtime rounds ties to even: with the same rounding every output equals the Keras model's."""
    keras.utils.set_random_seed(3)
    f, ids = keras.Input((6,), name="f"), keras.Input((2,), dtype="int32", name="ids")
    h = keras.layers.Dense(5, activation="relu", name="h")(f)
    model = keras.Model(
        [f, ids], {"zeta": keras.layers.Dense(3, name="d3")(h), "alpha": keras.layers.Dense(2)(h), "passed": ids}
    )
    x = [np.random.default_rng(0).normal(size=(32, 6)).astype("float32"), np.arange(64, dtype="int32").reshape(32, 2)]
    qmodel = qstrat.Quantizer(model, "pof2s").quantize_model(x, verbose=0, **EVEN)
    export_onnx(qmodel, tmp_path / "d.onnx")
    s = session(tmp_path / "d.onnx")
    types = {o.name: o.type for o in s.get_outputs()}
    assert types == {"alpha": "tensor(float)", "passed": "tensor(int32)", "zeta": "tensor(float)"}
    got = dict(zip(types, s.run(None, {"f": x[0], "ids": x[1]}), strict=True))
    want = qmodel.predict(x, verbose=0)
    for key in ("zeta", "alpha", "passed"):
        np.testing.assert_array_equal(got[key], ops.convert_to_numpy(want[key]))


def test_uint8_images_are_cast_to_float_where_rescaling_reads_them(tmp_path):
    """Keras' Rescaling casts integer inputs to float first; the file does too (a Mul of uint8 by a float was
    refused by onnx.checker at every opset). With the same rounding the outputs are the Keras model's."""
    keras.utils.set_random_seed(0)
    i = keras.Input((8, 8, 3), dtype="uint8", name="image")
    x = keras.layers.Conv2D(4, 3, activation="relu", name="c")(keras.layers.Rescaling(1 / 255.0, name="r")(i))
    model = keras.Model(i, keras.layers.Dense(2, name="d")(keras.layers.Flatten()(x)))
    images = np.random.default_rng(0).integers(0, 256, size=(32, 8, 8, 3)).astype("uint8")
    qmodel = qstrat.Quantizer(model, "pof2s").quantize_model(images, verbose=0, **EVEN)
    export_onnx(qmodel, tmp_path / "u8.onnx")
    s = session(tmp_path / "u8.onnx")
    assert [(t.name, t.type) for t in s.get_inputs()] == [("image", "tensor(uint8)")]
    np.testing.assert_array_equal(s.run(None, {"image": images})[0], keras_out(qmodel, images))


def test_the_batch_axis_is_free_for_a_sequential_built_on_one_sample(tmp_path):
    """Calling a Sequential on one sample builds it with a batch of 1; Keras runs it on any batch, so does the file."""
    keras.utils.set_random_seed(0)
    L = keras.layers
    x = np.random.default_rng(0).uniform(size=(32, 8, 8, 3)).astype("float32")
    model = keras.Sequential([L.Conv2D(4, 3, activation="relu"), L.Flatten(), L.Dense(3)])
    model(x[:1])
    qmodel = qstrat.Quantizer(model, "pof2s").quantize_model(x, verbose=0, **EVEN)
    export_onnx(qmodel, tmp_path / "s.onnx")
    s = session(tmp_path / "s.onnx")
    assert s.get_inputs()[0].shape[0] == "batch"
    np.testing.assert_array_equal(s.run(None, {s.get_inputs()[0].name: x})[0], keras_out(qmodel, x))


def _channels_first_model(width: int):
    """conv (6 filters, "same") -> BN on axis 1 -> ReLU -> depthwise -> pooling, channels_first, on 8 x width."""
    f = {"data_format": "channels_first"}
    i = keras.Input((3, 8, width), name="x")
    y = keras.layers.Conv2D(6, 3, padding="same", name="c", **f)(i)
    y = keras.layers.ReLU(name="r")(keras.layers.BatchNormalization(axis=1, name="bn")(y))
    y = keras.layers.DepthwiseConv2D(3, name="dw", **f)(y)
    m = keras.Model(i, keras.layers.GlobalAveragePooling2D(name="gap", **f)(y))
    rng = np.random.default_rng(0)
    m.get_layer("bn").set_weights([rng.uniform(0.5, 2, 6).astype("float32") for _ in range(4)])
    return m, rng.normal(size=(32, 3, 8, width)).astype("float32")


def test_a_channels_first_model_exports_exactly_with_its_bn_folded_on_axis_1(tmp_path):
    m, x = _channels_first_model(9)  # no conv writes an axis as long as its 6 channels
    qmodel = assert_exports_exactly(m, x, tmp_path / "cf.onnx")
    assert "bn" not in [layer.name for layer in qmodel.layers]


def test_a_channels_first_bias_keras_adds_on_the_last_axis_is_a_warning(tmp_path):
    """The conv writes (6, 8, 6): where Keras adds its bias per column, the file (per channel) differs."""
    m, x = _channels_first_model(6)
    qmodel = quantize(m, x, "pof2s", export_rounding="onnx")
    if keras_adds_channels_first_bias_last():
        with pytest.warns(UserWarning, match=r"^c: Keras on this backend adds this channels_first layer's bias"):
            export_onnx(qmodel, tmp_path / "cf.onnx")
        assert not np.array_equal(run(tmp_path / "cf.onnx", x), keras_out(qmodel, x))
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            export_onnx(qmodel, tmp_path / "cf.onnx")
        assert np.array_equal(run(tmp_path / "cf.onnx", x), keras_out(qmodel, x))


def test_a_batch_normalization_on_axis_1_exports_as_its_last_axis_twin_transposed(tmp_path):
    """Left as it is (a channels_first model's BN, unconverted), its factors broadcast over axis 1 in ONNX:
    the file computes, bit for bit, the file of the same BN on the last axis, on the data transposed."""
    rng = np.random.default_rng(0)
    weights = [rng.uniform(0.5, 2, 3).astype("float32") for _ in range(4)]
    x = rng.normal(size=(32, 4, 5, 3)).astype("float32")
    outs = []
    for axis, data in ((-1, x), (1, np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))):
        i = keras.Input(data.shape[1:], name="x")
        m = keras.Model(i, keras.layers.BatchNormalization(axis=axis, name="bn")(i))
        m.get_layer("bn").set_weights(weights)
        qmodel = quantize(m, data, "pof2s", convert_bn_to_dwconv=False)
        assert isinstance(qmodel.get_layer("quant_bn").layer, keras.layers.BatchNormalization)
        export_onnx(qmodel, tmp_path / f"bn{axis}.onnx")
        outs.append(run(tmp_path / f"bn{axis}.onnx", data))
    np.testing.assert_array_equal(np.transpose(outs[1], (0, 2, 3, 1)), outs[0])


def test_a_separable_conv_whose_bias_keras_adds_on_the_last_axis_is_a_warning_too(tmp_path):
    """Unsplit (separable_conv off), its pointwise half writes (6, 6, 6): as for a conv, above."""
    i = keras.Input((3, 8, 8), name="x")
    m = keras.Model(i, keras.layers.SeparableConv2D(6, 3, data_format="channels_first", name="s")(i))
    x = np.random.default_rng(0).normal(size=(16, 3, 8, 8)).astype("float32")
    qmodel = quantize(m, x, "pof2s", separable_conv=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        export_onnx(qmodel, tmp_path / "s.onnx")
    warned = [str(w.message) for w in record if "adds this channels_first layer's bias" in str(w.message)]
    assert [w.split(":")[0] for w in warned] == (["s"] if keras_adds_channels_first_bias_last() else [])
