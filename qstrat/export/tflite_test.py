"""Tests of `export_tflite` on the digits CNN (TensorFlow only).

The exact claim is per tensor: fed the same int8 inputs, TFLite's default
(XNNPACK) kernels compute every tensor qstrat quantized to within one step of
qstrat's value, and differ only where the exact value is a rounding tie (they
round ties their own way; qstrat's HALF_UP and TF's FakeQuant round them up).
An off-tie difference would mean a wrong scale or weight. End to end the tie
steps add up through the layers, so the output tests check the issue's bar,
top-1 agreement with the Keras model of at least 99.5% on the 355 test digits.
"""

import os
import warnings

import keras
import numpy as np
import pytest

pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TFLite export needs TensorFlow")
tf = pytest.importorskip("tensorflow")

import qstrat  # noqa: E402
from qstrat import zoo  # noqa: E402
from qstrat.export import tflite  # noqa: E402
from qstrat.export.tflite import export_tflite, read_tflite_metadata  # noqa: E402
from qstrat.graph import TensorRef, capture  # noqa: E402
from qstrat.graph.rebuild import replay  # noqa: E402
from qstrat.layers import FakeQuant, QuantizeWrapper  # noqa: E402

META = {"strategy": "pof2s", "note": "digits ÷ 16 → int8", "empty": "", "json": '{"acc": 0.99}'}


def _quantize(model, x, strategy, **keys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", qstrat.PendingKeyWarning)
        x = {k: v[:256] for k, v in x.items()} if isinstance(x, dict) else x[:256]
        return qstrat.Quantizer(model, strategy).quantize_model(x, verbose=0, **keys)


def _invoke(path, x):
    """Run the file on ``x``: (interpreter holding every tensor, dequantized output)."""
    with warnings.catch_warnings():  # tf.lite.Interpreter is deprecated for ai_edge_litert, still there in TF 2.21
        warnings.simplefilter("ignore", UserWarning)
        interp = tf.lite.Interpreter(model_path=str(path), experimental_preserve_all_tensors=True)
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    interp.resize_tensor_input(inp["index"], x.shape)
    interp.allocate_tensors()
    if inp["dtype"] == np.int8:
        s, z = inp["quantization"]
        x = np.clip(np.floor(x / s + 0.5) + z, -128, 127).astype(np.int8)  # HALF_UP, as qstrat's input quantizer
    interp.set_tensor(inp["index"], x)
    interp.invoke()
    y = interp.get_tensor(out["index"]).astype(np.float64)
    if out["dtype"] == np.int8:
        s, z = out["quantization"]
        y = (y - z) * s
    return interp, y


def _activations(interp, batch):
    """{tensor index: (dequantized values, scale, zero point)} of the int8 activation tensors."""
    out = {}
    for d in interp.get_tensor_details():
        s, z = d["quantization"]
        if d["dtype"] != np.int8 or s == 0:
            continue
        try:
            t = interp.get_tensor(d["index"])
        except ValueError:
            continue
        if t.ndim and t.shape[0] == batch:
            out[d["index"]] = ((t.astype(np.float64) - z) * s, s, z)
    return out


def _fake_quants(qmodel, interp, x):
    """[(node, Keras output, its TFLite tensor index)] for every FakeQuant; the tensor is the closest in value."""
    graph = capture(qmodel)
    nodes = [n for n in graph.nodes if isinstance(n.op, FakeQuant)]
    acts = _activations(interp, len(x))
    keras_out = replay(graph, lambda n: n.op, [x], [TensorRef(n.name) for n in nodes])
    pairs = []
    for node, k in zip(nodes, keras_out, strict=True):
        k = np.asarray(k, np.float64)
        index = min((np.abs(v - k).mean(), i) for i, (v, _, _) in acts.items() if v.shape == k.shape)[1]
        pairs.append((node, k, index))
    return graph, pairs, acts


def _grid(q, state):
    """(scale, zero point) of a qstrat quantizer's state."""
    st = {k: np.asarray(v, np.float64) for k, v in state.items()}
    if "scale" in st:
        return st["scale"], st["zero_point"]
    pos = np.asarray(q.position(st), np.float64) if "log_th" in st else st["pos"]
    return 2.0**-pos, st.get("zero_point", np.zeros_like(pos))


def _tflite_weights(interp):
    """[(int8 values, scales, zero points)] of every CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED weight."""
    kinds = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
    details = {d["index"]: d for d in interp.get_tensor_details()}
    out = []
    for op in interp._get_ops_details():
        if op["op_name"] in kinds:
            d = details[op["inputs"][1]]
            q = d["quantization_parameters"]
            assert d["dtype"] == np.int8, f"{op['op_name']} weight {d['name']} is {d['dtype']}"
            out.append((interp.get_tensor(d["index"]).ravel(), q["scales"], q["zero_points"]))
    return out


def _qstrat_weights(qmodel):
    """{layer: (integers in TFLite's layout, scale per output channel)}, with a following BatchNormalization folded."""
    graph = capture(qmodel)
    out = {}
    for node in graph.nodes:
        if not isinstance(node.op, QuantizeWrapper):
            continue
        w, kind = node.op, type(node.op.layer).__name__
        values = np.asarray(w.quantized_weight("kernel"), np.float64)
        scale, _ = _grid(w.quantizers["kernel"], w.state["kernel"])
        channels = values.shape[2:] if kind == "DepthwiseConv2D" else values.shape[-1:]
        scale = np.broadcast_to(scale.reshape(-1, 1) if kind == "DepthwiseConv2D" and scale.ndim else scale, channels)
        ints = values / scale  # on the grid, up to float32 rounding of the products (fs)
        np.testing.assert_allclose(ints, np.round(ints), rtol=0, atol=1e-4, err_msg=w.name)
        ints = np.round(ints)
        factor = np.ones(channels)
        users = graph.consumers(TensorRef(node.name))
        if len(users) == 1 and isinstance(users[0].op, keras.layers.BatchNormalization):
            bn = users[0].op
            factor = (np.asarray(bn.gamma) / np.sqrt(np.asarray(bn.moving_variance) + bn.epsilon)).reshape(channels)
        ints = ints * np.sign(factor)
        layout = {"Conv2D": lambda a: a.transpose(3, 0, 1, 2), "DepthwiseConv2D": lambda a: a, "Dense": lambda a: a.T}
        out[w.layer.name] = (layout[kind](ints).ravel(), (scale * np.abs(factor)).ravel())
    return out


def _check_weights(qmodel, interp, rtol):
    found = _tflite_weights(interp)
    expected = _qstrat_weights(qmodel)
    assert len(found) == len(expected)
    for name, (ints, scales) in expected.items():
        match = [(s, z) for v, s, z in found if v.size == ints.size and np.array_equal(v, ints)]
        assert match, f"{name}: no int8 weight tensor holds qstrat's integers"
        s, z = match[0]
        np.testing.assert_allclose(np.broadcast_to(s, scales.shape), scales, rtol=rtol, atol=0, err_msg=name)
        assert not np.any(z), name


@pytest.fixture(scope="module")
def digits():
    return zoo.digits_cnn(), zoo.digits_split()


@pytest.fixture(scope="module")
def pof2s(digits, tmp_path_factory):
    model, (x_train, _, x_test, _) = digits
    qmodel = _quantize(model, x_train, "pof2s")
    path = tmp_path_factory.mktemp("pof2s") / "digits.tflite"
    report = export_tflite(qmodel, path, int8_io=True, metadata=META)
    interp, y = _invoke(path, x_test)
    return qmodel, path, report, interp, y, x_test


@pytest.fixture(scope="module")
def fs(digits, tmp_path_factory):
    model, (x_train, _, x_test, _) = digits
    qmodel = _quantize(model, x_train, "fs")
    path = tmp_path_factory.mktemp("fs") / "digits_fs.tflite"
    report = export_tflite(qmodel, path, calib_data=x_train[:256])
    interp, y = _invoke(path, x_test)
    return qmodel, path, report, interp, y, x_test


def test_tflite_rounding_makes_the_file_compute_what_keras_computes(digits, tmp_path):
    """export_rounding="tflite": each activation rounds as TFLite's default kernels do.

    The issue's bar is at most one output step apart on at most 1% of elements;
    with the runtime's rounding nothing is left to differ but ties of float
    sums, which 8-bit power-of-2 grids do not have: 0 elements.
    """
    model, (x_train, _, x_test, _) = digits
    qmodel = _quantize(model, x_train, "pof2s", export_rounding="tflite")
    export_tflite(qmodel, tmp_path / "t.tflite", int8_io=True)
    _, y = _invoke(tmp_path / "t.tflite", x_test)
    step = 2.0 ** -qstrat.get_quantize_info(qmodel)["logits"]["output"]["quantize_pos"]
    steps = np.abs(y - np.asarray(qmodel(x_test), np.float64)) / step
    assert steps.max() <= 1 and np.mean(steps > 0.5) <= 0.01
    assert np.array_equal(steps, np.zeros_like(steps))


def test_pof2s_file_is_all_int8_with_qstrat_io_scales(pof2s):
    qmodel, path, report, *_ = pof2s
    info = qstrat.get_quantize_info(qmodel)
    assert set(report["tensors"]) == {"int8", "int32"}  # int32: biases and shape constants
    assert "QUANTIZE" not in report["ops"] and "DEQUANTIZE" not in report["ops"]
    assert report["bytes"] == os.path.getsize(path) < 20_000
    assert report["calibrated"] == [] and report["folded_batch_norms"] == []
    (inp,), (out,) = report["inputs"], report["outputs"]
    assert inp["dtype"] == out["dtype"] == "int8"
    assert inp["scale"] == 2.0 ** -info["digit"]["output"]["quantize_pos"] and inp["zero_point"] == 0
    assert out["scale"] == 2.0 ** -info["logits"]["output"]["quantize_pos"] and out["zero_point"] == 0


def test_pof2s_each_tensor_equals_keras_given_the_same_int8_inputs(pof2s):
    qmodel, _, _, interp, _, x = pof2s
    graph, pairs, acts = _fake_quants(qmodel, interp, x)
    known = {TensorRef(n.name): tf.constant(acts[i][0], tf.float32) for n, _, i in pairs}
    for node, _, index in pairs:
        value, scale, zp = acts[index]
        step, want_zp = _grid(node.op.quantizer, node.op.state)
        assert scale == step and zp == want_zp, f"{node.name}: TFLite range {scale}, {zp}; qstrat's {step}, {want_zp}"
        fed = {r: t for r, t in known.items() if r.node != node.name}
        fed[graph.inputs[0]] = tf.constant(x)
        out, before = replay(graph, lambda n: n.op, fed, [TensorRef(node.name), node.inputs[0]])
        steps = np.abs(np.asarray(out, np.float64) - value) / step
        exact = np.asarray(before, np.float64) / step
        off = steps > 0.5
        assert steps.max() <= 1 + 1e-6, f"{node.name}: {steps.max()} steps apart"
        assert np.all(np.abs(exact[off] % 1 - 0.5) < 1e-6), f"{node.name}: differs off a rounding tie"


def test_pof2s_output_follows_keras(pof2s):
    qmodel, _, report, _, y, x = pof2s
    step = 2.0 ** -qstrat.get_quantize_info(qmodel)["logits"]["output"]["quantize_pos"]
    keras_y = np.asarray(qmodel(x), np.float64)
    steps = np.abs(y - keras_y) / step
    np.testing.assert_array_equal(steps, np.round(steps))  # both on the same output grid
    # Ties the per-tensor test above allows grow through later layers; top-1 is the bar.
    assert (y.argmax(1) == keras_y.argmax(1)).mean() >= 0.995


def test_pof2s_weights_are_qstrat_integers_and_scales(pof2s):
    qmodel, _, _, interp, *_ = pof2s
    _check_weights(qmodel, interp, rtol=0)  # powers of two: exact


def test_tqt_thresholds_become_power_of_two_scales(digits, tmp_path):
    model, (x_train, _, x_test, _) = digits
    qmodel = _quantize(model, x_train, "tqt")
    report = export_tflite(qmodel, tmp_path / "tqt.tflite", int8_io=True)
    info = qstrat.get_quantize_info(qmodel)
    assert report["inputs"][0]["scale"] == 2.0 ** -info["digit"]["output"]["quantize_pos"]
    assert report["outputs"][0]["scale"] == 2.0 ** -info["logits"]["output"]["quantize_pos"]
    interp, y = _invoke(tmp_path / "tqt.tflite", x_test)
    _check_weights(qmodel, interp, rtol=0)
    assert (y.argmax(1) == np.asarray(qmodel(x_test)).argmax(1)).mean() >= 0.995


def test_float_io_wraps_the_same_int8_model(pof2s, tmp_path):
    qmodel, _, int8_report, _, y_int8, x = pof2s
    report = export_tflite(qmodel, tmp_path / "float_io.tflite")
    assert report["inputs"][0]["dtype"] == report["outputs"][0]["dtype"] == "float32"
    assert report["inputs"][0]["scale"] == int8_report["inputs"][0]["scale"]  # the int8 side of QUANTIZE
    assert report["ops"]["QUANTIZE"] == report["ops"]["DEQUANTIZE"] == 1
    _, y = _invoke(tmp_path / "float_io.tflite", x)
    np.testing.assert_array_equal(y.astype(np.float32), y_int8.astype(np.float32))


def test_metadata_round_trip(pof2s):
    _, path, report, *_ = pof2s
    read = read_tflite_metadata(path)
    assert {k: read[k] for k in META} == META
    assert report["metadata"] == sorted(META)
    assert "CONVERSION_METADATA" not in read  # binary, left out


def test_fs_keeps_qstrat_ranges_and_calibrates_only_float_tensors(fs):
    qmodel, _, report, interp, y, x = fs
    assert set(report["tensors"]) == {"int8", "int32", "float32"}  # float32: the model's input and output
    assert report["calibrated"] == ["bn4", "relu4", "logits"]  # the layer outputs no FakeQuant covers
    assert report["folded_batch_norms"] == ["bn1", "bn2", "bn3", "bn4"]
    _, pairs, acts = _fake_quants(qmodel, interp, x)
    for node, _, index in pairs:
        _, scale, zp = acts[index]
        step, want_zp = _grid(node.op.quantizer, node.op.state)
        np.testing.assert_allclose(scale, step, rtol=1e-6, err_msg=node.name)
        assert zp == want_zp, node.name
    keras_y = np.asarray(qmodel(x), np.float64)
    assert (y.argmax(1) == keras_y.argmax(1)).mean() >= 0.995


def test_fs_weights_keep_qstrat_integers_with_bn_folded(fs):
    qmodel, _, _, interp, *_ = fs
    _check_weights(qmodel, interp, rtol=1e-6)  # float scales times gamma / sqrt(var + eps)


def test_fs_without_calib_data_names_the_float_tensors(fs, tmp_path):
    qmodel, *_ = fs
    with pytest.raises(qstrat.UnsupportedError, match=r"outputs of bn4, relu4, logits in float.*calib_data"):
        export_tflite(qmodel, tmp_path / "m.tflite")
    with pytest.raises(qstrat.CalibrationDataError, match="calib_data: 2 input arrays for a model with 1 inputs"):
        export_tflite(qmodel, tmp_path / "m.tflite", calib_data=[np.zeros((2, 16, 16, 1))] * 2)
    with pytest.raises(qstrat.CalibrationDataError, match=r"calib_data, input 'digit': expected shape \(None, 16"):
        export_tflite(qmodel, tmp_path / "m.tflite", calib_data=np.zeros((2, 5, 5, 1)))
    assert os.listdir(tmp_path) == []


def _tiny(act=None, weight=None):
    """Input -> FakeQuant -> Dense (quantized kernel) -> FakeQuant, made in code."""
    pof2 = {"type": "Pof2SQuantizer", "params": {}}
    inp = keras.Input((4,))
    x = FakeQuant(act or pof2, target="x/output", name="fq")(inp)
    x = QuantizeWrapper(keras.layers.Dense(3, name="dense"), {"kernel": weight or pof2})(x)
    return keras.Model(inp, FakeQuant(pof2, target="dense/output", name="fq_out")(x))


@pytest.mark.parametrize(
    "act, weight, match",
    [
        ({"type": "Pof2SQuantizer", "params": {"bit_width": 4}}, None, r"fq \(x/output\): .*4-bit.*bit_width 8"),
        ({"type": "FSQuantizer", "params": {"data_format": "FP16", "bit_width": 16}}, None, r"fq .*float format FP16"),
        ({"type": "FSQuantizer", "params": {"per_channel": True}}, None, r"fq .*per_channel false"),
        (None, {"type": "FSQuantizer", "params": {"symmetry": False}}, r"dense.kernel: asymmetric.*symmetry true"),
    ],
)
def test_unsupported_quantizers_name_the_target(tmp_path, act, weight, match):
    model = _tiny(act, weight)
    if weight is not None:
        model.get_layer("quant_dense").state["kernel"]["zero_point"].assign(np.full((3,), 3.0))
    with pytest.raises(qstrat.UnsupportedError, match=match):
        export_tflite(model, tmp_path / "m.tflite")
    assert os.listdir(tmp_path) == []


def test_bypassed_quantizers_are_refused(tmp_path):
    model = _tiny()
    qstrat.layers.set_quantizers_enabled(model, False)
    with pytest.raises(qstrat.UnsupportedError, match=r"fq \(x/output\): Pof2SQuantizer is bypassed"):
        export_tflite(model, tmp_path / "m.tflite")


def test_other_backends_and_float_models_are_refused(tmp_path, monkeypatch):
    with pytest.raises(qstrat.UnsupportedError, match="no qstrat quantizers"):
        export_tflite(keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]), tmp_path / "m.tflite")
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(qstrat.UnsupportedError, match="runs on jax.*KERAS_BACKEND=tensorflow.*load_model"):
        export_tflite(_tiny(), tmp_path / "m.tflite")


def test_bad_paths_and_metadata_write_nothing(tmp_path):
    model = _tiny()
    with pytest.raises(qstrat.ConfigError, match="does not exist"):
        export_tflite(model, tmp_path / "missing" / "m.tflite")
    with pytest.raises(qstrat.ConfigError, match="is a folder"):
        export_tflite(model, tmp_path)
    with pytest.raises(qstrat.ConfigError, match=r"metadata\['n'\]: expected str keys and str values"):
        export_tflite(model, tmp_path / "m.tflite", metadata={"n": 1})
    with pytest.raises(qstrat.ConfigError, match="converter's own"):
        export_tflite(model, tmp_path / "m.tflite", metadata={"min_runtime_version": "9"})
    assert os.listdir(tmp_path) == []


def test_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "m.tflite"
    path.write_bytes(b"old")
    real = os.replace

    def fail_here(src, dst):
        if os.path.dirname(os.path.abspath(src)) == str(tmp_path):
            raise OSError("disk full")
        real(src, dst)

    monkeypatch.setattr(tflite.os, "replace", fail_here)
    with pytest.raises(qstrat.QstratError, match=r"m.tflite: cannot write the file \(disk full\)"):
        export_tflite(_tiny(), path)
    assert os.listdir(tmp_path) == ["m.tflite"] and path.read_bytes() == b"old"
    monkeypatch.undo()
    report = export_tflite(_tiny(), path)
    assert os.listdir(tmp_path) == ["m.tflite"] and path.stat().st_size == report["bytes"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # an ordinary file, not mkstemp's 0600


def test_shared_layers_and_padding_export(tmp_path):
    """A conv called twice is one TFLite weight set used twice; zero padding keeps its input's range.

    Structure only: the output values are checked per tensor elsewhere (this model's outputs are
    not exact in TFLite, and an untrained head's top-1 flips on one step, so neither is asserted).
    """
    keras.utils.set_random_seed(4)
    i = keras.Input((8, 8, 3), name="img")
    shared = keras.layers.Conv2D(4, 3, padding="same", name="shared")
    x = keras.layers.ZeroPadding2D(1, name="pad")(i)
    a = keras.layers.ReLU(name="ra")(shared(x))
    b = keras.layers.ReLU(name="rb")(shared(keras.layers.Conv2D(3, 1, name="mix")(x)))
    y = keras.layers.Dense(3, name="head")(keras.layers.Flatten(name="flat")(keras.layers.Add(name="add")([a, b])))
    model = keras.Model(i, y)
    x = np.random.default_rng(0).normal(size=(64, 8, 8, 3)).astype("float32")
    qmodel = _quantize(model, x, "pof2s", export_rounding="tflite", include_bias_corr=False)
    report = export_tflite(qmodel, tmp_path / "s.tflite")
    assert report["ops"]["CONV_2D"] == 3 and report["calibrated"] == []
    interp, y_tfl = _invoke(tmp_path / "s.tflite", x)
    filters = [d for d in interp.get_tensor_details() if d["dtype"] == np.int8 and tuple(d["shape"]) == (4, 3, 3, 3)]
    assert len(filters) == 1  # one weight set, read by both calls of the shared conv
    step = 2.0 ** -qstrat.get_quantize_info(qmodel)["head"]["output"]["quantize_pos"]
    steps = (y_tfl - np.asarray(qmodel(x), np.float64)) / step
    assert np.array_equal(steps, np.round(steps))  # both on the head's output grid: the same scale


def test_separable_convolutions_are_refused_with_the_key_that_splits_them(tmp_path):
    """fs keeps SeparableConv2D whole; its middle tensor is float in Keras and would be int8 in TFLite."""
    i = keras.Input((8, 8, 3), name="img")
    x = keras.layers.SeparableConv2D(6, 3, padding="same", name="sep")(i)
    y = keras.layers.Dense(3, name="head")(keras.layers.GlobalAveragePooling2D(name="gap")(keras.layers.ReLU()(x)))
    model = keras.Model(i, y)
    x = np.random.default_rng(0).normal(size=(64, 8, 8, 3)).astype("float32")
    with pytest.raises(qstrat.UnsupportedError, match="separable_conv=True"):
        export_tflite(_quantize(model, x, "fs"), tmp_path / "sep.tflite", calib_data=x)
    assert not os.listdir(tmp_path)
    qmodel = _quantize(model, x, "fs", separable_conv=True)
    report = export_tflite(qmodel, tmp_path / "sep.tflite", calib_data=x)
    assert report["ops"]["DEPTHWISE_CONV_2D"] == 1 and report["ops"]["CONV_2D"] == 2  # pointwise, and the head as 1x1
    _, y_tfl = _invoke(tmp_path / "sep.tflite", x)
    assert (y_tfl.argmax(1) == np.asarray(qmodel(x)).argmax(1)).mean() >= 0.995


@pytest.mark.parametrize("outputs", ["list", "dict", "dict in and out"])
def test_inputs_and_outputs_are_reported_in_the_model_order_with_their_signature_keys(tmp_path, outputs):
    """The converter orders a file's inputs and outputs by name (b before a); the report gives them in the
    Keras model's order with their serving_default keys, and each key runs to the model's same output.

    Every head is one Dense on a quantized input: integer sums are exact, so the file and Keras differ by at
    most the output's rounding, one step, on a tie. The heads' scales differ by 10x and more, so any
    mismatched pair is many steps apart."""
    a, b = keras.Input((4,), name="b_first"), keras.Input((4,), name="a_second")
    heads = [keras.layers.Dense(n, name=f"head{n}")(t) for n, t in ((2, a), (3, b), (4, a))]
    inputs = {"b_first": a, "a_second": b} if outputs == "dict in and out" else [a, b]  # a dict, declared unsorted
    model = keras.Model(inputs, heads if outputs == "list" else dict(zip(("z", "a", "m"), heads, strict=True)))
    for n, scale in ((2, 1.0), (3, 20.0), (4, 400.0)):
        model.get_layer(f"head{n}").kernel.assign(scale * model.get_layer(f"head{n}").kernel)
    rng = np.random.default_rng(0)
    x = [rng.normal(size=(64, 4)).astype("float32"), 10 * rng.normal(size=(64, 4)).astype("float32")]
    if outputs == "dict in and out":
        x = {"b_first": x[0], "a_second": x[1]}
    qmodel = _quantize(model, x, "pof2s", export_rounding="tflite", include_bias_corr=False)
    report = export_tflite(qmodel, tmp_path / "io.tflite")
    order = ["a_second", "b_first"] if outputs == "dict in and out" else ["b_first", "a_second"]  # Keras sorts keys
    assert [r["key"] for r in report["inputs"]] == order == [t.name for t in qmodel.inputs]
    keys = ["output_0", "output_1", "output_2"] if outputs == "list" else ["a", "m", "z"]  # Keras sorts dict keys
    assert [r["key"] for r in report["outputs"]] == keys
    assert [r["shape"] for r in report["outputs"]] == [[-1, int(t.shape[-1])] for t in qmodel.outputs]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        runner = tf.lite.Interpreter(model_path=str(tmp_path / "io.tflite")).get_signature_runner()
    got = runner(**x) if isinstance(x, dict) else runner(b_first=x[0], a_second=x[1])
    want = keras.tree.flatten(qmodel.predict(x, verbose=0))
    for r, y in zip(report["outputs"], want, strict=True):
        assert np.abs(got[r["key"]].astype(np.float64) - y).max() <= r["scale"] * (1 + 1e-6), r["key"]


def test_operators_left_in_float_are_named_with_the_keras_setting_they_come_from(tmp_path):
    """A dilated convolution converts to SpaceToBatchND / BatchToSpaceND around a float CONV_2D."""
    keras.utils.set_random_seed(0)
    i = keras.Input((9, 9, 3))
    y = keras.layers.ReLU()(keras.layers.Conv2D(4, 3, dilation_rate=2, name="dilated")(i))
    model = keras.Model(i, keras.layers.Flatten()(y))
    x = np.random.default_rng(0).uniform(size=(32, 9, 9, 3)).astype("float32")
    qmodel = qstrat.Quantizer(model, "pof2s").quantize_model(x, verbose=0, export_rounding="tflite")
    with pytest.raises(
        qstrat.UnsupportedError, match=r"SpaceToBatchND.* a convolution with dilation_rate > 1 .*export_onnx"
    ):
        qstrat.export_tflite(qmodel, str(tmp_path / "d.tflite"))
    assert list(tmp_path.iterdir()) == []


def test_integer_model_inputs_are_refused_before_calib_data_is_asked_for(tmp_path):
    """A uint8 input cast by a Rescaling: the converter keeps the cast and the Rescaling in float whatever the
    ranges, so the refusal names the input and comes first, with or without calib_data."""
    i = keras.Input((8, 8, 1), dtype="uint8", name="pixels")
    y = keras.layers.Conv2D(4, 3)(keras.layers.Rescaling(1 / 255)(i))
    model = keras.Model(i, keras.layers.Dense(3)(keras.layers.Flatten()(y)))
    x = np.random.default_rng(0).integers(0, 256, (32, 8, 8, 1)).astype("uint8")
    qmodel = qstrat.Quantizer(model, "pof2s").quantize_model(x, verbose=0)
    for kw in ({}, {"calib_data": x}):
        with pytest.raises(qstrat.UnsupportedError, match=r"input pixels \(uint8\).*float input.*export_onnx"):
            export_tflite(qmodel, tmp_path / "u8.tflite", **kw)
    assert list(tmp_path.iterdir()) == []


def test_croppings_permutes_and_global_max_pools_keep_their_inputs_grid(tmp_path):
    """Layers that only move or pick values need no range of their own: the file keeps qstrat's power-of-2 grid
    on their outputs, with no calibration data (a min/max range there would replace the grid)."""
    keras.utils.set_random_seed(5)
    i = keras.Input((10, 10, 3), name="img")
    x = keras.layers.Conv2D(4, 3, padding="same", name="c1")(i)
    x = keras.layers.Permute((2, 1, 3), name="perm")(keras.layers.Cropping2D(1, name="crop")(x))
    x = keras.layers.Conv2D(6, 1, name="c2")(x)
    x = keras.layers.Reshape((1, 1, 6), name="rs")(keras.layers.GlobalMaxPooling2D(name="gmp")(x))
    model = keras.Model(i, keras.layers.Conv2D(3, 1, name="head")(x))
    x = np.random.default_rng(0).normal(size=(64, 10, 10, 3)).astype("float32")
    qmodel = _quantize(model, x, "pof2s", export_rounding="tflite", include_bias_corr=False)
    report = export_tflite(qmodel, tmp_path / "p.tflite")
    assert report["calibrated"] == []
    interp, _ = _invoke(tmp_path / "p.tflite", x)
    scales = [d["quantization"][0] for d in interp.get_tensor_details() if d["dtype"] == np.int8]
    assert len(scales) > 8 and all(np.log2(s) == np.round(np.log2(s)) for s in scales)
