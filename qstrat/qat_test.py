"""Quantization-aware training end to end: get_qat_model, the user's fit, get_deploy_model.

The deploy model must compute what the QAT model computes in inference, bit
for bit (np.array_equal) wherever no DPU constraint moved a position; the
fake-folded BatchNormalization must update its statistics for exactly
freeze_bn_delay steps; a model saved mid-training must resume to the same
weights as one trained straight through.
"""

import os
import warnings

import keras
import numpy as np
import pytest
from keras import layers as L

import qstrat
from qstrat import zoo
from qstrat.errors import ConfigError, UnsupportedError
from qstrat.layers import FakeQuant, FoldedConvBN, QuantizeWrapper

pytestmark = pytest.mark.portable

NO_CONSTRAINTS = {
    "adjust_dpu_sigmoid": False,
    "adjust_dpu_shift_cut": False,
    "adjust_dpu_shift_bias": False,
    "adjust_dpu_shift_read": False,
    "adjust_dpu_shift_write": False,
    "adjust_dpu_shift_swish": False,
    "align_concat": False,
    "align_pool": False,
}


def bn_model(seed=0):
    keras.utils.set_random_seed(seed)
    i = keras.Input((16, 16, 1), name="digit")
    x = L.Conv2D(8, 3, padding="same", use_bias=False, name="conv1")(i)
    x = L.BatchNormalization(name="bn1")(x)
    x = L.ReLU(name="relu1")(x)
    x = L.DepthwiseConv2D(3, strides=2, padding="same", use_bias=False, name="dw2")(x)
    x = L.BatchNormalization(name="bn2")(x)
    x = L.ReLU(name="relu2")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    x = L.Dense(16, name="fc")(x)
    x = L.BatchNormalization(name="bn3")(x)
    x = L.ReLU(name="relu3")(x)
    return keras.Model(i, L.Dense(10, name="logits")(x), name="bn_model")


@pytest.fixture(scope="module")
def digits():
    x_train, y_train, x_test, y_test = zoo.digits_split()
    return x_train[:256], y_train[:256], x_test[:64]


def qat(model, x, strategy="tqt", **kw):
    q = qstrat.Quantizer(model, strategy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return q, q.get_qat_model(calib_dataset=x, verbose=0, **kw)


def fit(model, x, y, steps=4, batch=32):
    model.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x[: steps * batch], y[: steps * batch], batch_size=batch, epochs=1, shuffle=False, verbose=0)
    return model


def predict(model, x):
    return np.asarray(keras.ops.convert_to_numpy(model.predict(x, verbose=0, batch_size=64)))


def quantizer_types(model, skip_inputs=False):
    types = set()
    inputs = {t.name for t in model.inputs} if skip_inputs else set()
    for layer in model.layers:
        if isinstance(layer, FakeQuant):
            if layer.target.partition("/")[0] in inputs:
                continue
            types.add(layer.quantizer.type_name)
        elif isinstance(layer, QuantizeWrapper):
            types |= {q.type_name for q in layer.quantizers.values()}
    return types


def test_tqt_qat_trains_thresholds_and_deploys_to_the_same_outputs(digits):
    x, y, x_test = digits
    model = bn_model()
    q, m = qat(model, x, init_quant=True)
    # The tqt strategy keeps a Pof2S input quantizer; everything else trains.
    assert quantizer_types(m, skip_inputs=True) == {"TQTQuantizer"}
    assert quantizer_types(m) == {"TQTQuantizer", "Pof2SQuantizer"}
    before = {v.path: np.array(v) for v in m.trainable_weights if "log_th" in v.path}
    assert before, "TQT thresholds are trainable weights"
    fit(m, x, y)
    after = {v.path: np.array(v) for v in m.trainable_weights if "log_th" in v.path}
    assert any(not np.array_equal(before[k], after[k]) for k in before), "training moved no threshold"
    deployed = q.get_deploy_model(m, **NO_CONSTRAINTS)
    assert quantizer_types(deployed) == {"Pof2SQuantizer"}
    assert q.position_changes == []
    assert np.array_equal(predict(deployed, x_test), predict(m, x_test))
    # The positions are the trained thresholds' b - 1 - ceil(log_th).
    info = qstrat.get_quantize_info(deployed)
    for layer in m.layers:
        if isinstance(layer, FakeQuant) and layer.quantizer.type_name == "TQTQuantizer":
            owner, _, what = layer.target.partition("/")
            log_th = float(np.asarray(layer.state["log_th"]))
            p = layer.quantizer.params
            expected = p.bit_width - 1 + int(p.is_unsigned) - int(np.ceil(log_th))
            assert info[owner][what or "output"]["quantize_pos"] == expected


def test_deploy_reports_the_positions_the_constraints_move(digits):
    x, y, x_test = digits
    q, m = qat(bn_model(), x, init_quant=True)
    fit(m, x, y, steps=2)
    deployed = q.get_deploy_model(m)
    moved = {(c.layer, c.quantizer) for c in q.position_changes}
    same = np.array_equal(predict(deployed, x_test), predict(m, x_test))
    assert same or moved, "outputs differ, yet no position was reported moved"
    # The constraints hold on the deploy model: running them again moves nothing.
    from qstrat.passes.refine.positions import apply_constraints

    assert apply_constraints(deployed, q.strategy.refine) == []


def test_train_with_bn_fake_folds_freezes_and_folds_for_real(digits):
    x, y, x_test = digits
    model = bn_model()
    q, m = qat(model, x, init_quant=True, train_with_bn=True, freeze_bn_delay=3)
    folds = [
        layer.layer
        for layer in m.layers
        if isinstance(layer, QuantizeWrapper) and isinstance(layer.layer, FoldedConvBN)
    ]
    assert sorted(f.name for f in folds) == ["conv1", "dw2", "fc"]
    # Untrained, the fold computes what the folded conv does: the QAT model without train_with_bn, to float32
    # rounding of the fold (the quantized outputs may round the other way where a value sits on a tie).
    _, plain = qat(model, x, init_quant=True)
    a, b = predict(m, x_test), predict(plain, x_test)
    assert np.mean(np.argmax(a, -1) == np.argmax(b, -1)) >= 0.95
    means = []
    for step in range(5):
        fit(m, x[step * 32 :], y[step * 32 :], steps=1)
        means.append([np.array(f.bn.moving_mean) for f in folds])
    for f_index in range(len(folds)):
        moved = [not np.array_equal(means[s][f_index], means[s - 1][f_index]) for s in range(1, 5)]
        assert moved == [True, True, False, False], "moving statistics update for exactly freeze_bn_delay steps"
    deployed = q.get_deploy_model(m, **NO_CONSTRAINTS)
    assert not any(isinstance(getattr(layer, "layer", None), FoldedConvBN) for layer in deployed.layers)
    assert np.array_equal(predict(deployed, x_test), predict(m, x_test))
    # The QAT model is not changed by deploying it.
    assert any(isinstance(getattr(layer, "layer", None), FoldedConvBN) for layer in m.layers)


def test_saved_mid_training_resumes_identically(digits, tmp_path):
    x, y, _ = digits
    _, m = qat(bn_model(), x, init_quant=True, train_with_bn=True)
    fit(m, x, y, steps=2)
    path = os.fspath(tmp_path / "qat.keras")
    m.save(path)
    straight = m
    straight.fit(x[64:128], y[64:128], batch_size=32, epochs=1, shuffle=False, verbose=0)
    resumed = qstrat.load_model(path, compile=True)
    resumed.fit(x[64:128], y[64:128], batch_size=32, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(straight.weights, resumed.weights, strict=True):
        assert np.array_equal(np.array(a), np.array(b)), a.path


@pytest.mark.parametrize("strategy", ["pof2s", "fs"])
def test_pof2s_and_fs_qat_deploy(digits, strategy):
    x, y, x_test = digits
    q, m = qat(bn_model(), x, strategy, init_quant=True)
    fit(m, x, y, steps=2)
    deployed = q.get_deploy_model(m, **NO_CONSTRAINTS)
    assert quantizer_types(deployed) == quantizer_types(m)
    assert np.array_equal(predict(deployed, x_test), predict(m, x_test))


def test_without_init_quant_weights_are_calibrated_and_training_runs(digits):
    x, y, x_test = digits
    q, m = qat(bn_model(), None, init_quant=False)
    for layer in m.layers:
        if isinstance(layer, QuantizeWrapper) and "kernel" in layer.quantizers:
            w = np.array(layer.layer.kernel)
            expected = layer.quantizers["kernel"].state_from_tensor(w)["log_th"]
            assert np.array_equal(np.array(layer.state["kernel"]["log_th"]), expected)
    fit(m, x, y, steps=2)
    assert np.all(np.isfinite(predict(m, x_test)))


def test_bad_input():
    model = bn_model()
    q = qstrat.Quantizer(model, "tqt")
    with pytest.raises(ConfigError, match="calib_dataset"):
        q.get_qat_model(init_quant=True, verbose=0)
    with pytest.raises(ConfigError, match="convert_datatype"):
        q.get_qat_model(convert_datatype="float16", verbose=0)
    with pytest.raises(UnsupportedError, match="no qstrat quantizers"):
        q.get_deploy_model(model)
    with pytest.warns(UserWarning, match="train_with_bn = true does nothing in quantize_model"):
        qstrat.Quantizer(model, "pof2s").quantize_model(
            np.zeros((8, 16, 16, 1), "float32"), train_with_bn=True, verbose=0, include_bias_corr=False
        )
    with pytest.warns(UserWarning, match="include_bias_corr"):
        q.get_qat_model(include_bias_corr=True, verbose=0)


def test_deployed_qat_model_exports_to_onnx_and_onnx_runtime_computes_the_same(digits, tmp_path):
    from qstrat.export.onnx_export import export_onnx
    from qstrat.export.onnx_export_test import EVEN, run

    x, y, x_test = digits
    # Half-to-even activations, the rounding ONNX's QuantizeLinear does, so every tensor can be equal.
    q, m = qat(bn_model(), x, init_quant=True, train_with_bn=True, **EVEN)
    fit(m, x, y, steps=2)
    with pytest.raises(qstrat.UnsupportedError, match=r"folded for training \(train_with_bn\).*get_deploy_model"):
        export_onnx(m, tmp_path / "qat.onnx")  # the QAT model itself: its deploy model is what exports
    if keras.backend.backend() == "tensorflow":
        with pytest.raises(qstrat.UnsupportedError, match=r"train_with_bn\).*get_deploy_model"):
            qstrat.export_tflite(m, tmp_path / "qat.tflite")
    assert not list(tmp_path.iterdir())
    deployed = q.get_deploy_model(m, output_format="onnx", output_dir=os.fspath(tmp_path))
    assert q.output_path == os.path.join(os.fspath(tmp_path), "quantized_model.onnx")
    expected = predict(deployed, x_test)
    assert np.array_equal(run(q.output_path, x_test), expected)
    # The integer reference computes it too, and the golden dump covers every quantized tensor.
    assert np.array_equal(np.asarray(qstrat.simulate_integer(deployed, x_test)), expected)
    index = qstrat.dump_model(deployed, x_test[:1], os.fspath(tmp_path / "dump"))
    info = qstrat.get_quantize_info(deployed)
    assert len(index) == sum(len(targets) for targets in info.values())
    report = export_onnx(deployed, tmp_path / "again.onnx", data=x_test)
    assert report.rounding_mismatch == []
    assert np.array_equal(run(tmp_path / "again.onnx", x_test, optimize=False), expected)


def test_dropout_is_taken_out_with_a_warning_or_kept_to_train_with():
    keras.utils.set_random_seed(0)
    i = keras.Input((8, 8, 3))
    y = L.Dropout(0.5, name="drop")(L.Conv2D(4, 3, activation="relu", name="conv")(i))
    model = keras.Model(i, L.Dense(3, name="head")(L.Flatten()(y)))
    x = np.random.default_rng(0).uniform(size=(32, 8, 8, 3)).astype("float32")
    q = qstrat.Quantizer(model, "pof2s")
    with pytest.warns(UserWarning, match=r"took out 1 training-only layer\(s\) \(drop\).*remove_dropout=False"):
        plain = q.get_qat_model(init_quant=True, calib_dataset=x, verbose=0)
    assert "Dropout" not in [type(layer).__name__ for layer in plain.layers]
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        qat = q.get_qat_model(init_quant=True, calib_dataset=x, remove_dropout=False, verbose=0)
    assert not [w for w in said if "training-only" in str(w.message)]
    first, second = (keras.ops.convert_to_numpy(qat(x[:4], training=True)) for _ in range(2))
    assert not np.array_equal(first, second)  # the dropout masks differ from call to call
    deploy = q.get_deploy_model(qat, verbose=0)
    np.testing.assert_array_equal(deploy.predict(x, verbose=0), qat.predict(x, verbose=0))


def test_regularizers_a_fold_or_cle_moves_are_named_in_a_warning():
    keras.utils.set_random_seed(0)
    l2 = keras.regularizers.L2(0.1)
    i = keras.Input((8, 8, 1))
    c = keras.layers.Conv2D(4, 3, kernel_regularizer=l2, name="c1")(i)
    b = keras.layers.BatchNormalization(gamma_regularizer=l2, name="bn1")(c)
    model = keras.Model(i, keras.layers.Dense(3, name="d")(keras.layers.Flatten()(keras.layers.ReLU()(b))))
    x = np.random.default_rng(0).normal(size=(16, 8, 8, 1)).astype("float32")

    def warned(**keys):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            qstrat.Quantizer(model, "tqt").get_qat_model(init_quant=True, calib_dataset=x, verbose=0, **keys)
        return [str(w.message) for w in seen if "weight regularizers" in str(w.message)]

    (folded,) = warned(include_cle=False)
    assert "bn1's (its BatchNormalization is folded into c1: gone)" in folded and "c1's (on its kernel folded" in folded
    assert warned(include_cle=False, train_with_bn=True) == []  # FoldedConvBN keeps both as they are


def test_a_zero_bias_starts_at_its_kernels_threshold_and_trains_unclipped():
    """A bias of a layer not trained yet is all zero: calibrated on it alone, its TQT threshold would be about
    2^-16, and the first values training gives it would all be clipped."""
    keras.utils.set_random_seed(2)
    i = keras.Input((6,))
    model = keras.Model(i, keras.layers.Dense(3, name="d")(i))  # zeros: Keras' bias initializer
    x = np.random.default_rng(0).normal(size=(64, 6)).astype("float32")
    qat = qstrat.Quantizer(model, "tqt").get_qat_model(init_quant=True, calib_dataset=x, verbose=0)
    w = qat.get_layer("quant_d")
    assert float(np.asarray(w.state["bias"]["log_th"])) == float(np.asarray(w.state["kernel"]["log_th"]))
    qat.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    qat.fit(x, np.full((64, 3), 0.3, "float32"), epochs=3, batch_size=16, verbose=0)
    bias = keras.ops.convert_to_numpy(w.layer.bias)
    assert np.abs(bias).max() > 0.05  # it learned a bias the 2^-16 threshold would have clipped to 1.5e-5
    pos = 7 - np.ceil(float(np.asarray(w.state["bias"]["log_th"])))  # an 8-bit signed TQT grid
    quantized = keras.ops.convert_to_numpy(w.quantized_weight("bias"))
    assert np.abs(quantized - bias).max() <= 2.0**-pos / 2  # on the grid, within half a step: not clipped
