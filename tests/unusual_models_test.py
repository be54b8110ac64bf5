"""Model structures outside the DPU's layers: recurrent layers and channels_first convolutions.

Each quantizes: what qstrat cannot quantize runs in float and is listed in the
report, and bias correction corrects channels_first convolutions along their
channels, axis 1.
"""

import warnings

import keras
import numpy as np
import pytest
from keras import ops

import qstrat
from qstrat.saving import save_model

L = keras.layers


@pytest.mark.portable
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "SimpleRNN"])
def test_a_recurrent_layer_is_skipped_and_runs_in_float_with_its_weights(kind):
    i = keras.Input((6, 5))
    model = keras.Model(i, L.Dense(2, name="head")(getattr(L, kind)(4, name="rnn")(i)))
    x = np.random.default_rng(0).normal(size=(16, 6, 5)).astype("float32")
    q = qstrat.Quantizer(model, "pof2s")
    qmodel = q.quantize_model(x, verbose=0)
    assert q.report.layers["rnn"].status == "skipped" and f"({kind})" in q.report.layers["rnn"].reason
    assert q.report.layers["head"].status == "quantized"
    rnn = qmodel.get_layer("rnn")
    for got, want in zip(rnn.get_weights(), model.get_layer("rnn").get_weights(), strict=True):
        np.testing.assert_array_equal(got, want)
    probe = keras.Model(qmodel.inputs, rnn.output)  # the float layer on the quantized model input
    quantized_input = ops.convert_to_numpy(keras.Model(qmodel.inputs, rnn.input)(x))
    np.testing.assert_allclose(
        ops.convert_to_numpy(probe(x)), ops.convert_to_numpy(model.get_layer("rnn")(quantized_input)), atol=1e-6
    )


def _padded_tokens():
    tokens = np.random.default_rng(0).integers(1, 20, (32, 6)).astype("int32")
    tokens[:, 4:] = 0  # two steps of padding
    return tokens


@pytest.mark.portable
def test_a_mask_goes_through_the_quantizers_to_a_recurrent_layer_without_a_warning():
    # Embedding(mask_zero) -> Dense -> LSTM. With the mask, a sequence padded with zeros gives exactly the LSTM
    # output of the sequence without them; quantization is per element, so the same holds quantized. Keras
    # warned that the Dense's wrapper, the quantizers and the calibration taps destroyed the mask (they did not).
    i = keras.Input((None,), dtype="int32")
    x = L.Embedding(20, 8, mask_zero=True, name="embed")(i)
    x = L.LSTM(4, name="rnn")(L.Dense(8, activation="relu", name="dense")(x))
    model = keras.Model(i, L.Dense(3, name="head")(x))
    tokens = _padded_tokens()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qmodel = qstrat.Quantizer(model, "pof2s").quantize_model(tokens, verbose=0)
        padded = ops.convert_to_numpy(qmodel(tokens))
    assert [str(w.message) for w in caught if "mask" in str(w.message)] == []
    np.testing.assert_array_equal(padded, ops.convert_to_numpy(qmodel(tokens[:, :4])))
    np.testing.assert_array_equal(ops.convert_to_numpy(model(tokens)), ops.convert_to_numpy(model(tokens[:, :4])))


@keras.saving.register_keras_serializable(package="qstrat_test")
class MaskedScale(L.Layer):
    """A user layer with a weight that reads the mask: masked steps give zeros."""

    def build(self, shape):
        self.scale = self.add_weight(name="scale", shape=(shape[-1],), initializer="ones")

    def call(self, x, mask=None):
        y = x * self.scale
        return y if mask is None else y * ops.expand_dims(ops.cast(mask, y.dtype), -1)


@pytest.mark.portable
def test_a_wrapped_layer_that_reads_the_mask_is_given_it():
    i = keras.Input((None,), dtype="int32")
    x = MaskedScale(name="scale")(L.Embedding(20, 8, mask_zero=True, name="embed")(i))
    model = keras.Model(i, L.Dense(3, name="head")(L.GlobalAveragePooling1D(name="gap")(x)))
    target = {"target_name": "scale", "target_type": "weight"}
    target["quantizer_config"] = {"type": "Pof2SQuantizer", "params": {"bit_width": 8}}
    pattern = {"pattern_name": "masked_scale", "layer_type": "MaskedScale", "quant_config": [target]}
    custom = {"quantize_registry_config": {"layer_quantize_config": [pattern]}}
    tokens = _padded_tokens()
    q = qstrat.Quantizer(model, "pof2s", custom)
    qmodel = q.quantize_model(tokens, verbose=0)
    wrapper = qmodel.get_layer("quant_scale")
    assert q.report.layers["scale"].status == "quantized" and wrapper.supports_masking is False
    steps = ops.convert_to_numpy(keras.Model(qmodel.inputs, wrapper.output)(tokens))
    assert np.abs(steps[:, :4]).min() > 0 and np.abs(steps[:, 4:]).max() == 0.0


@pytest.mark.portable
def test_bias_correction_corrects_channels_first_convolutions_per_channel():
    """Their means are taken on axis 1, their channels: after the correction, each conv's per-channel mean
    error on the calibration data is at most half a step of its bias's grid (the corrected bias is rounded to
    it), plus the float32 rounding of the means it measured; without it, the error is larger."""
    i = keras.Input((3, 8, 8))
    x = L.Conv2D(4, 3, data_format="channels_first", name="conv")(i)  # output (4, 6, 6)
    x = L.Conv2D(6, 3, data_format="channels_first", name="wide")(x)  # output (6, 4, 4)
    model = keras.Model(i, L.Dense(2, name="head")(L.Flatten()(x)))
    x = np.random.default_rng(0).normal(size=(32, 3, 8, 8)).astype("float32")
    q = qstrat.Quantizer(model, "pof2s")  # without CLE, which would rescale conv's channels against the float's
    plain = qstrat.Quantizer(model, "pof2s").quantize_model(x, verbose=0, include_bias_corr=False, include_cle=False)
    qmodel = q.quantize_model(x, verbose=0, include_cle=False)
    assert [c.layer for c in q.bias_corrections] == ["conv", "wide", "head"]
    info = qstrat.get_quantize_info(qmodel)
    for name in ("conv", "wide"):
        y = ops.convert_to_numpy(keras.Model(model.input, model.get_layer(name).output)(x))
        errors = []
        for m in (qmodel, plain):
            yq = ops.convert_to_numpy(keras.Model(m.input, m.get_layer(f"quant_{name}").output)(x))
            errors.append(np.abs(np.mean(yq.astype(np.float64) - y, axis=(0, 2, 3))).max())
        half_step = 2.0 ** -(info[name]["bias"]["quantize_pos"] + 1)
        # Bias correction sums each sample's H x W values per channel in float32, for both means.
        rounding = 2 * y.shape[2] * y.shape[3] * 2.0**-24 * np.abs(y).max()
        assert errors[0] <= half_step + rounding < errors[1], (name, errors, half_step)


@pytest.mark.portable
def test_a_frozen_batch_normalization_stays_frozen_when_qat_trains_with_bn():
    """Keras runs a BatchNormalization with trainable=False in inference mode; its fake fold starts frozen."""
    from qstrat.layers import FoldedConvBN, QuantizeWrapper

    keras.utils.set_random_seed(0)
    i = keras.Input((8, 8, 3))
    x = L.ReLU()(L.BatchNormalization(name="bn1")(L.Conv2D(4, 3, name="conv1")(i)))
    x = L.ReLU()(L.BatchNormalization(name="bn2")(L.Conv2D(4, 3, name="conv2")(x)))
    model = keras.Model(i, L.Dense(2, name="fc")(L.GlobalAveragePooling2D()(x)))
    model.get_layer("bn1").trainable = False
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 8, 8, 3)).astype("float32"), rng.normal(size=(32, 2)).astype("float32")
    q = qstrat.Quantizer(model, "pof2s")
    qat = q.get_qat_model(init_quant=True, calib_dataset=x, train_with_bn=True, verbose=0)
    folds = {w.layer.name: w.layer for w in qat.layers if isinstance(w, QuantizeWrapper)}
    assert isinstance(folds["conv1"], FoldedConvBN) and isinstance(folds["conv2"], FoldedConvBN)
    before = {n: ops.convert_to_numpy(folds[n].moving_mean).copy() for n in ("conv1", "conv2")}
    qat.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    qat.fit(x, y, batch_size=16, epochs=1, verbose=0)
    np.testing.assert_array_equal(ops.convert_to_numpy(folds["conv1"].moving_mean), before["conv1"])
    assert not np.array_equal(ops.convert_to_numpy(folds["conv2"].moving_mean), before["conv2"])  # trains as before


def _two_inputs_two_heads():
    """Inputs a (4) and b (4); heads 'cls' and 'box' of the same width, so a swap would not show in shapes."""
    a, b = keras.Input((4,), name="a"), keras.Input((4,), name="b")
    h = L.Concatenate(name="cat")([a, L.Dense(4, name="db")(b)])
    return a, b, L.Dense(3, name="cls")(h), L.Dense(3, name="box")(L.Dense(5, name="hidden")(h))


def _twin_and_data():
    a, b, cls, box = _two_inputs_two_heads()
    plain = keras.Model([a, b], [cls, box])
    rng = np.random.default_rng(0)
    xa, xb = rng.normal(size=(32, 4)).astype("float32"), 10 * rng.normal(size=(32, 4)).astype("float32")
    return plain, xa, xb


@pytest.mark.portable
@pytest.mark.parametrize("strategy", ["pof2s", "fs"])
def test_dict_and_tuple_outputs_keep_their_keys_and_order(strategy):
    """Keras flattens a dict of outputs by sorted key ('box' before 'cls'); the quantized model gives the
    float model's own dict back, each key bit-identical to the same head of a list-output twin."""
    plain, xa, xb = _twin_and_data()
    twin = qstrat.Quantizer(plain, strategy).quantize_model([xa, xb], verbose=0).predict([xa, xb], verbose=0)
    dict_model = keras.Model(plain.inputs, {"cls": plain.outputs[0], "box": plain.outputs[1]})
    tuple_model = keras.Model(plain.inputs, (plain.outputs[0], plain.outputs[1]))
    got = qstrat.Quantizer(dict_model, strategy).quantize_model([xa, xb], verbose=0).predict([xa, xb], verbose=0)
    assert isinstance(got, dict) and set(got) == {"cls", "box"}
    np.testing.assert_array_equal(got["cls"], twin[0])
    np.testing.assert_array_equal(got["box"], twin[1])
    qtuple = qstrat.Quantizer(tuple_model, strategy).quantize_model([xa, xb], verbose=0)
    assert isinstance(qtuple.output, tuple) and len(qtuple.output) == 2
    got = qtuple.predict([xa, xb], verbose=0)
    np.testing.assert_array_equal(got[0], twin[0])
    np.testing.assert_array_equal(got[1], twin[1])


@pytest.mark.portable
def test_inputs_keyed_other_than_by_name_are_read_by_their_keys(tmp_path):
    """keras.Model({"x_a": a, "x_b": b}, ...) with Inputs named 'a' and 'b': Keras reads a dict of data by
    the keys; so do calibration and the quantized model, which keeps them through saving and loading."""
    plain, xa, xb = _twin_and_data()
    twin = qstrat.Quantizer(plain, "pof2s").quantize_model([xa, xb], verbose=0).predict([xa, xb], verbose=0)
    with pytest.warns(UserWarning, match="must match the names"):  # Keras's own warning, to the user
        keyed = keras.Model({"x_a": plain.inputs[0], "x_b": plain.inputs[1]}, plain.outputs)
    data = {"x_a": xa, "x_b": xb}
    qmodel = qstrat.Quantizer(keyed, "pof2s").quantize_model(data, verbose=0)
    got = qmodel.predict(data, verbose=0)
    np.testing.assert_array_equal(got[0], twin[0])
    np.testing.assert_array_equal(got[1], twin[1])
    save_model(qmodel, tmp_path / "q.keras")
    loaded = qstrat.load_model(tmp_path / "q.keras").predict(data, verbose=0)
    np.testing.assert_array_equal(loaded[1], twin[1])
    with pytest.raises(qstrat.CalibrationDataError, match="'a' is not an input of the model.*'x_a', 'x_b'"):
        qstrat.Quantizer(keyed, "pof2s").quantize_model({"a": xa, "b": xb}, verbose=0)
    # The ONNX file takes its inputs by the same keys; rounding half to even, it computes what Keras does.
    import onnxruntime as ort

    even = qstrat.Quantizer(keyed, "pof2s").quantize_model(data, verbose=0, export_rounding="onnx")
    qstrat.export_onnx(even, tmp_path / "q.onnx")
    session = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["x_a", "x_b"]
    for got, want in zip(session.run(None, data), even.predict(data, verbose=0), strict=True):
        np.testing.assert_array_equal(got, ops.convert_to_numpy(want))


def _dict_model():
    """Inputs declared unsorted ({"kb", "ka"}, both of width 8, so a swap would not show in shapes); outputs a
    dict whose keys sort otherwise than they are declared."""
    a, b = keras.Input((8,), name="ka"), keras.Input((8,), name="kb")
    h = L.Dense(6, activation="relu", name="h")(a)
    o = L.Dense(3, name="o")(L.Concatenate(name="cat")([h, L.Dense(4, name="db")(b)]))
    model = keras.Model({"kb": b, "ka": a}, {"y2": L.Dense(2, name="p")(h), "y1": o})
    rng = np.random.default_rng(0)
    x = {"ka": rng.normal(size=(48, 8)).astype("float32"), "kb": 20 * rng.normal(size=(48, 8)).astype("float32")}
    return model, x


@pytest.mark.portable
def test_analyze_mixed_precision_and_the_integer_reference_take_dict_inputs_and_outputs():
    model, x = _dict_model()
    q = qstrat.Quantizer(model, "pof2s")
    qmodel = q.quantize_model(x, verbose=0)
    want = qmodel.predict(x, verbose=0)
    assert isinstance(want, dict) and set(want) == {"y1", "y2"}
    report = qstrat.analyze(model, qmodel, x, verbose=0)
    assert report.output_sqnr_db > 20  # 8-bit on both heads: a swapped or misread input would be near 0 dB
    raised = qstrat.Quantizer(model, "pof2s").quantize_model(x, verbose=0, target_sqnr=report.output_sqnr_db + 3)
    assert isinstance(raised.predict(x, verbose=0), dict)
    ints = qstrat.simulate_integer(qmodel, x)
    assert isinstance(ints, dict) and set(ints) == {"y1", "y2"}
    for key in ("y1", "y2"):
        np.testing.assert_array_equal(ints[key], want[key])  # the integer reference is bit-exact


@pytest.mark.portable
@pytest.mark.parametrize("bundle", [list, tuple])
def test_a_list_for_a_model_that_takes_a_dict_is_refused(bundle):
    """Keras refuses it; read in the model's own input order it would calibrate 'ka' on the data meant for 'kb'."""
    model, x = _dict_model()
    with pytest.raises(qstrat.CalibrationDataError, match=r"for a model that takes a dict of inputs \('ka', 'kb'\)"):
        qstrat.Quantizer(model, "pof2s").quantize_model(bundle([x["kb"], x["ka"]]), verbose=0)


def _policy_model(policy: str, layer_dtype=None):
    """conv -> BN -> ReLU -> GAP -> dense, built under the global dtype ``policy`` (the conv in ``layer_dtype``
    where given); the global policy is float32 again after."""
    keras.config.set_dtype_policy(policy)
    try:
        keras.utils.set_random_seed(0)
        i = keras.Input((8, 8, 3))
        x = L.Conv2D(4, 3, padding="same", name="conv", dtype=layer_dtype)(i)
        x = L.ReLU(name="relu")(L.BatchNormalization(name="bn")(x))
        return keras.Model(i, L.Dense(3, name="head")(L.GlobalAveragePooling2D(name="gap")(x)))
    finally:
        keras.config.set_dtype_policy("float32")


@pytest.mark.portable
@pytest.mark.parametrize(
    "policy, layer_dtype", [("mixed_float16", None), ("mixed_bfloat16", None), ("float32", "float64")]
)
def test_a_model_in_another_float_type_is_quantized_in_float32_exactly(policy, layer_dtype):
    """The quantized layers compute in float32, where pof2s is exact: predict equals the integer reference bit
    for bit, and the optimize report and a warning say which layers changed type."""
    model = _policy_model(policy, layer_dtype)
    x = np.random.default_rng(0).uniform(0, 1, (16, 8, 8, 3)).astype("float32")
    q = qstrat.Quantizer(model, "pof2s")
    with pytest.warns(UserWarning, match=r"compute in another float type than float32 \(conv") as said:
        qmodel = q.quantize_model(x, verbose=0)
    assert {w.filename for w in said if "float type" in str(w.message)} == {__file__}  # the caller's line
    changed = [e.node for e in q.optimize_report.of("compute_in_float32")]
    assert "conv" in changed and (policy == "float32") == (changed == ["conv"])
    got = ops.convert_to_numpy(qmodel.predict(x, verbose=0))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, qstrat.simulate_integer(qmodel, x))


@pytest.mark.portable
@pytest.mark.parametrize("policy", ["mixed_float16", "bfloat16", "float64"])
def test_a_global_dtype_policy_at_quantize_time_leaves_the_quantized_model_in_float32(policy):
    """A bias at position 23 has no float16 grid (it was NaN), and float64 layers do not take float32 tensors:
    qstrat makes its layers in float32 whatever the global policy, and puts the policy back."""
    model = _policy_model("float32")
    x = np.random.default_rng(0).uniform(0, 1, (16, 8, 8, 3)).astype("float32")
    keras.config.set_dtype_policy(policy)
    try:
        qmodel = qstrat.Quantizer(model, "pof2s").quantize_model(x, verbose=0)
        assert keras.config.dtype_policy().name == policy
    finally:
        keras.config.set_dtype_policy("float32")
    got = ops.convert_to_numpy(qmodel.predict(x, verbose=0))
    assert got.dtype == np.float32 and np.isfinite(got).all()
    np.testing.assert_array_equal(got, qstrat.simulate_integer(qmodel, x))
