"""Bad or unusual input never gives a wrong model: it works, or it gets an error that says what to do.

Each test builds the case in code: calibration inputs given by name, user
names that collide with qstrat's own, integer inputs, Lambda layers, adapted
preprocessing state, precision settings, misspelt targets, an already
quantized model, 1-D and 3-D layers.
"""

import keras
import numpy as np
import pytest
from keras import ops

import qstrat
from qstrat.errors import CalibrationDataError, UnsupportedError
from qstrat.graph.capture import UnsupportedModelError
from qstrat.layers import FakeQuant, QuantizeWrapper

L = keras.layers
portable = pytest.mark.portable


def np_(t):
    return ops.convert_to_numpy(t)


def sqnr(ref, out):
    ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
    return 10 * np.log10(np.sum(ref**2) / np.sum((ref - out) ** 2))


# ---- calibration inputs by name ------------------------------------------------------------


def two_input_model():
    a, b = keras.Input((4,), name="a"), keras.Input((4,), name="b")
    x = L.Concatenate()([L.Dense(8, name="da")(a), L.Dense(8, name="db")(b)])
    return keras.Model([a, b], L.Dense(3, name="head")(x))


def two_input_data(n=64):
    rng = np.random.default_rng(0)
    # Ranges 100x apart: calibrating one input on the other's data wrecks the model.
    return rng.normal(size=(n, 4)).astype("float32"), (100 * rng.normal(size=(n, 4))).astype("float32")


def _info_positions(qmodel):
    info = qstrat.get_quantize_info(qmodel)
    return {layer: {t: v.get("quantize_pos") for t, v in targets.items()} for layer, targets in info.items()}


@portable
def test_a_dict_of_arrays_is_matched_by_input_name_not_by_order():
    model = two_input_model()
    A, B = two_input_data()
    ref = np_(model.predict({"a": A, "b": B}, verbose=0))
    in_order = qstrat.Quantizer(model, "pof2s").quantize_model({"a": A, "b": B}, verbose=0)
    reversed_keys = qstrat.Quantizer(model, "pof2s").quantize_model({"b": B, "a": A}, verbose=0)
    assert _info_positions(in_order) == _info_positions(reversed_keys)
    out = np_(reversed_keys.predict({"a": A, "b": B}, verbose=0))
    assert sqnr(ref, out) > 20


@portable
def test_dataset_elements_of_dicts_and_tuples_are_matched_by_name_or_position():
    model = two_input_model()
    A, B = two_input_data()

    def gen_dicts():
        for i in range(0, 64, 16):
            yield {"b": B[i : i + 16], "a": A[i : i + 16]}, np.zeros(16)

    def gen_pairs():  # (x1, x2) for a two-input model: the inputs, not (x, y)
        for i in range(0, 64, 16):
            yield A[i : i + 16], B[i : i + 16]

    for gen in (gen_dicts, gen_pairs):
        q = qstrat.Quantizer(model, "pof2s")
        got = q.quantize_model(gen(), verbose=0, include_bias_corr=False)
        want = qstrat.Quantizer(model, "pof2s").quantize_model([A, B], verbose=0, include_bias_corr=False)
        assert _info_positions(got) == _info_positions(want), gen.__name__


@portable
def test_unknown_and_missing_input_names_are_errors_that_name_them():
    model = two_input_model()
    A, B = two_input_data()
    q = qstrat.Quantizer(model, "pof2s")
    with pytest.raises(CalibrationDataError, match="'c' is not an input of the model.*'a', 'b'"):
        q.quantize_model({"a": A, "c": B}, verbose=0)
    with pytest.raises(CalibrationDataError, match="no data for input 'b'"):
        q.quantize_model({"a": A}, verbose=0)


def test_tf_data_of_dicts_is_matched_by_name():
    import tensorflow as tf

    model = two_input_model()
    A, B = two_input_data()
    ds = tf.data.Dataset.from_tensor_slices(({"b": B, "a": A}, np.zeros(64))).batch(16)
    # Bias correction reads arrays in a random order and datasets in theirs: off, to compare calibration alone.
    got = qstrat.Quantizer(model, "pof2s").quantize_model(ds, verbose=0, include_bias_corr=False)
    want = qstrat.Quantizer(model, "pof2s").quantize_model(
        {"a": A, "b": B}, calib_batch_size=16, verbose=0, include_bias_corr=False
    )
    assert _info_positions(got) == _info_positions(want)


# ---- calibration data checks ----------------------------------------------------------------


def small_cnn():
    i = keras.Input((8, 8, 3), name="image")
    x = L.Conv2D(4, 3, activation="relu", name="conv")(i)
    return keras.Model(i, L.Dense(2, name="head")(L.GlobalAveragePooling2D(name="gap")(x)))


def images(n=32, seed=0):
    return np.random.default_rng(seed).uniform(0, 1, (n, 8, 8, 3)).astype("float32")


def test_inputs_of_different_lengths_are_an_error_naming_the_lengths():
    model = two_input_model()
    A, B = two_input_data()
    with pytest.raises(CalibrationDataError, match="different numbers of samples.*'a' 64, 'b' 60"):
        qstrat.Quantizer(model, "pof2s").quantize_model([A, B[:60]], verbose=0)


@pytest.mark.parametrize("bad", ["16", 0, 2.5, True])
def test_a_batch_size_that_is_not_a_positive_integer_is_an_error(bad):
    with pytest.raises(CalibrationDataError, match="calib_batch_size must be a positive integer"):
        qstrat.Quantizer(small_cnn(), "pof2s").quantize_model(images(), calib_batch_size=bad, verbose=0)


def test_a_string_batch_size_says_to_drop_the_quotes():
    with pytest.raises(CalibrationDataError, match="Write 16 without quotes"):
        qstrat.Quantizer(small_cnn(), "pof2s").quantize_model(images(), calib_batch_size="16", verbose=0)


def test_a_tensor_is_read_as_an_array_not_sample_by_sample():
    import tensorflow as tf

    model, x = small_cnn(), images()
    got = qstrat.Quantizer(model, "pof2s").quantize_model(tf.constant(x), calib_batch_size=8, verbose=0)
    want = qstrat.Quantizer(model, "pof2s").quantize_model(x, calib_batch_size=8, verbose=0)
    assert _info_positions(got) == _info_positions(want)


# ---- qstrat's names never collide with the user's ------------------------------------------


@portable
@pytest.mark.parametrize(
    "model_name,layer_name",
    [
        ("mha", "mha"),
        ("m", "bias_correction_probe"),
        ("m", "calibration_stats"),
        ("m", "sum"),
        ("m", "qstrat_float_reference"),
        ("m", "qstrat_channel_sums"),
        ("m", "qstrat_stats_tap"),
    ],
)
def test_user_names_never_collide_with_qstrat_probes(model_name, layer_name):
    i = keras.Input((6, 8))
    x = L.Dense(8, name="proj")(i)
    x = L.MultiHeadAttention(2, 4, name="mha" if layer_name == "mha" else "attention")(x, x)
    x = L.Dense(8, name=layer_name if layer_name != "mha" else "tail")(x)
    model = keras.Model(i, L.Dense(3, name="head")(L.Flatten()(x)), name=model_name)
    data = np.random.default_rng(0).normal(size=(32, 6, 8)).astype("float32")
    q = qstrat.Quantizer(model, "pof2s")
    qmodel = q.quantize_model(data, verbose=0)
    assert q.bias_corrections, "bias correction ran"
    assert np.isfinite(np_(qmodel(data))).all()


@portable
def test_a_user_layer_named_like_a_wrapper_does_not_collide():
    i = keras.Input((8,))
    x = L.Dense(8, name="quant_d")(i)  # what the wrapper of "d" would be called
    model = keras.Model(i, L.Dense(3, name="d")(x))
    qmodel = qstrat.Quantizer(model, "pof2s").quantize_model(np.ones((8, 8), "float32"), verbose=0)
    names = [layer.name for layer in qmodel.layers]
    assert len(names) == len(set(names))


# ---- integer tensors, Lambda layers -----------------------------------------------------------


@portable
def test_integer_inputs_are_never_quantized():
    i = keras.Input((5,), dtype="int32", name="tokens")
    x = L.Embedding(20, 8, name="embed")(i)
    model = keras.Model(i, L.Dense(3, name="head")(L.Flatten(name="flat")(x)))
    tokens = np.random.default_rng(0).integers(0, 20, (32, 5)).astype("int32")
    q = qstrat.Quantizer(model, "pof2s")
    qmodel = q.quantize_model(tokens, verbose=0)
    assert not any(isinstance(layer, FakeQuant) and layer.target.startswith("tokens") for layer in qmodel.layers)
    assert "never quantized" in q.report.layers["tokens"].reason
    out = np_(qmodel.predict(tokens, verbose=0))
    assert sqnr(np_(model.predict(tokens, verbose=0)), out) > 20


def test_a_string_input_is_an_error_that_says_to_quantize_after_the_lookup():
    tf = pytest.importorskip("tensorflow")
    if keras.backend.backend() != "tensorflow":
        pytest.skip("string tensors are TensorFlow's")
    words = ["a", "b", "c", "d", "e"]
    i = keras.Input((6,), dtype="string")
    h = L.GlobalAveragePooling1D()(L.Embedding(7, 4)(L.StringLookup(vocabulary=words)(i)))
    model = keras.Model(i, L.Dense(3)(h))
    x = tf.constant(np.array(words)[np.random.default_rng(0).integers(0, 5, (24, 6))])
    with pytest.raises(CalibrationDataError, match=r"reads strings here.*part after the string lookup"):
        qstrat.Quantizer(model, "pof2s").quantize_model(x, verbose=0)


def test_float_data_for_an_integer_input_is_an_error():
    i = keras.Input((5,), dtype="int32", name="tokens")
    model = keras.Model(i, L.Dense(3)(L.Flatten()(L.Embedding(20, 8)(i))))
    with pytest.raises(CalibrationDataError, match="reads int32 here"):
        qstrat.Quantizer(model, "pof2s").quantize_model(np.ones((8, 5), "float32"), verbose=0)


@portable
def test_lambda_layers_are_kept_and_skipped_with_a_reason():
    i = keras.Input((8,))
    x = L.Dense(8, name="d1")(i)
    x = L.Lambda(lambda t: t * 2.0 + 1.0, name="affine")(x)
    model = keras.Model(i, L.Dense(3, name="d2")(x))
    data = np.random.default_rng(0).normal(size=(32, 8)).astype("float32")
    q = qstrat.Quantizer(model, "pof2s")
    qmodel = q.quantize_model(data, verbose=0)
    assert q.report.layers["affine"].status == "skipped" and "Lambda" in q.report.layers["affine"].reason
    assert sqnr(np_(model(data)), np_(qmodel(data))) > 20
    assert model.get_layer("affine") not in qmodel.layers  # a copy: the user's layer is not reused


@portable
def test_an_activation_that_is_a_plain_function_is_an_error_that_says_to_register_it():
    """Keras saves a plain function as its name, and cannot find it again: qstrat, which rebuilds layers from
    their configs, says so and how to fix it. Passed in custom_objects, or registered, the same function
    quantizes."""

    def doubled(t):
        return 2.0 * t

    def model_with(act):
        i = keras.Input((8,))
        x = L.Dense(8, activation=act, name="d1")(i)
        return keras.Model(i, L.Dense(3, name="d2")(x))

    data = np.random.default_rng(0).normal(size=(32, 8)).astype("float32")
    with pytest.raises(UnsupportedModelError, match=r"(?s)'d1_doubled'.*register_keras_serializable"):
        qstrat.Quantizer(model_with(doubled), "pof2s").quantize_model(data, verbose=0)
    plain = model_with(doubled)
    passed = qstrat.Quantizer(plain, "pof2s", custom_objects={"doubled": doubled}).quantize_model(data, verbose=0)
    assert sqnr(np_(plain(data)), np_(passed(data))) > 20
    registered = keras.saving.register_keras_serializable(package="qstrat_test")(doubled)
    model = model_with(registered)
    q = qstrat.Quantizer(model, "pof2s")
    qmodel = q.quantize_model(data, verbose=0)
    moved = [e.detail for e in q.optimize_report.of("separate_conv_act") if e.node == "d1"]
    assert moved == ["activation 'doubled' moved to d1_doubled"]
    assert sqnr(np_(model(data)), np_(qmodel(data))) > 20


# ---- the full state of every layer survives the copy ------------------------------------------


def _adapted_normalization_model():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(64, 8, 8, 3)) * np.sqrt([3000, 3500, 4000]) + [100, 120, 130]).astype("float32")
    norm = L.Normalization(name="norm")
    norm.adapt(x)
    i = keras.Input((8, 8, 3))
    y = L.Conv2D(4, 3, name="conv")(norm(i))
    return keras.Model(i, L.GlobalAveragePooling2D(name="gap")(y)), x


@portable
def test_an_adapted_normalization_keeps_its_statistics(tmp_path):
    model, x = _adapted_normalization_model()
    ref = np_(model(x))
    q = qstrat.Quantizer(model, "pof2s")
    opt = np_(q.optimize_model()(x))
    assert np.abs(opt - ref).max() <= 1e-5 * np.abs(ref).max()
    qmodel = q.quantize_model(x, verbose=0)
    out = np_(qmodel(x))
    assert sqnr(ref, out) > 20
    qmodel.save(tmp_path / "q.keras")
    assert np.array_equal(np_(keras.models.load_model(tmp_path / "q.keras")(x)), out)


# ---- precision settings, misspelt targets ---------------------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_layer_config_float_types_are_applied(dtype):
    model, x = small_cnn(), images()
    q = qstrat.Quantizer(model, "pof2s")
    qmodel = q.quantize_model(x, verbose=0, layer_config={"conv": dtype})
    conv = qmodel.get_layer("conv")
    assert conv.compute_dtype == dtype and conv.kernel.dtype == dtype
    assert f"kept in {dtype}" in q.report.layers["conv"].reason
    assert np.isfinite(np_(qmodel(x))).all()


def test_a_misspelt_weight_target_warns_with_a_suggestion():
    custom = {
        "quantize_registry_config": {
            "layer_quantize_config": [
                {
                    "pattern_name": "conv_dense",
                    "layer_type": "Conv2D|Dense",
                    "quant_config": [
                        {
                            "target_name": "kernal",
                            "target_type": "weight",
                            "quantizer_config": {"type": "Pof2SQuantizer", "params": {"bit_width": 8}},
                        }
                    ],
                }
            ]
        }
    }
    q = qstrat.Quantizer(small_cnn(), "pof2s", custom)
    with pytest.warns(UserWarning, match='weight "kernal".*Did you mean "kernel"'):
        q.quantize_model(images(), verbose=0)


def test_built_in_targets_on_absent_weights_do_not_warn(recwarn):
    i = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, use_bias=False, name="conv")(i)  # the pof2s bias target has nothing to quantize
    model = keras.Model(i, L.Dense(2)(L.GlobalAveragePooling2D()(x)))
    qstrat.Quantizer(model, "pof2s").quantize_model(images(), verbose=0)
    assert not [w for w in recwarn if "has no weight" in str(w.message)]


# ---- an already quantized model --------------------------------------------------------------


@portable
def test_quantizing_a_quantized_model_is_refused():
    model, x = small_cnn(), images()
    qmodel = qstrat.Quantizer(model, "pof2s").quantize_model(x, verbose=0)
    with pytest.raises(UnsupportedError, match="already quantized.*Quantize the float model"):
        qstrat.Quantizer(qmodel, "fs")


# ---- weights that are not finite ------------------------------------------------------------


@portable
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_weight_that_is_not_finite_is_named_before_any_work(bad):
    """One NaN or Inf in a kernel: the Quantizer refuses the model and names the weight (not the activation it
    spoils, which calibration would name otherwise)."""
    model = small_cnn()
    conv = next(layer for layer in model.layers if isinstance(layer, L.Conv2D))
    weights = conv.get_weights()
    weights[0].flat[5] = bad
    conv.set_weights(weights)
    with pytest.raises(UnsupportedError, match=rf"weight {conv.name}/kernel holds 1 NaN or Inf values \(of "):
        qstrat.Quantizer(model, "pof2s")


# ---- 1-D and 3-D layers -----------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["pof2s", "fs"])
def test_conv1d_conv3d_and_their_pooling_are_quantized(strategy):
    i1 = keras.Input((16, 3))
    a = L.Conv1D(4, 3, name="c1d")(i1)
    a = L.MaxPooling1D(name="mp1d")(a)
    a = L.AveragePooling1D(2, name="ap1d")(a)
    a = L.GlobalAveragePooling1D(name="gap1d")(a)
    i3 = keras.Input((6, 6, 6, 2))
    b = L.Conv3D(4, 3, name="c3d")(i3)
    b = L.MaxPooling3D(name="mp3d")(b)
    b = L.GlobalAveragePooling3D(name="gap3d")(b)
    model = keras.Model([i1, i3], L.Dense(2, name="head")(L.Concatenate(name="cat")([a, b])))
    rng = np.random.default_rng(0)
    data = [rng.normal(size=(16, 16, 3)).astype("float32"), rng.normal(size=(16, 6, 6, 6, 2)).astype("float32")]
    q = qstrat.Quantizer(model, strategy)
    qmodel = q.quantize_model(data, verbose=0)
    wrapped = {layer.layer.name for layer in qmodel.layers if isinstance(layer, QuantizeWrapper)}
    assert {"c1d", "c3d", "head"} <= wrapped
    if strategy == "pof2s":
        assert {"mp1d", "ap1d", "gap1d", "mp3d", "gap3d"} <= set(q.report.quantized())
    else:
        reason = q.report.layers["mp1d"].reason
        assert "quantizes only the inputs and weights of" in reason and "Conv1D" in reason
    assert sqnr(np_(model(data)), np_(qmodel(data))) > 15


def test_an_unmatched_layer_type_says_how_to_add_a_pattern():
    i = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, name="conv")(i)
    x = L.GlobalMaxPooling2D(name="gmp")(x)
    model = keras.Model(i, L.Dense(2, name="head")(x))
    q = qstrat.Quantizer(model, "pof2s")
    q.quantize_model(images(), verbose=0)
    reason = q.report.layers["gmp"].reason
    assert "GlobalMaxPooling2D" in reason and '"layer_type": "GlobalMaxPooling2D"' in reason


# ---- deep graphs ------------------------------------------------------------------------------


@portable
def test_a_quantized_model_deeper_than_the_recursion_limit_builds_warns_and_reloads(tmp_path):
    """Keras maps a graph recursively, one frame per layer of the longest path.

    A quantized chain is 3x as deep as its float model (wrapper, FakeQuant). The
    limit is set so that the float model fits and the quantized one does not,
    as with EfficientNetV2L at Python's default limit of 1000.
    """
    import inspect
    import sys

    depth = 100
    x = i = keras.Input((4,))
    for k in range(depth):
        x = L.Dense(4, activation="relu", name=f"d{k}")(x)
    model = keras.Model(i, x)
    data = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
    before = sys.getrecursionlimit()
    limit = len(inspect.stack(0)) + 2 * depth + 50  # room for the float model, not for 3x its depth
    sys.setrecursionlimit(limit)
    try:
        with pytest.warns(UserWarning, match=r"layers deep .* qstrat.load_model\(path\)"):
            qmodel = qstrat.Quantizer(model, "pof2s").quantize_model(data, verbose=0, include_bias_corr=False)
        assert sys.getrecursionlimit() == limit  # the room is given back
        qmodel.save(tmp_path / "deep.keras")
        again = qstrat.load_model(tmp_path / "deep.keras")
    finally:
        sys.setrecursionlimit(before)
    assert len(qmodel.layers) > 2 * depth
    np.testing.assert_array_equal(np_(again(data)), np_(qmodel(data)))
