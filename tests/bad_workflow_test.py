"""Misused workflow calls get a clear error or warning: QAT deploy, the integer reference, dumps, analysis,
mixed precision and the TFLite export.

Each case is built in code on a model of a few layers.
"""

import math
import warnings

import keras
import numpy as np
import pytest

import qstrat
from qstrat.errors import CalibrationDataError, ConfigError, UnsupportedError

L = keras.layers
portable = pytest.mark.portable


def model(seed=0):
    keras.utils.set_random_seed(seed)
    i = keras.Input((8, 8, 3), name="image")
    x = L.Conv2D(4, 3, name="conv1")(i)
    x = L.ReLU(name="relu1")(L.BatchNormalization(name="bn1")(x))
    return keras.Model(i, L.Dense(3, name="fc")(L.GlobalAveragePooling2D(name="gap")(x)))


def data(n=32):
    return np.random.default_rng(0).normal(size=(n, 8, 8, 3)).astype("float32")


def quiet(fn, *a, **k):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **k)


# ---- QAT ----------------------------------------------------------------------------------------------------------


@portable
def test_deploying_a_qat_model_whose_training_diverged_names_the_variable():
    q = qstrat.Quantizer(model(), "tqt")
    qat = quiet(q.get_qat_model, init_quant=True, calib_dataset=data(), verbose=0)
    variable = next(v for v in qat.weights if v.path.endswith("kernel_log_th"))
    variable.assign(np.full(variable.shape, np.nan, "float32"))
    with pytest.raises(UnsupportedError, match=rf"weight {variable.path} holds 1 NaN or Inf .* Training diverged"):
        q.get_deploy_model(qat)


@portable
def test_deploy_warns_of_keys_that_only_get_qat_model_takes_and_of_tqt_left_unconverted():
    q = qstrat.Quantizer(model(), "tqt")
    qat = quiet(q.get_qat_model, init_quant=True, calib_dataset=data(), verbose=0)
    with pytest.warns(UserWarning, match="get_deploy_model: weight_bit does nothing here"):
        deployed = q.get_deploy_model(qat, weight_bit=4)
    assert qstrat.get_quantize_info(deployed)["conv1"]["kernel"]["bit_width"] == 8
    wrapper = next(
        layer for layer in qat.layers if getattr(layer, "layer", None) is not None and layer.layer.name == "fc"
    )
    log_th = wrapper.state["bias"]["log_th"]
    log_th.assign(np.full(log_th.shape, 200.0, "float32"))  # a threshold of 2^288: no position in [-126, 126]
    with pytest.warns(UserWarning, match=r"1 TQT quantizer\(s\) could not become power-of-2 positions.*fc.bias"):
        q.get_deploy_model(qat)


@portable
def test_get_qat_model_flags_and_verbose_are_checked_and_unused_data_is_said():
    q = qstrat.Quantizer(model(), "tqt")
    with pytest.raises(ConfigError, match=r'train_with_bn: expected True or False, got "false"'):
        q.get_qat_model(train_with_bn="false", verbose=0)
    with pytest.raises(ConfigError, match="init_quant: expected True or False"):
        q.get_qat_model(init_quant="no", verbose=0)
    with pytest.raises(ConfigError, match=r'verbose: expected 0 \(silent\), 1 or 2, got "x"'):
        q.get_qat_model(verbose="x")
    with pytest.warns(UserWarning, match="calib_dataset does nothing without init_quant=True"):
        q.get_qat_model(calib_dataset=data(), verbose=0)


# ---- the integer reference and dumps ---------------------------------------------------------------------------


@portable
def test_simulate_integer_and_dump_model_check_their_arguments(tmp_path):
    qmodel = quiet(qstrat.Quantizer(model(), "pof2s").quantize_model, data(), verbose=0)
    for bad in (0, -3, 2.5, "4"):
        with pytest.raises(CalibrationDataError, match="batch_size must be a positive integer or None"):
            qstrat.simulate_integer(qmodel, data(), batch_size=bad)
    assert qstrat.simulate_integer(qmodel, data(), batch_size=5).shape == (32, 3)
    with pytest.raises(CalibrationDataError, match=r"simulate_integer x, input 'image': expected shape"):
        qstrat.simulate_integer(qmodel, np.zeros((4, 16, 16, 3), "float32"))
    with pytest.raises(CalibrationDataError, match="simulate_integer x, input 'image': .* NaN or Inf"):
        qstrat.simulate_integer(qmodel, np.full((4, 8, 8, 3), np.nan, "float32"))
    for fn in (lambda m: qstrat.simulate_integer(m, data()), lambda m: qstrat.dump_model(m, data(), tmp_path / "d")):
        with pytest.raises(UnsupportedError, match="has no qstrat quantizers: quantize it first"):
            fn(model())
    with pytest.raises(ConfigError, match="dump_model output_dir: expected a folder path"):
        qstrat.dump_model(qmodel, data(), None)
    assert list(tmp_path.iterdir()) == []


# ---- analysis and mixed precision ------------------------------------------------------------------------------


@portable
def test_analyze_with_another_float_model_says_so():
    qmodel = quiet(qstrat.Quantizer(model(), "pof2s").quantize_model, data(), verbose=0)
    with pytest.warns(UserWarning, match="the float model given is likely not the one it was quantized from"):
        qstrat.analyze(model(seed=5), qmodel, data(), verbose=0)
    i = keras.Input((8, 8, 3), name="image")
    other = keras.Model(i, L.Dense(7)(L.GlobalAveragePooling2D()(i)))
    with pytest.raises(CalibrationDataError, match=r"outputs have shapes \[\(32, 7\)\] and the quantized model's"):
        qstrat.analyze(other, qmodel, data(), verbose=0)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*likely not the one.*")
        qstrat.analyze(model(), qmodel, data(), verbose=0)
    with pytest.raises(CalibrationDataError, match="analyze batch_size must be a positive integer"):
        qstrat.analyze(model(), qmodel, data(), batch_size=0, verbose=0)
    with pytest.raises(CalibrationDataError, match=r"analyze data, batch 0, input 'image': expected shape"):
        qstrat.analyze(model(), qmodel, np.zeros((4, 5, 5, 3), "float32"), verbose=0)


@portable
@pytest.mark.parametrize("score", [math.nan, math.inf, "good", None, np.array([0.9, 0.8])])
def test_an_eval_fn_that_returns_no_finite_number_is_named(score):
    with pytest.raises(ConfigError, match="eval_fn: returned .* Return a finite number"):
        qstrat.Quantizer(model(), "pof2s").quantize_model(
            data(), verbose=0, accuracy_budget=0.01, eval_fn=lambda m: score
        )


@portable
@pytest.mark.parametrize("max_raised", ["0.5", None, True])
def test_max_raised_must_be_a_fraction(max_raised):
    with pytest.raises(ConfigError, match="max_raised must be a fraction in"):
        qstrat.Quantizer(model(), "pof2s").quantize_model(data(), verbose=0, target_sqnr=30.0, max_raised=max_raised)


@portable
def test_a_strategy_from_scratch_does_not_warn_of_keys_nobody_set():
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*no_quant_in.*")
        qstrat.Quantizer(model(), custom_quantize_strategy={"base": ""}).quantize_model(data(), verbose=0)


# ---- TFLite ------------------------------------------------------------------------------------------------------


def test_export_tflite_refuses_a_bilinear_resize_that_changes_its_grid(tmp_path):
    if keras.backend.backend() != "tensorflow":
        pytest.skip("export_tflite runs on TensorFlow")
    i = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, padding="same", name="c")(i)
    up = L.UpSampling2D(interpolation="bilinear", name="up")(x)
    m = keras.Model(i, L.Conv2D(2, 1, name="c2")(up))
    qmodel = quiet(qstrat.Quantizer(m, "pof2s").quantize_model, data(), verbose=0)
    info = qstrat.get_quantize_info(qmodel)
    read = info["c"]["output"]["quantize_pos"]
    if info["up"]["output"]["quantize_pos"] == read:  # calibration may give both one grid: make them differ
        qmodel.get_layer("up_output_q").state["pos"].assign(np.float32(read + 1))
    assert qstrat.get_quantize_info(qmodel)["up"]["output"]["quantize_pos"] != read
    with pytest.raises(UnsupportedError, match=r"up: UpSampling2D \(bilinear\) writes another grid"):
        qstrat.export_tflite(qmodel, tmp_path / "m.tflite")
    fs = quiet(qstrat.Quantizer(m, "fs").quantize_model, data(), verbose=0)  # the resize reads a float tensor
    with pytest.raises(UnsupportedError, match=r"up: UpSampling2D \(bilinear\) reads a tensor qstrat leaves in float"):
        qstrat.export_tflite(fs, tmp_path / "m.tflite", calib_data=data())
    nearest = keras.Model(i, L.Conv2D(2, 1, name="c3")(L.UpSampling2D(name="up2")(x)))
    qstrat.export_tflite(
        quiet(qstrat.Quantizer(nearest, "fs").quantize_model, data(), verbose=0),
        tmp_path / "n.tflite",
        calib_data=data(),
    )
    (tmp_path / "n.tflite").unlink()
    with pytest.raises(ConfigError, match="int8_io: expected True or False"):
        qstrat.export_tflite(qmodel, tmp_path / "m.tflite", int8_io="yes")
    with pytest.raises(ConfigError, match="export_tflite path: expected a file path"):
        qstrat.export_tflite(qmodel, None)
    assert list(tmp_path.iterdir()) == []
